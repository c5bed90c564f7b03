"""Load: C concurrent streaming chats (the official openai client) for D seconds against
`shadowserve serve` (vLLM engine, bf16) with the shadow on at rate R, noise floor on.

    python bench/load_test.py --model DIR [--concurrency 64] [--duration 120] [--shadow-rate 0.1]

Prints the server's RSS every 5 s (the API process, and with vLLM's engine core) and a
summary: client errors, RSS growth after warm-up, vllm:num_requests_running at the end,
and the shadow's accounting (compared + dropped + skipped + error = sampled). Exits 1
when any of those fails: 0 errors, growth < 10 %, 0 running, every sample accounted for.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.serving_throughput import PROMPTS  # noqa: E402
from tests.servers import start_server  # noqa: E402


def metrics(url: str) -> dict[str, float]:
    """Sums by sample name and the label that matters here (outcome)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            key = s.name + (f"[{s.labels['outcome']}]" if "outcome" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def rss_mib(pid: int) -> tuple[float, float]:
    """(API process, API process + its children: vLLM's engine core)."""
    proc = psutil.Process(pid)
    own = proc.memory_info().rss
    children = sum(c.memory_info().rss for c in proc.children(recursive=True) if c.is_running())
    return own / 2**20, (own + children) / 2**20


async def client_load(url: str, model: str, concurrency: int, duration: float, max_tokens: int) -> tuple[int, int, list[str]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    deadline = time.monotonic() + duration
    done, tokens, errors = 0, 0, []

    async def worker(w: int) -> None:
        nonlocal done, tokens
        i = w
        while time.monotonic() < deadline:
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=max_tokens, temperature=0.8, stream=True, stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if chunk.usage:
                        tokens += chunk.usage.completion_tokens
                done += 1
            except Exception as exc:  # every client-side failure is reported, none retried
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    await client.close()
    return done, tokens, errors


async def sample_rss(pid: int, every: float, stop: asyncio.Event, started: float, rows: list) -> None:
    while not stop.is_set():
        own, total = rss_mib(pid)
        rows.append((time.monotonic() - started, own, total))
        print(f"  t={rows[-1][0]:6.1f}s  RSS api {own:8.1f} MiB   api+engine {total:8.1f} MiB", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def run(args, url: str, pid: int, model: str) -> dict:
    started, rows, stop = time.monotonic(), [], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, 5.0, stop, started, rows))
    done, tokens, errors = await client_load(url, model, args.concurrency, args.duration, args.max_tokens)
    wall = time.monotonic() - started
    stop.set()
    await sampler
    return {"done": done, "tokens": tokens, "errors": errors, "wall": wall, "rss": rows}


def accounted(m: dict[str, float]) -> float:
    return sum(m.get(f"shadow_samples_total[{o}]", 0.0) for o in ("compared", "dropped", "skipped", "error"))


def settle(url: str, timeout: float) -> dict[str, float]:
    """Wait until vLLM runs nothing and every sampled request has its outcome (the batch
    being scored is in neither the queue nor the outcomes), then read /metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        done = m.get("vllm:num_requests_running", 0) == 0 and accounted(m) == m.get("shadow_sampled_total", 0.0)
        if done or time.monotonic() > deadline:
            return m
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (requests started before it ends finish)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--shadow-rate", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before RSS growth is measured from")
    parser.add_argument("--settle", type=float, default=300.0,
                        help="seconds to wait after the load for the shadow to finish what it took")
    args = parser.parse_args()

    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_server(
        ["--model", str(args.model), "--dtype", "bfloat16", "--kv-cache-gib", "2", "--max-model-len", "1024",
         "--shadow-rate", str(args.shadow_rate)], log, unconfined=False)
    try:
        model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        print(f"load: {args.concurrency} concurrent streaming chats for {args.duration:.0f}s, "
              f"max_tokens {args.max_tokens}, shadow rate {args.shadow_rate} (server log: {log})", flush=True)
        result = asyncio.run(run(args, server.url, server.process.pid, model))
        m = settle(server.url, args.settle)
    finally:
        server.stop()

    rss = result["rss"]
    base = [r for r in rss if r[0] >= args.warmup][:1] or rss[-1:]
    tail = rss[-3:]
    growth = {i: (sum(r[i] for r in tail) / len(tail)) / base[0][i] - 1 for i in (1, 2)}
    outcomes = {o: m.get(f"shadow_samples_total[{o}]", 0.0) for o in ("compared", "dropped", "skipped", "error")}
    sampled = m.get("shadow_sampled_total", 0.0)
    running = m.get("vllm:num_requests_running", float("nan"))
    checks = {
        "client errors = 0": not result["errors"],
        "RSS growth after warm-up < 10 %": max(growth.values()) < 0.10,
        "vllm:num_requests_running = 0 at the end": running == 0,
        "compared + dropped + skipped + error = sampled": accounted(m) == sampled,
    }
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| requests completed | {result['done']} in {result['wall']:.0f} s ({result['tokens'] / result['wall']:.0f} output tok/s) |")
    print(f"| client errors | {len(result['errors'])} |")
    print(f"| RSS api: after warm-up -> end | {base[0][1]:.0f} -> {tail[-1][1]:.0f} MiB ({growth[1]:+.1%}) |")
    print(f"| RSS api+engine: after warm-up -> end | {base[0][2]:.0f} -> {tail[-1][2]:.0f} MiB ({growth[2]:+.1%}) |")
    print(f"| vllm:num_requests_running at the end | {running:.0f} |")
    print(f"| shadow sampled | {sampled:.0f} |")
    print(f"| shadow compared / dropped / skipped / error | {' / '.join(f'{v:.0f}' for v in outcomes.values())} |")
    for error in result["errors"][:5]:
        print(f"  error: {error}")
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
