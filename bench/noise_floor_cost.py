"""What the noise floor costs: reference scoring with it off and on (bf16, fp16), side by
side in one run, on the same batches.

    python bench/noise_floor_cost.py --model DIR [--batch 8] [--tokens 64] [--repeats 5]

The noise floor is a second teacher-forced pass of the reference in the serving dtype
over the same batch. Target: it adds at most 1x the fp32 pass. For comparison, the last
row runs the same copy with PyTorch's native CPU bf16 kernels instead of fp32
accumulation (what the noise floor would cost without it on a CPU without bf16 units).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import shadow.local_scorer as local_scorer  # noqa: E402
from bench.timing import median_seconds  # noqa: E402
from server.verify.inputs import BUILTIN_PROMPTS  # noqa: E402
from shadow.local_scorer import LocalScorer  # noqa: E402
from shadow.scoring import ScoreItem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--batch", type=int, default=8, help="sequences per reference batch")
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    items = []
    for prompt in tqdm(BUILTIN_PROMPTS[: args.batch], desc="generate", leave=False):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 do_sample=False)[0, len(ids):].tolist()
        items.append(ScoreItem(list(ids), out, [[t] for t in out]))
    tokens = sum(len(i.prompt_ids) + len(i.output_ids) for i in items)

    rows = []
    off = LocalScorer(model, tokenizer, "ref", torch.device("cpu"))
    off.score_sync(items, top_m=5)  # warm-up
    base = median_seconds(args.repeats, lambda: off.score_sync(items, top_m=5))
    rows.append(("fp32 reference only (noise floor off)", base))
    for dtype in ("bfloat16", "float16"):
        on = LocalScorer(model, tokenizer, "ref", torch.device("cpu"))
        on.enable_noise_floor(dtype)
        on.score_sync(items, top_m=5, noise_top_k=20)
        rows.append((f"fp32 + noise floor in {dtype}", median_seconds(args.repeats, lambda on=on: on.score_sync(items, 5, 20))))
    native = LocalScorer(model, tokenizer, "ref", torch.device("cpu"))
    native.enable_noise_floor("bfloat16")
    original = local_scorer.fp32_accumulation
    local_scorer.fp32_accumulation = lambda device: contextlib.nullcontext()
    try:
        rows.append(("fp32 + noise floor in bfloat16, native CPU bf16 kernels",
                     median_seconds(min(args.repeats, 2), lambda: native.score_sync(items, 5, 20))))
    finally:
        local_scorer.fp32_accumulation = original

    print(f"\n{args.model.name}, CPU threads {torch.get_num_threads()}, batch of {args.batch} sequences, "
          f"{tokens} tokens ({args.tokens} completion tokens each), median of {args.repeats}\n")
    print("| scoring | seconds per batch | noise floor adds (x the fp32 pass) |")
    print("|---|---|---|")
    for name, seconds in rows:
        added = "-" if seconds is base else f"{(seconds - base) / base:.2f}x"
        print(f"| {name} | {seconds:.2f} | {added} |")


if __name__ == "__main__":
    main()
