"""The LoRA report's comparison, one `shadowserve verify` per row: a fine-tune served
*mounted* on its base (vLLM's LoRA kernels, in bf16 or fp16) and *merged* into it (merged
in bf16 or fp16 and saved so, the naive way; or merged in fp32 by `merge-lora` and cast
once), each judged against the base + the adapter unmerged in fp32, with the noise floor
(that reference in the serving dtype) as its scale.

    python bench/lora_report.py --model DIR [--prompts 16] [--tokens 64]

Prints one row per way of serving: the verify command's flags, the verdict, the KL ratio
to the noise floor with its 95 % confidence-sequence bounds, the excess top-1
disagreement, and whether it is detectably different from the noise floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.report import cpu_name, print_table  # noqa: E402
from tests.candidates import lora_adapter, lora_bf16_merge, lora_fp32_merge  # noqa: E402

VLLM = ["--kv-cache-gib", "1", "--max-model-len", "1024"]


def rows_to_run(demo: Path, adapter: Path, root: Path) -> list[tuple[str, str, Path, list[str]]]:
    """(way, serving dtype, candidate directory, extra verify flags)."""
    def merged(name: str, make) -> Path:
        out = root / name
        if not out.exists():
            make(out)
        return out

    in_bf16 = merged("merged-in-bf16", lambda out: lora_bf16_merge(demo, adapter, out, torch.bfloat16))
    in_fp16 = merged("merged-in-fp16", lambda out: lora_bf16_merge(demo, adapter, out, torch.float16))
    in_fp32 = merged("merged-in-fp32", lambda out: lora_fp32_merge(demo, adapter, out))
    mounted = ["--candidate-adapter", str(adapter)]
    unmerged = ["--adapter", str(adapter)]
    return [
        ("mounted", "bfloat16", demo, mounted),
        ("mounted", "float16", demo, mounted),
        ("merged in bf16, saved bf16", "bfloat16", in_bf16, unmerged),
        ("merged in bf16, saved bf16", "float16", in_bf16, unmerged),
        ("merged in fp16, saved fp16", "float16", in_fp16, unmerged),
        ("merged in fp32 (merge-lora), saved bf16", "bfloat16", in_fp32, unmerged),
    ]


def verify(candidate: Path, reference: Path, dtype: str, extra: list[str], prompts: int, tokens: int) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "server.cli", "verify", str(candidate), str(reference), "--dtype", dtype,
           "--samples", str(prompts), "--max-tokens", str(tokens), "--json", *extra, *VLLM]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if run.returncode not in (0, 1, 3):
        raise SystemExit(f"verify {candidate} {dtype} exited {run.returncode}:\n{run.stderr[-3000:]}")
    return run.returncode, json.loads(run.stdout)


def bound(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = lora_adapter(args.model, root / "adapter")
        for way, dtype, candidate, extra in tqdm(rows_to_run(args.model, adapter, root), desc="verify"):
            code, report = verify(candidate, args.model, dtype, extra, args.prompts, args.tokens)
            v = report["verdict"]
            kl, top1 = v["kl_ratio"], v["excess_top1"]
            flags = " ".join(f.replace(str(adapter), "ADAPTER") for f in extra)
            rows.append((way, dtype, flags, v["status"], f"{kl['estimate']:.3g} [{bound(kl['low'])}, {bound(kl['high'])}]",
                         f"{100 * top1['estimate']:+.2f}", str(v["different"]), str(code)))
    print(f"\nSmolLM2-135M + a rank-8 LoRA on every linear layer, vLLM eager, {cpu_name()}; "
          f"{args.prompts} built-in prompts x {args.tokens} greedy tokens; reference: base + adapter unmerged, fp32")
    print_table(["served", "dtype", "verify flags", "verdict", "KL ratio [95% CS]", "excess top-1 (pts)",
                 "detectably different", "exit"], rows)


if __name__ == "__main__":
    main()
