"""`shadowserve verify` as a user runs it (a subprocess), on its fast path: the
transformers engine in fp32, llama.cpp's corpus mode, 8 windows of 128 tokens."""

from __future__ import annotations

import subprocess
import sys

CORPUS = """The history of Rome spans over two and a half thousand years. It began as a small settlement on the
Tiber river in the eighth century before the common era and grew into a republic, then an empire that dominated
the Mediterranean world. Roman law, engineering and language shaped Europe for centuries after the fall of the
western empire. Aqueducts carried water across valleys, roads linked distant provinces, and Latin became the root
of many modern languages. The city itself, built on seven hills, was home to about a million people at its height.
Water covers most of the surface of the Earth. It evaporates from the oceans, rises as vapour, cools into clouds and
falls again as rain or snow. Rivers carry it back to the sea, and the cycle begins again. Plants draw water from the
soil through their roots and release it through their leaves, which is one reason forests shape the weather around them.
""" * 8


def run_verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "verify", *args], capture_output=True, text=True, timeout=600)


FAST = ["--engine", "transformers", "--dtype", "float32", "--context", "128", "--samples", "8"]
