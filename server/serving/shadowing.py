"""The handlers' side of the shadow path: decide at admission, then hand over a finished
sample. Unsampled requests get no tap and pay nothing.

A sampled request's choices are accumulated once, by the step that accumulates them anyway:
a whole response's by generation.collect (`collected` hands them to the tap), a stream's by
the tee (`tapped`: the events only forward pieces, so the tee is the one accumulation)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from server.engines import EngineChunk, LoraAdapter
from server.errors import InvalidRequestError
from server.serving.generation import Choice, Job, collect, in_order, new_choices
from shadow.candidate import CandidateLogprobs
from shadow.path import ShadowHeaderError, ShadowPath
from shadow.queue import ShadowSample, ShadowSequence

log = logging.getLogger(__name__)


class ShadowTap:
    """Collects a sampled request's sequences; submits them only if it finished normally."""

    def __init__(self, shadow: ShadowPath, request_id: str, model: str, adapter: LoraAdapter | None = None):
        self._shadow = shadow
        self._request_id = request_id
        self._model = model
        # The mounted LoRA adapter (None: the base): the sample's lane, and which load of it.
        self._adapter, self._adapter_id = (adapter.name, adapter.id) if adapter else ("", 0)
        self.top_k = shadow.top_k

    @classmethod
    def open(cls, shadow: ShadowPath | None, header: str | None, request_id: str, model: str,
             adapter: LoraAdapter | None = None) -> ShadowTap | None:
        if shadow is None:
            return None
        try:
            sampled = shadow.admit(header, adapter.name if adapter else "", adapter.id if adapter else 0)
        except ShadowHeaderError as exc:
            raise InvalidRequestError(str(exc), param="X-Shadow") from exc
        return cls(shadow, request_id, model, adapter) if sampled else None

    def finish(self, choices: Sequence[Choice]) -> None:
        try:
            sequences = [
                # Packed here: while queued, the log-probs are two flat arrays, not dicts.
                ShadowSequence(c.prompt_ids, c.token_ids,
                               CandidateLogprobs.pack(self._trim(entry, token) for entry, token in zip(c.logprobs, c.token_ids)))
                for c in choices
                if c.finish_reason is not None
            ]
            self._shadow.submit(ShadowSample(self._request_id, self._model, sequences, adapter=self._adapter,
                                             adapter_id=self._adapter_id))
        except Exception:  # the client's answer is done; a shadow bug must not touch it
            log.exception("shadow: could not hand over request %s", self._request_id)
            self._shadow.skip(self._adapter, "error")

    def abandon(self) -> None:
        try:
            self._shadow.skip(self._adapter)
        except Exception:
            log.exception("shadow: could not count a skipped request")

    def _trim(self, entry: dict[int, float], token: int) -> dict[int, float]:
        """The shadow's top-k plus the emitted token, whatever the client asked for, so
        every request is compared over the same K."""
        if len(entry) <= self.top_k + 1:
            return entry
        kept = dict(sorted(entry.items(), key=lambda item: item[1], reverse=True)[: self.top_k])
        kept[token] = entry[token]
        return kept


Chunks = AsyncIterator[tuple[int, EngineChunk]]


async def collected(jobs: list[Job], stream: Chunks, tap: ShadowTap | None) -> list[Choice]:
    """A whole response's choices (generation.collect, which closes the stream); a sampled
    request hands those same choices to the tap when the stream ended normally (aborted or
    failed: counted as skipped, once)."""
    if tap is None:
        return await collect(jobs, stream)
    try:
        choices = await collect(jobs, stream)
    except BaseException:  # client gone (cancelled) or engine failure
        tap.abandon()
        raise
    tap.finish(choices)
    return choices


def tapped(stream: Chunks, jobs: list[Job], tap: ShadowTap | None) -> Chunks:
    """A streamed response's engine stream, unchanged for the client; a sampled request's
    choices are accumulated here and go to the tap when the stream ends normally (aborted
    or failed: counted as skipped, once). Unsampled: the stream itself, no layer added."""
    if tap is None:
        return stream

    async def tee() -> Chunks:
        choices = new_choices(jobs)
        try:
            async with aclosing(stream):  # closing this closes the engine stream (aborts) now, not at GC
                async for index, chunk in stream:
                    choices[index].add(chunk)
                    yield index, chunk
        except BaseException:  # client gone (GeneratorExit/cancel) or engine failure
            tap.abandon()
            raise
        tap.finish(in_order(choices))

    return tee()
