"""The container images, checked statically (no container engine runs on this machine, see
docs/kubernetes.md, "Container images"): pinned to the versions pyproject.toml pins, non-root, no model
inside, `shadowserve serve` by default, and named by the chart's default image."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "docker" / name).read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def pins() -> dict[str, str]:
    specs = PYPROJECT["project"]["dependencies"] + [s for extra in PYPROJECT["project"]["optional-dependencies"].values()
                                                    for s in extra]
    return dict(re.fullmatch(r"([\w.-]+)==([\w.]+)", s).groups() for s in specs if "==" in s)


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_image_basics(name):
    steps = instructions(name)
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0") and steps.index(("USER", users[-1])) > max(
        i for i, (op, _) in enumerate(steps) if op == "RUN"), "the last RUN must come before the non-root USER"
    assert ("ENTRYPOINT", '["shadowserve"]') in steps and steps[-1] == ("CMD", '["serve"]')
    copies = [args.split()[:-1] for op, args in steps if op == "COPY"]
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not source.startswith((".cache", "models")) and "safetensors" not in source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".cache" in ignored  # the demo model and caches stay out of the context
    assert any(op == "ENV" and "HF_HUB_OFFLINE=1" in args for op, args in steps)  # weights are mounted, never fetched


def test_gpu_image_is_vllms_own_at_the_pinned_version():
    steps = instructions("Dockerfile.gpu")
    assert steps[0] == ("FROM", f"vllm/vllm-openai:v{pins()['vllm']}")
    installed = dict(re.findall(r'"([\w.-]+)==([\w.]+)"', " ".join(args for op, args in steps if op == "RUN")))
    assert installed and all(pins()[name] == version for name, version in installed.items()), installed


def test_cpu_image_pins_as_make_install_does():
    runs = " ".join(args for op, args in instructions("Dockerfile.cpu") if op == "RUN")
    assert f'"torch=={pins()["torch"]}"' in runs and '"/opt/shadowserve[cpu]"' in runs
    assert "pip uninstall -y torchvision torchaudio torchcodec" in runs


def test_the_chart_names_the_gpu_image():
    values = yaml.safe_load((ROOT / "helm" / "shadowserve" / "values.yaml").read_text())
    header = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert f"-t {values['image']['repository']}:{values['image']['tag']} " in header
    assert values["image"]["tag"] == PYPROJECT["project"]["version"]
    assert json.loads(instructions("Dockerfile.gpu")[-2][1]) == ["shadowserve"]
