"""`convert` streams: its peak memory stays near one tensor above the interpreter, far
below what loading the checkpoint (let alone two copies) would take."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, sys, threading, time
from pathlib import Path
import torch, safetensors, transformers  # noqa: F401  (their import cost is the baseline)
from adapters.internlm2 import convert_internlm2_to_llama

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

baseline, peak, done = anon_kib(), [0], False
def sample():
    while not done:
        peak[0] = max(peak[0], anon_kib()); time.sleep(0.002)
thread = threading.Thread(target=sample); thread.start()
convert_internlm2_to_llama(Path(sys.argv[1]), Path(sys.argv[2]))
done = True; thread.join()
print(json.dumps({"baseline_mib": baseline / 1024, "peak_mib": peak[0] / 1024}))
"""


def test_convert_peak_memory(internlm2_dir, tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(internlm2_dir), str(tmp_path / "llama")],
                         capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    model_mib = (internlm2_dir / "model.safetensors").stat().st_size / 2**20
    largest_mib = 49152 * 576 * 4 / 2**20  # the embedding (and the untied output head)
    grown = figures["peak_mib"] - figures["baseline_mib"]
    print(f"\nconvert: model {model_mib:.0f} MiB, largest tensor {largest_mib:.0f} MiB, "
          f"anonymous memory grew {grown:.0f} MiB over a {figures['baseline_mib']:.0f} MiB baseline")
    assert grown < largest_mib * 2 + 64
    assert grown < model_mib / 2
