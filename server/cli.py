"""`shadowserve` command line: subcommands defined as pydantic-settings models, so every
flag is also a `SHADOWSERVE_*` environment variable."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, CliImplicitFlag, CliPositionalArg, CliSettingsSource, CliSubCommand

from server.cli_help import HelpFormatter, HelpLayout
from server.reference_app import ReferenceSettings
from server.settings import ServeSettings
from server.verify.settings import VerifySettings


class Serve(ServeSettings):
    """Run the OpenAI-compatible server on a candidate model."""

    def cli_cmd(self) -> None:
        run_server(self)


class DemoModel(BaseModel):
    """Build (once) the fp32 SmolLM2-135M-Instruct demo model and print its directory."""

    cache_dir: Path | None = Field(
        default=None, description="cache root (default: $SHADOWSERVE_CACHE_DIR or ~/.cache/shadowserve)"
    )

    def cli_cmd(self) -> None:
        from adapters.demo_model import DemoModelError, ensure_demo_model

        try:
            print(ensure_demo_model(self.cache_dir))
        except DemoModelError as exc:
            sys.exit(f"shadowserve demo-model: {exc}")


class Verify(VerifySettings):
    __doc__ = VerifySettings.__doc__

    def cli_cmd(self) -> None:
        run_verify(self)


class Reference(ReferenceSettings):
    """Serve the fp32 reference for remote teacher-forced scoring."""

    def cli_cmd(self) -> None:
        run_reference(self)


SaveDType = Literal["fp32", "bf16", "fp16"]


class InternLM2ToLlama(BaseModel):
    """Convert an InternLM2 checkpoint (Hugging Face layout, safetensors) to Llama."""

    src: CliPositionalArg[Path]
    dst: CliPositionalArg[Path]
    dtype: SaveDType | None = Field(default=None, description="cast the weights (default: keep the source dtype)")

    def cli_cmd(self) -> None:
        from adapters.internlm2 import convert_internlm2_to_llama

        print(run_tool("convert internlm2-to-llama", lambda: convert_internlm2_to_llama(self.src, self.dst, self.dtype)))


class Convert(BaseModel):
    """Checkpoint conversions."""

    internlm2_to_llama: CliSubCommand[InternLM2ToLlama] = Field(
        description="convert an InternLM2 checkpoint (packed wqkv, remote code) to Llama for vLLM")

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


class MergeTp(BaseModel):
    """Merge tensor-parallel (and pipeline-parallel) shards model_tp{t}_pp{p}.pt|.safetensors into one
    Hugging Face checkpoint. InternEvo's model_config.pt, when beside the shards, decides the layout;
    the flags declare it when it is absent (and must agree with it when present)."""

    src: CliPositionalArg[Path]
    dst: CliPositionalArg[Path]
    rotary_layout: Literal["hf", "internevo"] | None = Field(
        default=None, description="q/k rotary layout of the shards: internevo (trained with adapt_hf=False: rows "
        "re-ordered per head) or hf (adapt_hf=True). Required for InternEvo shards without model_config.pt")
    embed_split: Literal["vocab", "hidden"] | None = Field(
        default=None, description="the dim the embedding is split on (checked against the shard shapes)")
    norm_head: CliImplicitFlag[bool] = Field(
        default=False, description="the model used InternEvo's norm head (output rows L2-normalised); "
        "--no-norm-head: it did not. One of the two is required for InternEvo shards without model_config.pt")
    max_position_embeddings: int | None = Field(
        default=None, gt=0, description="for a config.json written from model_config.pt (default: its value, else 4096)")

    def cli_cmd(self) -> None:
        from adapters.internevo import LayoutFlags
        from adapters.tp_merge import merge_tp

        # --norm-head / --no-norm-head / neither: only a flag given on the command line declares.
        norm_head = self.norm_head if "norm_head" in self.model_fields_set else None
        flags = LayoutFlags(self.rotary_layout, self.embed_split, norm_head)
        print(run_tool("merge-tp", lambda: merge_tp(self.src, self.dst, flags, self.max_position_embeddings)))


class MergeLora(BaseModel):
    """Merge a LoRA adapter into its base in fp32, save once in --dtype, and measure the drift."""

    base: CliPositionalArg[Path]
    adapter: CliPositionalArg[Path]
    dst: CliPositionalArg[Path]
    dtype: SaveDType = Field(description="dtype of the saved merged weights (save in the dtype you serve)")
    serving_dtype: SaveDType | None = Field(default=None, description="dtype the model will be served in (default: --dtype)")
    tolerance: float = Field(default=1e-2, gt=0, description="warn above this max |Δlogit| vs base + adapter in fp32")

    def cli_cmd(self) -> None:
        from adapters.lora_merge import merge_lora

        report = run_tool("merge-lora", lambda: merge_lora(
            self.base, self.adapter, self.dst, self.dtype, self.serving_dtype, self.tolerance))
        print(f"{self.dst}\nmax |Δlogit| vs base + adapter (fp32): {report.max_abs_logit_diff:.3g} "
              f"(saved {report.save_dtype}, served {report.serving_dtype}, tolerance {report.tolerance:g}; "
              f"unmerged in {report.serving_dtype}: {report.noise_floor:.3g})")
        for warning in report.warnings:
            print(f"WARNING: {warning}", file=sys.stderr)


class Inspect(BaseModel):
    """Parameters, weight bytes per precision and KV-cache size of a model directory or config.json."""

    model: CliPositionalArg[Path]
    kv_dtype: Literal["fp32", "bf16", "fp16", "int8"] = Field(default="bf16", description="KV-cache dtype")

    def cli_cmd(self) -> None:
        from adapters.inspect_model import inspect_model, render

        print(render(run_tool("inspect", lambda: inspect_model(self.model, self.kv_dtype))))


class Plan(BaseModel):
    """Capacity plan on a device type: weights per device, KV-cache tokens, where the fp32
    reference fits, and the decode speed memory bandwidth allows; then the fp32 reference on
    devices of its own: memory per tensor-parallel rank, the size it needs, and replicas."""

    model: CliPositionalArg[Path]
    device: str | None = Field(default=None, description="device type: h200-141gb, h100-80gb, h100-pcie-80gb, "
                               "a100-80gb, a100-40gb, l40s-48gb, a10-24gb, l4-24gb, rtx4090-24gb; or give "
                               "--memory-gib and --bandwidth-gbs")
    memory_gib: float | None = Field(default=None, gt=0, description="usable memory per device (with --bandwidth-gbs)")
    bandwidth_gbs: float | None = Field(default=None, gt=0, description="memory bandwidth per device, GB/s")
    block_size: int | None = Field(default=None, ge=1, description="vLLM KV block size (default 16; vLLM on CPU: 128)")
    tensor_parallel_size: int = Field(default=1, ge=1, description="tensor-parallel degree")
    dtype: Literal["fp32", "bf16", "fp16", "int8", "int4"] = Field(default="bf16", description="weight dtype")
    kv_dtype: Literal["fp32", "bf16", "fp16", "int8"] | None = Field(default=None, description="default: --dtype")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vLLM's memory share per device")
    reserve_gib: float = Field(default=1.5, ge=0, description="activations, graphs and context per device (estimate)")
    kv_cache_gib: float | None = Field(default=None, gt=0, description="a fixed KV-cache size, as serve --kv-cache-gib")
    reference_tensor_parallel_size: int | None = Field(
        default=None, ge=1, description="the fp32 reference's tensor-parallel size (default: the least that fits)")
    candidate_tokens_per_s: float = Field(
        default=10_000, ge=0, description="the candidate's output tokens/s, summed over its replicas (sizes the "
        "reference's replicas)")
    shadow_rate: float = Field(default=0.05, ge=0, le=1, description="share of requests the reference scores, as "
                               "serve --shadow-rate (whose own default is 0: off)")
    prompt_ratio: float = Field(default=1.0, ge=0, description="prompt tokens per completion token (the reference "
                                "re-reads the prompt)")
    mfu: float = Field(default=0.4, gt=0, le=1, description="share of peak FLOP/s the reference's passes reach")
    shadow_noise_floor: bool = Field(default=True, description="the reference also holds and runs the serving-dtype "
                                     "noise copy, as serve --shadow-noise-floor")

    def cli_cmd(self) -> None:
        import dataclasses

        from adapters.model_dir import read_config
        from adapters.plan import DEVICES, Device, PlanError, Traffic, plan, render

        def work():
            if self.device is not None:
                if self.device not in DEVICES:
                    raise PlanError(f"unknown device {self.device!r}; one of {', '.join(DEVICES)}, "
                                    "or --memory-gib and --bandwidth-gbs")
                device = DEVICES[self.device]
            elif self.memory_gib and self.bandwidth_gbs:
                device = Device("custom", self.memory_gib, self.bandwidth_gbs)
            else:
                raise PlanError("give --device, or --memory-gib and --bandwidth-gbs")
            if self.block_size is not None:
                device = dataclasses.replace(device, block_size=self.block_size)
            traffic = Traffic(self.candidate_tokens_per_s, self.shadow_rate, self.prompt_ratio, self.mfu)
            return plan(read_config(self.model, allow_file=True), device, self.tensor_parallel_size, self.dtype,
                        self.kv_dtype, self.gpu_memory_utilization, self.reserve_gib, kv_cache_gib=self.kv_cache_gib,
                        reference_tensor_parallel=self.reference_tensor_parallel_size, traffic=traffic,
                        noise_floor=self.shadow_noise_floor)

        print(render(run_tool("plan", work)))


class Diagnose(BaseModel):
    """Where and why a candidate departs from its reference: a config diff, weight forensics
    (streaming, one tensor pair at a time) and activation localisation against a noise
    envelope, joined into ranked findings. Exit code 0 nothing departs, 1 something does,
    2 usage or load error."""

    candidate: CliPositionalArg[Path]
    reference: CliPositionalArg[Path]
    adapter: Path | None = Field(default=None, description="unmerged PEFT LoRA adapter on the reference")
    mapping: Literal["auto", "identity", "internlm2"] = Field(
        default="auto", description="reference tensor names -> candidate names: internlm2 applies the converter's "
        "rules to an InternLM2 reference (auto: when the reference is InternLM2 and the candidate is not)")
    prompt: list[str] | None = Field(default=None, description="activation pass prompt (repeat for more; "
                                     "default: 3 built-in prompts)")
    only: list[Literal["config", "weights", "activations"]] | None = Field(
        default=None, description="run only these passes (repeat, or comma-separate)")
    dtype: Literal["bf16", "fp16"] | None = Field(
        default=None, description="serving dtype of the noise envelope (default: the candidate's, else bf16)")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    json_report: CliImplicitFlag[bool] = Field(default=False, alias="json", description="print the report as JSON")
    html: Path | None = Field(default=None, description="also write a self-contained HTML report with plots here")

    def cli_cmd(self) -> None:
        run_diagnose(self)


def run_tool(name: str, work):
    """Adapter errors are the user's to fix: print them, no traceback."""
    from adapters.errors import AdapterError

    try:
        return work()
    except (AdapterError, FileNotFoundError, KeyError) as exc:
        sys.exit(f"shadowserve {name}: {exc}")


