"""Base-model requests batched beside LoRA requests on vLLM's CPU backend, with and
without shadowserve's plugin (server/vllm_plugin.py): vLLM's PyTorch LoRA ops hand a
base row (index -1) the last adapter slot's update. Each request is generated alone and
then in one batch with requests on two adapters (--max-loras 2), greedy, fp32; the
table gives, per prompt, whether the base's tokens stayed the same and the largest
change of a sampled token's log-prob.

    python bench/lora_mixed_batch.py --model DIR [--tokens 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_name, print_table  # noqa: E402

PROMPTS = ("Explain what a CPU does.", "Why is the sky blue?", "Give me tips for learning to cook.",
           "Tell me about the history of Rome.")


def child(model: Path, adapters: list[str], tokens: int) -> list[dict]:
    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for p in PROMPTS]
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model), dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=2**30,
        enable_lora=True, max_lora_rank=16, max_loras=2, max_cpu_loras=2, logprobs_mode="raw_logprobs"))
    loras = [LoRARequest(f"a{n}", n + 1, path) for n, path in enumerate(adapters)]

    async def generate(ids, lora, request_id):
        params = SamplingParams(max_tokens=tokens, temperature=0, logprobs=0)
        final = None
        async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id, lora_request=lora):
            final = out
        o = final.outputs[0]
        return list(o.token_ids), [next(iter(d.values())).logprob for d in o.logprobs]

    async def run():
        for lora in loras:
            await llm.add_lora(lora)
        alone = [await generate(ids, None, f"alone-{n}") for n, ids in enumerate(prompts)]
        jobs = [generate(ids, lora, f"mixed-{n}-{k}") for n, ids in enumerate(prompts)
                for k, lora in enumerate([None, *loras])]
        mixed = (await asyncio.gather(*jobs))[:: len(loras) + 1]
        return [{"same_tokens": a[0] == m[0], "max_dlogprob": max(abs(x - y) for x, y in zip(a[1], m[1]))}
                for a, m in zip(alone, mixed)]

    try:
        return asyncio.run(run())
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, json.loads(args.child), args.tokens)))
        return
    from tests.candidates import lora_adapter

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [str(lora_adapter(args.model, Path(tmp) / f"a{n}", seed=1234 + n)) for n in range(2)]
        for fix in ("1", "0"):
            env = {**os.environ, "SHADOWSERVE_VLLM_LORA_FIX": fix, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
            run = subprocess.run([sys.executable, __file__, "--model", str(args.model), "--tokens", str(args.tokens),
                                  "--child", json.dumps(adapters)], capture_output=True, text=True, env=env,
                                 timeout=1800)
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            for prompt, r in zip(PROMPTS, json.loads(run.stdout.strip().splitlines()[-1])):
                rows.append(("on" if fix == "1" else "off", prompt, str(r["same_tokens"]), f"{r['max_dlogprob']:.2g}"))
    print(f"\nSmolLM2-135M fp32 on vLLM's CPU backend, two rank-8 adapters, --max-loras 2, {cpu_name()}; "
          f"{args.tokens} greedy tokens: a base request alone vs batched beside both adapters' requests")
    print_table(["plugin", "prompt", "same tokens", "max |Δ log-prob|"], rows)


if __name__ == "__main__":
    main()
