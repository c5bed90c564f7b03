"""What every handler needs: the engine, the tokenizer, the served name and limits.
Built by server/assembly.py."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from server.engines import Engine, LoraAdapter
from server.errors import ModelNotFoundError
from server.serving.adapters import AdapterRegistry
from server.serving.prompts import PromptRenderer
from server.serving.validation import RequestValidator
from shadow.path import ShadowPath
from shadow.scoring import AdapterUnavailableError, ReferenceLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingContext:
    engine: Engine
    renderer: PromptRenderer
    model_name: str
    validator: RequestValidator  # every request limit (server/serving/validation.py)
    shadow: ShadowPath | None = None
    adapters: AdapterRegistry | None = None  # mounted LoRA adapters (None: the base only)

    async def mount(self, mounts: list[tuple[str, Path]], reference_paths: dict[str, Path] | None = None) -> None:
        """The --lora-modules adapters, on the engine and the reference (its own copy where
        given), before serving: an APIError here stops the start, with its message, and
        one the reference cannot take (not held, other weights) is a ReferenceRefusedError."""
        for name, path in mounts:
            try:
                await self.adapters.load(name, path, (reference_paths or {}).get(name), at_start=True)
            except AdapterUnavailableError as exc:
                raise ReferenceRefusedError(str(exc)) from exc

    def resolve(self, requested: str) -> LoraAdapter | None:
        """The mounted adapter a request's `model` names, None for the base; 404 for any other name."""
        if self.adapters is not None:
            return self.adapters.resolve(requested)
        if requested != self.model_name:
            raise ModelNotFoundError(
                f"The model '{requested}' does not exist; this server serves '{self.model_name}'",
                param="model",
            )
        return None


class ReferenceRefusedError(ReferenceLoadError):
    """The reference does not fit this server (its noise floor's dtype, a mounted adapter
    it does not hold or holds other weights of): a refusal at start, exit 2."""


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
