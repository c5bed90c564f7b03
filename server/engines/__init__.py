"""Engines behind one protocol; `load_engine` imports only the one asked for."""

from __future__ import annotations

from server.engines.base import Engine, EngineChunk, EngineDeadError, EngineInputError, LoraAdapter, SamplingOptions
from server.settings import EngineSettings

__all__ = ["Engine", "EngineChunk", "EngineDeadError", "EngineInputError", "LoraAdapter", "SamplingOptions", "load_engine"]


def load_engine(settings: EngineSettings) -> Engine:
    """Blocking: loads weights (and for vLLM starts the engine-core process)."""
    if settings.engine == "vllm":
        from server.engines.vllm_engine import VllmEngine

        return VllmEngine.load(settings)
    from server.engines.transformers_engine import TransformersEngine

    return TransformersEngine.load(settings.model, settings.dtype, settings.max_model_len, settings.trust_remote_code)