class Shadowserve(BaseSettings, cli_prog_name="shadowserve", cli_kebab_case=True):
    """OpenAI-compatible vLLM server with an fp32 shadow path for converted models."""

    serve: CliSubCommand[Serve] = Field(
        description="serve a candidate model (OpenAI API on vLLM), the fp32 shadow comparing live traffic")
    verify: CliSubCommand[Verify] = Field(
        description="judge a candidate against its reference offline: report and verdict (exit 0/1/3)")
    diagnose: CliSubCommand[Diagnose] = Field(
        description="where and why a candidate departs: config, tokenizer, weight and activation passes")
    reference: CliSubCommand[Reference] = Field(
        description="serve the fp32 reference for remote shadow scoring (--shadow-reference-url)")
    demo_model: CliSubCommand[DemoModel] = Field(
        description="build the SmolLM2-135M-Instruct demo model once and print its directory")
    convert: CliSubCommand[Convert] = Field(description="convert a checkpoint (InternLM2 -> Llama)")
    merge_tp: CliSubCommand[MergeTp] = Field(
        description="merge tensor/pipeline-parallel shards (InternEvo) into one Hugging Face checkpoint")
    merge_lora: CliSubCommand[MergeLora] = Field(
        description="merge a LoRA adapter in fp32, save once in the serving dtype, measure the drift")
    inspect: CliSubCommand[Inspect] = Field(description="parameters, weight bytes and KV-cache size of a model")
    plan: CliSubCommand[Plan] = Field(
        description="capacity plan on a device type: memory per device, KV tokens, reference placement, speed")

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def run_server(settings: ServeSettings) -> None:
    import uvicorn
    from prometheus_client import REGISTRY, CollectorRegistry

    from server import assembly
    from server.app import create_app
    from server.lifecycle import GracefulServer, abandon_load
    from server.serving.context import ServingContext

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # vLLM registers its `vllm:*` metrics on the process-wide default registry.
    extra = (REGISTRY,) if settings.engine == "vllm" else ()
    server: uvicorn.Server | None = None

    def stop() -> None:  # a failed or dead engine ends the process with a non-zero status
        server.should_exit = True

    def load(settings: ServeSettings, registry: CollectorRegistry) -> ServingContext:
        from server.verify.calibrate import calibrate_before_serving  # --verdict-calibrate, before the engine

        return assembly.assemble_serving(calibrate_before_serving(settings), registry)

    app = create_app(settings, load, CollectorRegistry(), extra, on_fatal=stop)
    # After the drain, connections still open (idle keep-alives, stragglers) get a few seconds.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5)
    server = GracefulServer(config, app.state.drain)
    server.run()
    if app.state.server.loading:  # stopped or timed out mid-start: the load thread may never return
        abandon_load(app.state.server.error)
    if app.state.server.error:
        print(f"shadowserve serve: {app.state.server.error}", file=sys.stderr)
        sys.exit(app.state.server.exit_code)


