"""A narrow engine double for the unit tests of the request path (no model, no threads):
it yields a fixed script per request and records which requests were closed early."""

from __future__ import annotations

import asyncio

from server.engines import EngineChunk


class ScriptedEngine:
    """Yields a fixed script per request; records which requests were closed early."""

    name = "scripted"
    max_model_len = 100

    def __init__(self, script=None, error: Exception | None = None):
        self.script = script or [EngineChunk([5], "x"), EngineChunk([6], "y", finish_reason="length")]
        self.error = error
        self.closed: list[str] = []

    async def generate(self, prompt_ids, options, request_id, adapter=None):
        try:
            for chunk in self.script:
                await asyncio.sleep(0)
                yield chunk
            if self.error:
                raise self.error
        finally:
            self.closed.append(request_id)

    async def shutdown(self):
        pass

