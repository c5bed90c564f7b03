"""`shadowserve verify` wall time, end to end (engine start included), on the built-in 32
prompts x 64 tokens: the demo model in bf16 against itself in fp32.

    python bench/verify_wall_time.py --model DIR [--engines vllm,transformers]

Target: under 3 minutes on the 2-core development machine with the vLLM engine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--engines", default="vllm")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    rows = []
    for engine in args.engines.split(","):
        command = [sys.executable, "-m", "server.cli", "verify", str(args.model), str(args.model), "--engine", engine,
                   "--dtype", args.dtype, "--kv-cache-gib", "1", "--max-model-len", "2048", "--json"]
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        seconds = time.perf_counter() - start
        if run.returncode not in (0, 1, 3):
            sys.exit(f"verify failed ({run.returncode}):\n{run.stderr[-3000:]}")
        report = json.loads(run.stdout)
        kl = report["verdict"]["kl_ratio"]
        rows.append((engine, seconds, report["candidate"]["sequences"], report["candidate"]["tokens"],
                     report["verdict"]["status"], f"{kl['estimate']:.2f} [{kl['low']:.2f}, {kl['high']:.2f}]"))

    print(f"\n{args.model.name} in {args.dtype} vs itself in fp32, 32 prompts x 64 greedy tokens\n")
    print("| engine | wall s (engine start included) | sequences | compared tokens | verdict | KL ratio [95% CI] |")
    print("|---|---|---|---|---|---|")
    for engine, seconds, sequences, tokens, status, kl in rows:
        print(f"| {engine} | {seconds:.0f} | {sequences} | {tokens} | {status} | {kl} |")


if __name__ == "__main__":
    main()