def run_reference(settings: ReferenceSettings) -> None:
    """Exit 2 when the reference cannot be served as configured (its model, its code, an
    adapter that does not mount), naming what."""
    import uvicorn
    from prometheus_client import CollectorRegistry

    from server.reference_app import create_reference_app
    from server.serving.validation import ScoringValidator

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def serve(scorer, adapters=None) -> None:
        app = create_reference_app(
            scorer, settings.tokens, CollectorRegistry(), adapters=adapters, docs=settings.docs,
            validator=ScoringValidator.from_settings(settings),
        )
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)

    if settings.tensor_parallel_size > 1:
        from server.reference_ranks import run_ranks

        run_ranks(settings, serve)
        return
    from server.assembly import assemble_reference

    scorer, adapters = assemble_reference(settings)
    serve(scorer, adapters)


def run_verify(settings: VerifySettings) -> None:
    """Exit 0 pass, 1 fail, 3 inconclusive; 2 when the run itself failed (a load error,
    a bad input, samples that could not be compared): never a verdict by accident."""
    import asyncio
    import dataclasses
    import json
    import os

    # vLLM logs to stdout by default; keep stdout for the report (--json pipes cleanly).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM's CPU backend keeps a core for its API front end; verify is a batch job with no
    # front end to serve, so the engine gets every core (decode ~1.7x faster on 2 cores).
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from server.assembly import VERDICT_EXIT, ExitCode
    from server.verify.calibrate import CalibrationUnavailable, calibrate
    from server.verify.run import verify
    from server.verify.structure import structure_check, structure_lines
    from server.verify.text import header, render_text, sequence_rows

    async def calibrated_verify():
        judged = settings
        if settings.calibrate:
            try:
                await calibrate(settings)
                judged = settings.model_copy(update={"calibrate": False})
            except CalibrationUnavailable as exc:  # say so, and keep today's floor
                print(f"shadowserve verify: not calibrated: {exc}; judging against the transformers noise floor",
                      file=sys.stderr)
                judged = settings.model_copy(update={"calibrate": False, "verdict_calibration": None})
        result = await verify(judged)
        return dataclasses.replace(result, structure=await asyncio.to_thread(structure_check, judged))

    try:
        result = asyncio.run(calibrated_verify())
        if settings.html is not None:
            from server.verify.html import write_html

            write_html(result, settings, settings.html)
    except Exception as exc:  # anything that stops the run is a usage/load error, not a verdict
        logging.getLogger("shadowserve.verify").debug("verify failed", exc_info=True)
        print(f"shadowserve verify: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(ExitCode.REFUSED)
    report, structure = result.report, result.structure
    if settings.json_report:  # the verdict endpoint's schema, and what the config and weight passes found
        document = {**json.loads(report.model_dump_json()), "diagnosis": json.loads(structure.model_dump_json())}
        print(json.dumps(document, indent=2))  # (pydantic writes inf and nan as null: still valid JSON)
    else:
        rows = sequence_rows(result.sequences, result.labels, result.decode)
        print(render_text(report, header(settings, report), rows, structure_lines(structure)))
    if report.verdict.status == "fail":  # stderr: --json keeps stdout for the report
        adapter = f" --adapter {settings.adapter}" if settings.adapter else ""
        print(f"where and why: shadowserve diagnose {settings.candidate} {settings.reference}{adapter}", file=sys.stderr)
    if settings.strict and report.verdict.different and report.verdict.status != "fail":
        print("shadowserve verify --strict: the candidate is detectably different from the noise floor "
              "(within tolerance, but not equal to the reference up to rounding)", file=sys.stderr)
        sys.exit(VERDICT_EXIT["fail"])
    if settings.strict and structure.departs:
        print(f"shadowserve verify --strict: the config and weight passes name a departure: "
              f"{structure.strict_findings[0].summary}", file=sys.stderr)
        sys.exit(VERDICT_EXIT["fail"])
    if settings.strict and not structure.ran:
        print(f"shadowserve verify --strict: the config and weight passes did not run ({structure.reason}): only the "
              "drift was judged", file=sys.stderr)
    sys.exit(VERDICT_EXIT[report.verdict.status])


def run_diagnose(args: Diagnose) -> None:
    """Exit 0 nothing departs, 1 something does, 2 when the run itself failed."""
    from adapters.diagnose.run import PASSES, diagnose
    from adapters.errors import AdapterError
    from server.assembly import ExitCode

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = diagnose(args.candidate, args.reference, adapter=args.adapter, mapping=args.mapping,
                          prompts=args.prompt, only=tuple(args.only or PASSES), dtype=args.dtype, device=args.device)
        if args.html is not None:
            from adapters.diagnose.render import render_html

            args.html.write_text(render_html(report), encoding="utf-8")
    except (AdapterError, OSError, KeyError) as exc:
        print(f"shadowserve diagnose: {exc}", file=sys.stderr)
        sys.exit(ExitCode.REFUSED)
    if args.json_report:
        print(report.model_dump_json(indent=2))
    else:
        from adapters.diagnose.render import render_text

        print(render_text(report))
    sys.exit(ExitCode.FAILED if report.departs else ExitCode.OK)


def cli_source(**options) -> CliSettingsSource:
    """The parsers, with each laid-out command's help in groups (server/cli_help.py)."""
    layout = HelpLayout({"serve": Serve, "verify": Verify, "reference": Reference})
    return CliSettingsSource(Shadowserve, add_argument_method=layout.add_argument, formatter_class=HelpFormatter,
                             **options)


def main(argv: list[str] | None = None) -> None:
    try:
        CliApp.run(Shadowserve, cli_args=sys.argv[1:] if argv is None else argv, cli_settings_source=cli_source())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"shadowserve: invalid settings: {problems}", file=sys.stderr)
        from server.assembly import ExitCode

        sys.exit(ExitCode.REFUSED)


if __name__ == "__main__":
    main()
