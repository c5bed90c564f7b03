"""`convert`, `merge-tp` and diagnose's weight pass stream: their peak memory stays near one
tensor (two for diagnose) above the interpreter, far below what loading the checkpoint (let
alone two copies) would take."""

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
from adapters.diagnose.weights import weight_pass
tool = {"convert": convert_internlm2_to_llama, "merge-tp": merge_tp,
        "diagnose": lambda cand, ref: weight_pass(cand, ref, "auto", progress=False)}[sys.argv[1]]

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

baseline, peak, done = anon_kib(), [0], False
def sample():
    while not done:
        peak[0] = max(peak[0], anon_kib()); time.sleep(0.002)
thread = threading.Thread(target=sample); thread.start()
try:
    tool(Path(sys.argv[2]), Path(sys.argv[3]))
finally:
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


def test_diagnose_weight_pass_peak_memory(demo_model, tmp_path):
    """The worst case: every tensor of a bf16 candidate differs (1% noise), so each pair goes
    down the whole ladder, the low-rank test materialising the fp32 difference included."""
    import torch

    from tests.candidates import _with_weights

    def noisy(weights, config):
        generator = torch.Generator().manual_seed(0)
        for name, tensor in weights.items():
            noise = torch.randn(tensor.shape, generator=generator)
            weights[name] = (tensor * (1 + 0.01 * noise)).to(torch.bfloat16)

    candidate = _with_weights(demo_model, tmp_path / "noisy", noisy)
    grown, baseline = grown_mib("diagnose", candidate, demo_model)
    model_mib = (demo_model / "model.safetensors").stat().st_size / 2**20
    print(f"\ndiagnose weights: models {model_mib:.0f} + {model_mib / 2:.0f} MiB, largest tensor {LARGEST_MIB:.0f} MiB, "
          f"anonymous memory grew {grown:.0f} MiB over a {baseline:.0f} MiB baseline")
    assert grown < 2 * LARGEST_MIB + 64  # about two of the largest tensors
