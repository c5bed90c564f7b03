"""`convert` and `merge-tp` stream: their peak memory stays near one tensor above the
interpreter, far below what loading the checkpoint (let alone two copies) would take."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, sys, threading, time
from pathlib import Path
import torch, safetensors, transformers  # noqa: F401  (their import cost is the baseline)
from adapters.internlm2 import convert_internlm2_to_llama
from adapters.tp_merge import merge_tp
tool = {"convert": convert_internlm2_to_llama, "merge-tp": merge_tp}[sys.argv[1]]

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

baseline, peak, done = anon_kib(), [0], False
def sample():
    while not done:
        peak[0] = max(peak[0], anon_kib()); time.sleep(0.002)
thread = threading.Thread(target=sample); thread.start()
tool(Path(sys.argv[2]), Path(sys.argv[3]))
done = True; thread.join()
print(json.dumps({"baseline_mib": baseline / 1024, "peak_mib": peak[0] / 1024}))
"""


def grown_mib(tool: str, src, dst) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, tool, str(src), str(dst)], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return figures["peak_mib"] - figures["baseline_mib"], figures["baseline_mib"]


LARGEST_MIB = 49152 * 576 * 4 / 2**20  # the embedding (and the untied output head)


def test_convert_peak_memory(internlm2_dir, tmp_path):
    grown, baseline = grown_mib("convert", internlm2_dir, tmp_path / "llama")
    model_mib = (internlm2_dir / "model.safetensors").stat().st_size / 2**20
    print(f"\nconvert: model {model_mib:.0f} MiB, largest tensor {LARGEST_MIB:.0f} MiB, "
          f"anonymous memory grew {grown:.0f} MiB over a {baseline:.0f} MiB baseline")
    assert grown < LARGEST_MIB + 64  # about one (merged) tensor
    assert grown < model_mib / 2


def test_merge_tp_peak_memory_on_internevo_shards(internevo_sets, tmp_path):
    """TP=3 x PP=3 `.pt` shards, memory-mapped; wqkv un-permuted on the way through."""
    src = internevo_sets("native-interleaved-rotary")[0]
    grown, baseline = grown_mib("merge-tp", src, tmp_path / "merged")
    model_mib = sum(p.stat().st_size for p in src.glob("model_tp*.pt")) / 2**20
    print(f"\nmerge-tp: shards {model_mib:.0f} MiB, largest tensor {LARGEST_MIB:.0f} MiB, "
          f"anonymous memory grew {grown:.0f} MiB over a {baseline:.0f} MiB baseline")
    assert grown < LARGEST_MIB + 64  # about one (merged) tensor
    assert grown < model_mib / 2
