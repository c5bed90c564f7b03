"""Reference scoring cost: teacher forcing vs autoregressive regeneration, and batching.

    python bench/shadow_scoring.py --model DIR [--tokens 128] [--repeats 3]

Scoring a completion by teacher forcing is one forward pass over prompt + output; the
alternative, regenerating it with the same fp32 model, is one step per token (with a
KV cache, as any generate loop has). Both are timed on the same model and sequence;
then LocalScorer's throughput for batches of such sequences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.timing import median_seconds  # noqa: E402
from shadow.local_scorer import LocalScorer  # noqa: E402
from shadow.scoring import ScoreItem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,4,8,16")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    scorer = LocalScorer(model, tokenizer, args.model.name, torch.device("cpu"))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"]
    n = args.tokens

    def regenerate() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True).sequences[0, len(prompt):]

    output = regenerate().tolist()
    item = ScoreItem(prompt, output, [[t] for t in output])
    scorer.score_sync([item], top_m=5)  # warm-up
    autoregressive = median_seconds(args.repeats, regenerate)
    forced = median_seconds(args.repeats, lambda: scorer.score_sync([item], top_m=5))

    print(f"\n{args.model.name}, fp32, CPU threads {torch.get_num_threads()}, prompt {len(prompt)} + completion {n} tokens\n")
    print("| method | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| autoregressive regeneration (KV cache) | {autoregressive:.3f} | 1.0x |")
    print(f"| teacher-forced scoring (one pass) | {forced:.3f} | {autoregressive / forced:.1f}x |")

    print("\n| batch (sequences) | tokens per batch | seconds | scored tokens/s | completion tokens/s |")
    print("|---|---|---|---|---|")
    for size in (int(b) for b in args.batches.split(",")):
        batch = [item] * size
        seconds = median_seconds(args.repeats, lambda batch=batch: scorer.score_sync(batch, top_m=5))
        total = size * (len(prompt) + n)
        print(f"| {size} | {total} | {seconds:.3f} | {total / seconds:.0f} | {size * n / seconds:.0f} |")


if __name__ == "__main__":
    main()
