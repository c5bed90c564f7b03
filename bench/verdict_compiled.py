"""The verdict's two answers in vLLM's compiled mode (`make serve`'s default; the suite
runs eager): the controls are within tolerance and *not* detectably different, the mild
attention bug (every attention logit x 1.03) detectably different, judged by
`verify --strict` against the floor calibrated to the compiled engine where one can be
measured (bf16, on the built-in prompts the candidates are not judged on); the fp16
control and the LoRA control (base + unmerged adapter: no engine serves that reference)
are judged against the transformers floor.

    python bench/verdict_compiled.py --model DIR [--modes compiled,eager] [--prompts 16] [--tokens 48]

Prints one row per mode and candidate: verdict, detectably different, KL ratio and its
95 % confidence-sequence bounds, `--strict`'s exit code, the floor, and the calibration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from bench.report import cpu_name, print_table  # noqa: E402
from server.verify.inputs import BUILTIN_PROMPTS  # noqa: E402
from server.verify.settings import VerifySettings  # noqa: E402
from tests.candidates import build  # noqa: E402

VLLM = ["--kv-cache-gib", "1", "--max-model-len", "2048"]
CANDIDATES = ("bf16", "fp16", "lora_fp32_merge_bf16", "attention_scale_mild")
EXPECTED = {"attention_scale_mild": "different", "bf16": "same", "fp16": "same", "lora_fp32_merge_bf16": "same"}


def calibrate(model: Path, mode: str, prompts: Path, tokens: int, out: Path) -> dict:
    """The engine's own noise on the reference (serve --verdict-calibrate's child), on
    prompts the candidates are not judged on."""
    job = VerifySettings(candidate=model, reference=model, dtype="bfloat16", prompts=prompts, max_tokens=tokens,
                         enforce_eager=mode == "eager", kv_cache_gib=1, max_model_len=2048, calibrate=True,
                         verdict_calibration=out)
    run = subprocess.run([sys.executable, "-m", "server.verify.calibrate"], input=job.model_dump_json(by_alias=True),
                         capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise SystemExit(f"calibration ({mode}) exited {run.returncode}: {run.stdout}\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def bound(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.3g}"


def verify(candidate, mode: str, prompts: int, tokens: int, calibration: Path | None) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "server.cli", "verify", str(candidate.path), str(candidate.reference), "--dtype",
           candidate.dtype, "--samples", str(prompts), "--max-tokens", str(tokens), "--enforce-eager",
           str(mode == "eager").lower(), "--strict", "--json", *VLLM]
    cmd += ["--adapter", str(candidate.adapter)] if candidate.adapter else []
    cmd += ["--verdict-calibration", str(calibration)] if calibration else []
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if run.returncode not in (0, 1, 3):
        raise SystemExit(f"verify {candidate.name} ({mode}) exited {run.returncode}:\n{run.stderr[-3000:]}")
    return run.returncode, json.loads(run.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--modes", default="compiled")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    rows, calibrations = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        held_out = root / "calibration-prompts.txt"  # the built-in prompts the candidates are not judged on
        held_out.write_text("\n".join(BUILTIN_PROMPTS[args.prompts:]) + "\n")
        jobs = [(mode, name) for mode in args.modes.split(",") for name in ("calibration", *CANDIDATES)]
        for mode, name in tqdm(jobs, desc="verify --strict"):
            calibration = root / f"{mode}-bfloat16.json"
            if name == "calibration":
                cal = calibrate(args.model, mode, held_out, args.tokens, calibration)
                calibrations[mode] = (f"{cal['kl_ratio']:.3g} [{cal['kl_ratio_low']:.3g}, {cal['kl_ratio_high']:.3g}] "
                                      f"on {cal['sequences']} held-out prompts")
                continue
            c = build(name, args.model, root)
            usable = c.dtype == "bfloat16" and c.adapter is None  # measured for bf16 on the bare reference
            code, report = verify(c, mode, args.prompts, args.tokens, calibration if usable else None)
            v = report["verdict"]
            kl = v["kl_ratio"]
            seen = "different" if v["different"] else "same"
            rows.append((mode, name, v["status"], str(v["different"]), f"{kl['estimate']:.3g} [{bound(kl['low'])}, "
                         f"{bound(kl['high'])}]", str(code), v["floor"]["kind"], f"{v['floor']['kl_scale']:.3g}",
                         str(report["candidate"]["sequences"]), "yes" if seen == EXPECTED[name] else "NO"))
    print(f"\nSmolLM2 on vLLM, {cpu_name()}; {args.prompts} built-in prompts x {args.tokens} greedy tokens, verify --strict")
    print_table(["mode", "candidate", "verdict", "detectably different", "KL ratio [95% CS]", "--strict exit", "floor",
                 "floor KL scale", "sequences", "as expected"], rows)
    for mode, text in calibrations.items():
        print(f"engine calibration, {mode}, bf16: {text}")


if __name__ == "__main__":
    main()
