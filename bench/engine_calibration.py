"""Engine calibration, measured: `verify --calibrate` per compile mode, then a live server
judging the same weights (the bf16 control) against the calibrated floor, on prompts the
calibration never saw.

    python bench/engine_calibration.py --model DIR [--modes eager,compiled] [--live-prompts 32] [--tokens 64]

Prints, per mode: the engine noise over the transformers floor (the calibration), and
the live bf16 control's KL ratio against the transformers floor and against the
calibrated one, with the verdict's 95 % confidence-sequence bounds. The calibrated
control should read ~1x in every mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.report import cpu_name, print_table  # noqa: E402
from server.verify.inputs import BUILTIN_PROMPTS  # noqa: E402
from tests.servers import start_server  # noqa: E402

VLLM = ["--kv-cache-gib", "1", "--max-model-len", "2048"]
PREFIXES = ("In one sentence: ", "Explain to a child: ", "Briefly, ", "Step by step: ")


def calibrate(model: Path, mode: str, out: Path, tokens: int) -> dict:
    cmd = [sys.executable, "-m", "server.cli", "verify", str(model), str(model), "--dtype", "bfloat16",
           "--max-tokens", str(tokens), "--enforce-eager", str(mode == "eager").lower(), "--calibrate",
           "--verdict-calibration", str(out), "--json", *VLLM]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if run.returncode not in (0, 3):
        raise SystemExit(f"verify --calibrate ({mode}) exited {run.returncode}:\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def live(model: Path, mode: str, calibration: Path, prompts: list[str], tokens: int, log: Path) -> dict:
    args = ["--model", str(model), "--served-model-name", "candidate", "--dtype", "bfloat16", *VLLM,
            "--enforce-eager", str(mode == "eager").lower(), "--shadow-rate", "1.0",
            "--verdict-calibration", str(calibration)]
    server = start_server(args, log, timeout=900)
    try:
        def chat(prompt: str) -> None:
            body = {"model": "candidate", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                    "temperature": 0}
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=600).raise_for_status()

        with ThreadPoolExecutor(8) as pool:
            list(tqdm(pool.map(chat, prompts), total=len(prompts), desc=f"live {mode}", leave=False))
        deadline = time.monotonic() + 900
        while (report := httpx.get(f"{server.url}/v1/shadow/verdict", timeout=60).json()) \
                and (report["candidate"] or {}).get("sequences", 0) < len(prompts):
            if time.monotonic() > deadline:
                raise SystemExit(f"the shadow did not finish:\n{server.log_tail()}")
            time.sleep(2)
        return report
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--live-prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    prompts = [p + q for p in PREFIXES for q in BUILTIN_PROMPTS][: args.live_prompts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in tqdm(args.modes.split(","), desc="modes"):
            path = Path(tmp) / f"calibration-{mode}.json"
            cal = calibrate(args.model, mode, path, args.tokens)
            report = live(args.model, mode, path, prompts, args.tokens, Path(tmp) / f"serve-{mode}.log")
            v = report["verdict"]
            kl, scale = v["kl_ratio"], v["floor"]["kl_scale"]
            rows.append((mode, f"{cal['kl_ratio']:.3f} [{cal['kl_ratio_low']:.3f}, {cal['kl_ratio_high']:.3f}]",
                         f"{cal['top1_ratio']:.2f}", f"{kl['estimate'] * scale:.3f}",
                         f"{kl['estimate']:.3f} [{kl['low']:.3f}, {kl['high']:.3f}]", v["status"], str(v["different"]),
                         str(report["candidate"]["sequences"])))
    print(f"\nSmolLM2 bf16 on vLLM, {cpu_name()}; calibration on the built-in 32 prompts x {args.tokens} tokens, "
          f"live on {len(prompts)} other prompts")
    print_table(["compile mode", "engine noise / transformers floor (calibration) [95% CS]", "top-1 flips ratio",
                 "live bf16 control vs transformers floor", "live vs calibrated floor [95% CS]", "live verdict",
                 "different", "sequences"], rows)


if __name__ == "__main__":
    main()
