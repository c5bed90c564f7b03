"""`shadowserve diagnose` wall time per pass on SmolLM2-135M (CPU), for a bug found in
each pass and a clean control, side by side in one run.

    python bench/diagnose_wall_time.py --model DIR [--repeats 3]

Target: all three passes under 60 s on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from adapters.diagnose.run import PASSES, diagnose
    from tests import candidates

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = {
            "attention_scale (weights)": candidates.attention_scale(args.model, root / "attention_scale"),
            "rope_theta (config)": candidates.rope_theta(args.model, root / "rope_theta"),
            "tp_rank_order (weights)": candidates.tp_rank_order(args.model, root / "tp"),
            "bf16 control": candidates.cast_weights(args.model, root / "bf16", torch.bfloat16),
        }
        rows = []
        for name, path in cases.items():
            runs = [diagnose(path, args.model, device="cpu", progress=False) for _ in range(args.repeats)]
            median = {p: statistics.median(r.seconds[p] for r in runs) for p in PASSES}
            first = runs[0].findings[0].summary[:70] + "…" if runs[0].findings else "(nothing departs)"
            rows.append((name, median, first))

    print(f"\n{args.model.name}, CPU, median of {args.repeats} in-process runs (seconds)\n")
    print("| candidate | config | weights | activations | total | first finding |")
    print("|---|---|---|---|---|---|")
    for name, median, first in rows:
        total = sum(median.values())
        print(f"| {name} | {median['config']:.2f} | {median['weights']:.1f} | {median['activations']:.1f} | "
              f"{total:.1f} | {first} |")


if __name__ == "__main__":
    main()
