"""Mounted LoRA adapters (vLLM's OpenAIServingModels): the names a request may give as
`model` besides the base, each loaded into the engine and, with the shadow on, onto
the reference, so its requests are judged against the base + that adapter in fp32.

An adapter is mounted on both or on neither: the reference first (a refusal there
leaves the engine untouched), then the engine (a refusal there unmounts it from the
reference). Unloading takes the name away at once (new requests get 404) and closes
its shadow lane; the engine keeps the weights for requests still running, as vLLM's
own unload does, and its LRU cache (--max-cpu-loras) lets them go.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

from server.engines import Engine, EngineInputError, LoraAdapter
from server.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from shadow.path import ShadowPath
from shadow.scoring import AdapterUnavailableError, ShadowReferenceError

log = logging.getLogger(__name__)


class AdapterRegistry:
    def __init__(self, engine: Engine, base_name: str, base_dir: Path, *, rank_limit: int, capacity: int,
                 shadow: ShadowPath | None = None, reference_dir: Path | None = None):
        """`reference_dir`: the reference's base, which the reference's copy of each
        adapter must fit too (default: `base_dir`)."""
        self.engine = engine
        self.base_name = base_name
        self.base_dir = base_dir
        self.reference_dir = reference_dir or base_dir
        self.rank_limit = rank_limit
        self.capacity = capacity
        self.shadow = shadow
        self._mounted: dict[str, LoraAdapter] = {}
        self._ids = itertools.count(1)  # vLLM's lora_int_id: never reused, so a reload is never mistaken for the old one
        self._lock = asyncio.Lock()

    @property
    def mounted(self) -> list[LoraAdapter]:
        return list(self._mounted.values())

    def resolve(self, model: str) -> LoraAdapter | None:
        """The adapter a request's `model` names; None for the base; 404 otherwise."""
        if model == self.base_name:
            return None
        adapter = self._mounted.get(model)
        if adapter is None:
            served = ", ".join(repr(n) for n in [self.base_name, *self._mounted])
            raise ModelNotFoundError(f"The model '{model}' does not exist; this server serves {served}", param="model")
        return adapter

    async def load(self, name: str, path: Path, reference_path: Path | None = None, *,
                   at_start: bool = False) -> LoraAdapter:
        """Check the adapter against the base, then mount it on the reference (its own
        copy at `reference_path`, default the same directory) and the engine. Errors are
        the client's (400, 404 for a missing directory).

        A remote reference that cannot take it (it does not hold the adapter and may not
        load it): at run time the adapter is served unshadowed (its verdict says why);
        `at_start` the AdapterUnavailableError is raised (the start is refused)."""
        from adapters.lora_adapter import (
            AdapterNotFoundError,
            LoraAdapterError,
            check_lora_adapter,
        )

        name = name.strip()
        if not name or any(c.isspace() for c in name):
            raise InvalidRequestError("lora_name must be non-empty, without spaces", param="lora_name")
        async with self._lock:
            if name == self.base_name:
                raise InvalidRequestError(f"The lora adapter '{name}' conflicts with the served base model.",
                                          param="lora_name")
            if name in self._mounted:
                raise InvalidRequestError(f"The lora adapter '{name}' has already been loaded; unload it first.",
                                          param="lora_name")
            if len(self._mounted) >= self.capacity:
                raise InvalidRequestError(
                    f"{len(self._mounted)} adapters are mounted, the most this server holds (--max-cpu-loras "
                    f"{self.capacity}): unload one first", param="lora_name")
            try:
                info = await asyncio.to_thread(check_lora_adapter, path, self.base_dir)
                if self.shadow is not None and self.shadow.scorer.state is None:
                    # In process, the reference's copy must fit its base (a remote reference checks its own).
                    await asyncio.to_thread(check_lora_adapter, reference_path or path, self.reference_dir)
            except AdapterNotFoundError as exc:
                raise NotFoundError(str(exc), param="lora_path") from exc
            except LoraAdapterError as exc:
                raise InvalidRequestError(str(exc), param="lora_path") from exc
            if info.rank > self.rank_limit:
                raise InvalidRequestError(
                    f"the adapter's rank {info.rank} is above this server's --max-lora-rank {self.rank_limit}",
                    param="lora_path")
            adapter = LoraAdapter(name, path, next(self._ids))
            unshadowed = None
            if self.shadow is not None:
                try:
                    unshadowed = await self.shadow.add_adapter(name, reference_path or path, adapter.id,
                                                               allow_unshadowed=not at_start)
                except AdapterUnavailableError:
                    raise
                except ShadowReferenceError as exc:
                    raise InvalidRequestError(f"the shadow's reference cannot mount it: {exc}", param="lora_path") from exc
            try:
                await self.engine.add_adapter(adapter)
            except BaseException as exc:  # refused, the engine gone, or cancelled: on both or on neither
                if self.shadow is not None:
                    await asyncio.shield(self.shadow.remove_adapter(name, served=False))
                if isinstance(exc, EngineInputError):
                    raise InvalidRequestError(str(exc), param="lora_path") from exc
                raise
            self._mounted[name] = adapter
        log.info("LoRA adapter %s mounted from %s (rank %d, alpha %g)%s%s", name, path, info.rank, info.alpha,
                 f"; the reference's copy: {reference_path}" if reference_path else "",
                 "; served UNSHADOWED" if unshadowed else "")
        return adapter

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._mounted:
                raise NotFoundError(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            del self._mounted[name]
            if self.shadow is not None:
                await self.shadow.remove_adapter(name)
        log.info("LoRA adapter %s unmounted", name)
