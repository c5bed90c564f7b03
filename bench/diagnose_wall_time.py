"""`shadowserve diagnose` wall time per pass on SmolLM2-135M (CPU), for a bug found by each
rung and pass and a clean control, side by side in one run.

    python bench/diagnose_wall_time.py --model DIR [--repeats 3] [--passes config,weights,activations]

Targets: all three passes under 60 s on the 2-core development machine; the config and
weight passes (what `verify` runs beside its verdict) in seconds. A rung's cost is its
candidate's weight-pass time less the control's (where no rung past `rounding` runs).
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
    from tqdm import tqdm

    from adapters.diagnose.run import PASSES, diagnose
    from tests import candidates

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", default=",".join(PASSES), help="comma-separated: config, weights, activations")
    args = parser.parse_args()
    passes = tuple(p for p in PASSES if p in args.passes.split(","))

    makers = {
        "bf16 control": lambda m, out: candidates.cast_weights(m, out, torch.bfloat16),
        "attention_scale (scaled)": candidates.attention_scale,
        "q_scaled_one_layer (scaled)": candidates.q_scaled_one_layer,
        "tp_rank_order (permuted)": candidates.tp_rank_order,
        "layer_renumbered (other_layer)": candidates.layer_renumbered,
        "norm_minus_one (offset)": candidates.norm_minus_one,
        "embedding_rows_exchanged (rows_moved)": candidates.embedding_rows_exchanged,
        "rope_theta (config)": candidates.rope_theta,
        "wrong_generation_eos (tokenizer)": candidates.wrong_generation_eos,
        "template_without_system (template)": candidates.template_without_system,
    }
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n, (name, make) in enumerate(tqdm(makers.items(), desc="candidates", unit="candidate")):
            path = make(args.model, Path(tmp) / str(n))
            runs = [diagnose(path, args.model, only=passes, device="cpu", progress=False) for _ in range(args.repeats)]
            median = {p: statistics.median(r.seconds[p] for r in runs) for p in passes}
            first = runs[0].findings[0].summary[:70] + "…" if runs[0].findings else "(nothing departs)"
            rows.append((name, median, first))

    print(f"\n{args.model.name}, CPU, median of {args.repeats} in-process runs (seconds)\n")
    print(f"| candidate | {' | '.join(passes)} | total | first finding |")
    print(f"|---|{'---|' * len(passes)}---|---|")
    for name, median, first in rows:
        cells = " | ".join(f"{median[p]:.2f}" for p in passes)
        print(f"| {name} | {cells} | {sum(median.values()):.1f} | {first} |")


if __name__ == "__main__":
    main()
