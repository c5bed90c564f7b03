"""The LoRA adapters a reference service holds: one fp32 base shared by all of them
(peft's multi-adapter model, shadow/local_scorer.py), each known by its name and its
content hash (adapters/lora_identity.py).

- `--lora-modules NAME=DIR` mounts adapters at start (pinned: never unloaded at run time).
- With `--allow-runtime-lora-updating`, POST /v1/load_lora_adapter and
  /v1/unload_lora_adapter change the set, and a score request naming an adapter this
  process does not hold loads it from the path the request gives: a restarted reference,
  or one more replica behind the Service, takes up what the candidates serve without a
  round trip of their own. A load of a name already held with the same content is a
  no-op (many candidate replicas load the same adapter); with other content it is refused
  (409), never swapped under the candidates that use it.
- At most `capacity` adapters are held (`--max-adapters`); a load past it is refused.

A score with an adapter holds the registry's lock from the adapter's check to the end
of the forward, so an unload cannot slip in between; while the lock is held (a load, or
another adapter's forward) the request is refused at once (503: the caller retries, as
for a busy reference).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from server.errors import ConflictError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from shadow.scoring import ADAPTER_CONFLICT, ADAPTER_NOT_LOADED, AdapterInfo, AdapterRef, ShadowReferenceError

log = logging.getLogger(__name__)


class ReferenceAdapters:
    def __init__(self, scorer, base_dir: Path, *, runtime_updating: bool, capacity: int):
        """`scorer`: the LocalScorer (add_adapter / remove_adapter, blocking)."""
        self._scorer = scorer
        self._base_dir = base_dir
        self.runtime_updating = runtime_updating
        self.capacity = capacity
        self._held: dict[str, AdapterInfo] = {}
        self._lock = asyncio.Lock()

    def infos(self) -> list[AdapterInfo]:
        return list(self._held.values())

    def mount_at_start(self, mounts: list[tuple[str, Path]]) -> None:
        """Blocking, before the app serves: the --lora-modules adapters, pinned.
        ShadowReferenceError (or the adapter tools' errors) when one cannot be mounted."""
        for name, path in mounts:
            self._held[name] = self._mount(name, path, pinned=True)
            log.info("adapter %s mounted from %s (sha256 %s)", name, path, self._held[name].sha256[:12])

    def _mount(self, name: str, path: Path, pinned: bool, sha256: str | None = None) -> AdapterInfo:
        """Blocking: check the adapter against the base, hash it, mount it on the scorer."""
        from adapters.lora_adapter import check_lora_adapter
        from adapters.lora_identity import adapter_sha256

        check_lora_adapter(path, self._base_dir)
        digest = adapter_sha256(path)
        if sha256 is not None and digest != sha256:
            raise _conflict(name, sha256, digest, f"the adapter at {path}")
        self._scorer.add_adapter(name, path)
        return AdapterInfo(name=name, sha256=digest, path=str(path), pinned=pinned)

    async def load(self, name: str, path: Path, sha256: str | None = None) -> AdapterInfo:
        """Mount `path` as `name` (a no-op when that content is held under that name).
        Errors are the caller's: 404 no adapter there, 400 not mountable, 409 other
        content under the name (or, given `sha256`, at the path)."""
        async with self._lock:
            return await self._load_locked(name, path, sha256)

    async def _load_locked(self, name: str, path: Path, sha256: str | None = None) -> AdapterInfo:
        from adapters.lora_adapter import AdapterNotFoundError, LoraAdapterError
        from adapters.lora_identity import adapter_sha256

        held = self._held.get(name)
        try:
            if held is not None:
                digest = await asyncio.to_thread(adapter_sha256, path)
                if digest != held.sha256:
                    raise _conflict(name, held.sha256, digest, f"the adapter at {path}")
                return held
            if len(self._held) >= self.capacity:
                raise InvalidRequestError(f"this reference holds {len(self._held)} adapters, its most (--max-adapters "
                                          f"{self.capacity}): unload one first", param="lora_name")
            info = await asyncio.to_thread(self._mount, name, path, False, sha256)
        except AdapterNotFoundError as exc:
            raise NotFoundError(str(exc), param="lora_path") from exc
        except (LoraAdapterError, ShadowReferenceError) as exc:
            raise InvalidRequestError(f"the reference cannot mount {name}: {exc}", param="lora_path") from exc
        self._held[name] = info
        log.info("adapter %s loaded from %s (sha256 %s)", name, path, info.sha256[:12])
        return info

    async def unload(self, name: str) -> None:
        async with self._lock:
            held = self._held.get(name)
            if held is None:
                raise NotFoundError(f"the adapter {name} is not on this reference", param="lora_name",
                                    code=ADAPTER_NOT_LOADED)
            if held.pinned:
                raise InvalidRequestError(f"the adapter {name} was mounted at start (--lora-modules): it stays until "
                                          "the reference restarts without it", param="lora_name")
            await asyncio.to_thread(self._scorer.remove_adapter, name)
            del self._held[name]
        log.info("adapter %s unloaded", name)

    @asynccontextmanager
    async def applied(self, ref: AdapterRef) -> AsyncIterator[None]:
        """Held while a forward with `ref` runs: the adapter is there, with that content."""
        if self._lock.locked():
            raise ServiceUnavailableError("the reference is busy loading an adapter or scoring another one")
        async with self._lock:
            held = self._held.get(ref.name)
            if held is None:
                if not self.runtime_updating or ref.path is None:
                    why = "it does not allow run-time loads (--allow-runtime-lora-updating)" if not self.runtime_updating \
                        else "the request gives no path to load it from"
                    raise NotFoundError(f"the adapter {ref.name} is not on this reference, and {why}",
                                        param="adapter.name", code=ADAPTER_NOT_LOADED)
                try:
                    held = await self._load_locked(ref.name, Path(ref.path), ref.sha256)
                except (NotFoundError, InvalidRequestError) as exc:  # no adapter there, not mountable, full
                    raise NotFoundError(f"the adapter {ref.name} is not on this reference, and it could not be loaded "
                                        f"from {ref.path}: {exc.message}", param="adapter.path",
                                        code=ADAPTER_NOT_LOADED) from exc
            if held.sha256 != ref.sha256:
                raise _conflict(ref.name, held.sha256, ref.sha256, "the candidate's")
            yield


def _conflict(name: str, held: str, other: str, whose: str) -> ConflictError:
    return ConflictError(f"the reference holds other weights under the name {name} (sha256 {held[:12]}) than "
                         f"{whose} (sha256 {other[:12]})", param="adapter", code=ADAPTER_CONFLICT)
