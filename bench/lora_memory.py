"""What mounted adapters cost the shadow's reference: its process RSS with 1 and with 4
LoRA adapters mounted (peft, unmerged) on the one fp32 base and its bf16 noise-floor
copy, against the base alone and against what one base copy per adapter would take.
Each count is measured in a fresh process (RSS after the load, and after one scored
batch per adapter).

    python bench/lora_memory.py --model DIR [--counts 0,1,4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_name, print_table  # noqa: E402

MIB = 2**20


def child(model: Path, adapters: list[Path]) -> dict:
    """In this (fresh) process: the reference as `serve` builds it, then the adapters."""
    import psutil

    from shadow.local_scorer import LocalScorer
    from shadow.scoring import ScoreItem

    process = psutil.Process()
    scorer = LocalScorer.load(model)
    scorer.enable_noise_floor("bfloat16")
    item = ScoreItem(list(range(10, 74)), list(range(100, 164)), [[t] for t in range(100, 164)])
    scorer.score_sync([item], 5, 5)
    base_rss = process.memory_info().rss
    for n, path in enumerate(adapters):
        scorer.add_adapter(f"a{n}", path)
    for n in range(len(adapters)):
        scorer.score_sync([item], 5, 5, f"a{n}")
    lora_bytes = sum(p.numel() * p.element_size() for name, p in scorer._model.named_parameters() if "lora_" in name)
    base_bytes = sum(p.numel() * p.element_size() for name, p in scorer._model.named_parameters() if "lora_" not in name)
    return {"rss": process.memory_info().rss, "base_rss": base_rss, "lora_bytes": lora_bytes, "base_bytes": base_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--counts", default="0,1,4")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, [Path(p) for p in json.loads(args.child)])))
        return
    from tests.candidates import lora_adapter

    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [lora_adapter(args.model, Path(tmp) / f"a{n}", seed=n) for n in range(max(counts))]
        results = {}
        for count in counts:
            run = subprocess.run([sys.executable, __file__, "--model", str(args.model), "--child",
                                  json.dumps([str(p) for p in adapters[:count]])], capture_output=True, text=True,
                                 timeout=1800)
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            results[count] = json.loads(run.stdout.strip().splitlines()[-1])
    for count in counts:
        r = results[count]
        per_copy = r["base_bytes"] * count  # a base (fp32) per adapter, had each been loaded on its own
        rows.append((str(count), f"{r['base_rss'] / MIB:.0f}", f"{r['rss'] / MIB:.0f}",
                     f"{(r['rss'] - r['base_rss']) / MIB:+.0f}", f"{r['lora_bytes'] / MIB:.1f}",
                     f"{r['base_bytes'] / MIB:.0f}", f"{per_copy / MIB:.0f}"))
    print(f"\nThe shadow's reference (SmolLM2-135M fp32 + its bf16 noise copy), {cpu_name()}; each row a fresh process")
    print_table(["adapters mounted", "RSS before mounting (MiB)", "RSS after, one batch each (MiB)", "growth (MiB)",
                 "adapter weights, fp32 (MiB)", "base weights, fp32 (MiB)", "a base copy per adapter would add (MiB)"],
                rows)


if __name__ == "__main__":
    main()
