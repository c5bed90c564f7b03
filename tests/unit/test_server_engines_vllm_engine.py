"""VllmEngine's streams over a stand-in for vLLM's AsyncLLM (no engine is started): closing
the engine's stream closes vLLM's at once, which is what aborts the vLLM request, not
whenever the garbage collector gets to it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from server.engines import EngineInputError, SamplingOptions
from server.engines.vllm_engine import VllmEngine


class StandInLLM:
    """AsyncLLM.generate as the engine reads it: DELTA outputs, one token each, until closed."""

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.closed: list[str] = []

    async def generate(self, prompt, params, request_id, lora_request=None):
        try:
            for i in range(1000):
                await asyncio.sleep(0)
                if self.error is not None:
                    raise self.error
                output = SimpleNamespace(token_ids=[i], text=f"t{i}", logprobs=None, finish_reason=None)
                yield SimpleNamespace(outputs=[output], finished=False)
        finally:
            self.closed.append(request_id)


def test_closing_the_engine_stream_closes_vllms_at_once():
    async def scenario():
        llm = StandInLLM()
        stream = VllmEngine(llm, 100, "float32").generate([1, 2], SamplingOptions(max_tokens=50), "r-0")
        first = await anext(stream)
        await stream.aclose()
        return first, list(llm.closed)  # read before the event loop runs anything else

    first, closed = asyncio.run(scenario())
    assert (first.token_ids, first.text, first.finish_reason) == ([0], "t0", None)
    assert closed == ["r-0"]


def test_a_refused_request_is_an_input_error_and_its_stream_is_closed():
    from vllm.exceptions import VLLMValidationError

    llm = StandInLLM(error=VLLMValidationError("seed out of range"))

    async def scenario():
        async for _ in VllmEngine(llm, 100, "float32").generate([1], SamplingOptions(max_tokens=5), "r-1"):
            pass

    with pytest.raises(EngineInputError, match="seed out of range"):
        asyncio.run(scenario())
    assert llm.closed == ["r-1"]
