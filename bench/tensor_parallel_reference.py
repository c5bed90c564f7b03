"""The reference service over N tensor-parallel ranks on CPU (torchrun, gloo): memory per
rank and scored tokens/s, N = 1 (the plain one-process `shadowserve reference`) and N = 3,
side by side in one run. fp32 reference + bf16 noise copy, --device cpu.

    python bench/tensor_parallel_reference.py --model DIR [--sizes 1,3] [--repeats 5]

Memory: each rank's RSS (at /health, and with USS after the timed batches) against the
checkpoint's fp32 + bf16 weight bytes / N (from the safetensors header). Throughput: a
fixed batch (4 x (64 prompt + 64 output) tokens), median of --repeats after a warm-up,
with the noise floor (noise_top_k=8) and without.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.report import cpu_name, print_table  # noqa: E402
from shadow.remote_scorer import RemoteScorer  # noqa: E402
from shadow.scoring import ScoreItem  # noqa: E402
from tests.servers import free_port  # noqa: E402

MIB = 2**20
TOKEN = "bench-token"
MARKER = "SHADOWSERVE_TP_BENCH"
TEXT = ("The lighthouse keeper climbed the spiral stairs every evening, lit the lamp, and wrote in his log "
        "the ships that passed, the weather, and the birds that rested on the rail before the long night. ")


def parameter_count(model: Path) -> int:
    """Parameters in the checkpoint's safetensors files (their headers only)."""
    total = 0
    for path in sorted(model.glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def batch(model: Path, items: int, prompt: int, output: int) -> list[ScoreItem]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model).encode(TEXT) * 20
    out = []
    for i in range(items):  # each item its own window of the text
        window = ids[i * 7: i * 7 + prompt + output]
        out.append(ScoreItem(window[:prompt], window[prompt:], [[t] for t in window[prompt:]]))
    return out


def start(model: Path, size: int, tag: str, log: Path) -> tuple[subprocess.Popen, str]:
    """The service in a process group of its own; waits for /health."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "reference", "--model", str(model), "--port", str(port),
           "--tokens", TOKEN, "--device", "cpu", "--noise-dtype", "bfloat16"]
    cmd += ["--tensor-parallel-size", str(size)] if size > 1 else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", MARKER: tag}
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                               cwd=Path(__file__).resolve().parents[1])
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        time.sleep(0.5)
    stop(process, tag)
    raise SystemExit(f"N={size}: the service did not start:\n{log.read_text()[-3000:]}")


def rank_processes(process: subprocess.Popen, size: int) -> list[psutil.Process]:
    """N=1: the service itself; else the torchrun agent's children running server.cli with RANK set."""
    root = psutil.Process(process.pid)
    if size == 1:
        return [root]
    found = [p for p in root.children(recursive=True)
             if "server.cli" in " ".join(p.cmdline()) and p.environ().get("RANK") is not None]
    return sorted(found, key=lambda p: int(p.environ()["RANK"]))


def marked(tag: str) -> list[psutil.Process]:
    """Every live process started with this tag in its environment."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found += [p] if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARKER) == tag else []
    return found


def stop(process: subprocess.Popen, tag: str) -> None:
    """SIGTERM to the group, SIGKILL to what is left after 30 s; then nothing with the tag may be left."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if marked(tag):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait
        while marked(tag) and time.monotonic() < deadline:
            time.sleep(0.5)
    process.wait(timeout=10)
    assert not (left := marked(tag)), f"left running: {[p.pid for p in left]}"


async def timed(url: str, items: list[ScoreItem], repeats: int) -> dict[str, float]:
    """Median seconds per batch, without and with the noise floor (one warm-up each)."""
    remote = RemoteScorer.connect(url, TOKEN, timeout=600)
    remote.enable_noise_floor("bfloat16")
    out = {}
    for label, noise in (("plain", None), ("noise", 8)):
        await remote.score(items, top_m=5, noise_top_k=noise)
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            await remote.score(items, top_m=5, noise_top_k=noise)
            times.append(time.perf_counter() - begin)
        out[label] = statistics.median(times)
    await remote.close()
    return out


def measure(model: Path, size: int, items: list[ScoreItem], repeats: int, tmp: Path) -> dict:
    tag = uuid.uuid4().hex
    began = time.monotonic()
    process, url = start(model, size, tag, tmp / f"reference-{size}.log")
    try:
        ranks = rank_processes(process, size)
        assert len(ranks) == size, f"found {len(ranks)} rank processes for N={size}"
        ready_rss = [p.memory_info().rss for p in ranks]
        started_s = time.monotonic() - began
        seconds = asyncio.run(timed(url, items, repeats))
        full = [p.memory_full_info() for p in ranks]
        threads = ranks[0].environ().get("OMP_NUM_THREADS", "unset")
    finally:
        stop(process, tag)
    return {"ready_rss": ready_rss, "rss": [m.rss for m in full], "uss": [m.uss for m in full], **seconds,
            "threads": threads, "start_s": started_s}


def runtime_floor() -> float:
    """RSS (MiB) of a bare process that imports torch and transformers: every rank pays it."""
    code = "import psutil, torch; from transformers import AutoModelForCausalLM; print(psutil.Process().memory_info().rss)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--sizes", default="1,3")
    parser.add_argument("--repeats", type=int, default=5)
    for name in ("items", "prompt", "output"):
        parser.add_argument(f"--{name}", type=int, default=4 if name == "items" else 64)
    args = parser.parse_args()
    items = batch(args.model, args.items, args.prompt, args.output)
    weights = parameter_count(args.model) * (4 + 2)  # fp32 reference + bf16 noise copy
    scored, forwarded = args.items * args.output, args.items * (args.prompt + args.output)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            r = measure(args.model, size, items, args.repeats, Path(tmp))
            mib = lambda xs: " / ".join(f"{x / MIB:.0f}" for x in xs)  # noqa: E731
            plain, noise = r["plain"], r["noise"]
            rows.append((str(size), r["threads"], mib(r["ready_rss"]), mib(r["rss"]), mib(r["uss"]),
                         f"{sum(r['rss']) / MIB:.0f}", f"{weights / size / MIB:.0f}", f"{r['start_s']:.0f}",
                         f"{plain:.2f}", f"{noise:.2f}", f"{scored / plain:.0f}", f"{scored / noise:.0f}",
                         f"{forwarded / plain:.0f}", f"{forwarded / noise:.0f}"))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"\n{args.model.name}, fp32 + bf16 noise copy ({weights / MIB:.0f} MiB of weights), {cpu_name()}, "
          f"{os.cpu_count()} cores, avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}; "
          f"bench OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"batch: {args.items} items x ({args.prompt} prompt + {args.output} output) tokens; median of "
          f"{args.repeats} after 1 warm-up; memory after the timed batches; per-rank figures rank 0 / 1 / ...")
    print(f"a bare process importing torch + transformers (each rank's floor): {runtime_floor():.0f} MiB RSS\n")
    print_table(["N", "OMP_NUM_THREADS per rank", "RSS at ready (MiB)", "RSS after (MiB)", "USS after (MiB)",
                 "sum RSS (MiB)", "weights / N (MiB)", "start s", "s/batch", "s/batch, noise",
                 "scored tok/s", "scored tok/s, noise", "forwarded tok/s", "forwarded tok/s, noise"], rows)


if __name__ == "__main__":
    main()
