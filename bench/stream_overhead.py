"""The serving path's own cost per streamed token, the engine taken out: shadowserve's
real app (FastAPI, middlewares, handlers, SSE) under uvicorn over an engine that emits
its tokens at once, streamed to concurrent chat clients; the server process's CPU time
per 1,000 streamed tokens, median of rounds. Run it on two commits to compare.

    python bench/stream_overhead.py --model DIR [--streams 16] [--tokens 256] [--requests 64] [--rounds 5]

With an engine this fast, the server process is the bottleneck; its CPU per token is
what each streamed token costs on top of the engine (detokenization excluded: the
null engine's chunks carry their text already).
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

from bench.report import cpu_name, print_table  # noqa: E402
from bench.timing import process_cpu_s  # noqa: E402


class NullEngine:
    """Engine protocol, no model: `max_tokens` one-token chunks, each with its text."""

    name = "null"
    dtype = "bfloat16"
    max_model_len = 4096

    async def generate(self, prompt_ids, options, request_id):
        from server.engines import EngineChunk

        for i in range(options.max_tokens):
            await asyncio.sleep(0)
            last = i == options.max_tokens - 1
            yield EngineChunk([1000 + i % 100], " word", None, "length" if last else None)

    async def prompt_logprobs(self, prompt_ids, k, request_id):
        raise NotImplementedError

    async def check_health(self):
        return None

    async def shutdown(self):
        return None


def serve(model: Path, port: int) -> None:
    import uvicorn
    from prometheus_client import CollectorRegistry

    from server.app import create_app
    from server.serving.context import ServingContext
    from server.serving.prompts import PromptRenderer
    from server.settings import ServeSettings

    settings = ServeSettings(model=model, shadow_rate=0, engine="transformers")
    renderer = PromptRenderer.load(model)

    def load(settings, registry):
        return ServingContext(NullEngine(), renderer, settings.model_name, settings.max_n, settings.max_logprobs)

    app = create_app(settings, load, CollectorRegistry())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def load_round(url: str, name: str, streams: int, requests: int, tokens: int) -> int:
    import httpx

    body = {"model": name, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": tokens,
            "stream": True}
    received = 0
    gate = asyncio.Semaphore(streams)

    async def one(client) -> None:
        nonlocal received
        async with gate, client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                received += line.startswith("data: {") and '"content":" word"' in line
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(one(client) for _ in range(requests)))
    return received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory (its tokenizer is used)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process itself
    args = parser.parse_args()
    if args.serve:
        serve(args.model, args.serve)
        return

    from tests.servers import free_port, launch

    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="stream-overhead-"))
    server = launch([sys.executable, __file__, "--model", str(args.model), "--serve", str(port)], port, logs / "server.log")
    url, pid = server.url, server.process.pid
    try:
        asyncio.run(load_round(url, args.model.name, args.streams, 4, 8))  # warm-up
        per_k, rates = [], []
        for _ in range(args.rounds):
            cpu, wall = process_cpu_s(pid), time.perf_counter()
            tokens = asyncio.run(load_round(url, args.model.name, args.streams, args.requests, args.tokens))
            cpu, wall = process_cpu_s(pid) - cpu, time.perf_counter() - wall
            assert tokens == args.requests * args.tokens, f"received {tokens} tokens"
            per_k.append(1000 * cpu / tokens * 1000)
            rates.append(tokens / wall)
    finally:
        server.stop()
    print(f"\n{cpu_name()}; {args.rounds} rounds of {args.requests} streamed chats x {args.tokens} tokens, "
          f"{args.streams} at a time, null engine\n")
    print_table(["server CPU ms per 1k tokens (median)", "min", "max", "tokens/s (median)"],
                [[f"{statistics.median(per_k):.1f}", f"{min(per_k):.1f}", f"{max(per_k):.1f}",
                  f"{statistics.median(rates):.0f}"]])


if __name__ == "__main__":
    main()
