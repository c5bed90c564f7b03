"""Serving throughput: N concurrent streaming chat requests against shadowserve (vLLM
engine), optionally side by side with vLLM's own OpenAI server on the same model.

    python bench/serving_throughput.py --model DIR [--requests 16] [--max-tokens 128] [--baseline]

Prints one table row per server: start-up time (to /health 200), wall time, output
tokens/s, and time-to-first-token percentiles. The client runs on the same machine,
so figures are for comparison within one run, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402

from tests.servers import free_port, launch, start_server  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "Give advice to someone learning to program.",
]


async def one_request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0.8, seed=len(prompt), stream=True, stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return ttft or 0.0, tokens


async def load(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int):
        async with gate:
            return await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)

    await one_request(client, model, "warm up", 8)
    start = time.perf_counter()
    results = await asyncio.gather(*(gated(i) for i in range(requests)))
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--baseline", action="store_true", help="also run vLLM's own OpenAI server")
    args = parser.parse_args()
    name = Path(args.model).name
    logs = Path(tempfile.mkdtemp(prefix="bench-"))

    servers = {
        "shadowserve (vllm engine)": lambda: start_server(
            ["--model", args.model, "--dtype", args.dtype, "--kv-cache-gib", "2", "--max-model-len", "2048"],
            logs / "shadowserve.log", unconfined=False),
    }
    if args.baseline:
        port = free_port()
        servers["vLLM api_server"] = lambda: launch(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
             "--served-model-name", name, "--dtype", args.dtype, "--kv-cache-memory-bytes", str(2 * 2**30),
             "--max-model-len", "2048", "--port", str(port), "--host", "127.0.0.1"],
            port, logs / "vllm.log", timeout=600)

    rows = []
    for label, start in servers.items():
        t0 = time.perf_counter()
        server = start()
        startup = time.perf_counter() - t0
        try:
            stats = asyncio.run(load(server.url, name, args.requests, args.concurrency, args.max_tokens))
        finally:
            server.stop()
        rows.append((label, startup, stats))

    print(f"\n{args.requests} streaming chat requests x {args.max_tokens} tokens, concurrency "
          f"{args.concurrency}, {args.dtype}, {name}\n")
    print("| server | start-up s | wall s | output tokens | tokens/s | TTFT p50 s | TTFT p90 s |")
    print("|---|---|---|---|---|---|---|")
    for label, startup, s in rows:
        print(f"| {label} | {startup:.1f} | {s['wall_s']:.1f} | {s['tokens']} | {s['tok_s']:.0f} | "
              f"{s['ttft_p50']:.2f} | {s['ttft_p90']:.2f} |")


if __name__ == "__main__":
    main()
