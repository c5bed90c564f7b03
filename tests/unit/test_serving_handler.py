"""The request flow chat and completions share (server/serving/handler.py), on the real
ChatHandler with a scripted engine and a shadow that records each outcome: a sampled
request ends as exactly one outcome (one submit if it finished, one skip otherwise),
its choices are accumulated once, the client's answer is the same sampled or not, and
every stream is closed explicitly (at once, not by the garbage collector) however the
response ends."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json

import pytest

from server.engines import EngineChunk, EngineDeadError, EngineInputError, SamplingOptions
from server.errors import ContextLengthError, InvalidRequestError, ServiceUnavailableError
from server.protocol import ChatCompletionRequest
from server.serving.chat import ChatHandler
from server.serving.context import ServingContext
from server.serving.generation import Choice, Job, plan_jobs, run_jobs
from server.serving.handler import started
from server.serving.shadowing import ShadowTap, collected, tapped
from server.serving.sse import EventStream
from server.serving.validation import RequestValidator
from tests.fakes import ScriptedEngine

PROMPT = [1, 2, 3]
SCRIPT = [
    EngineChunk([5], "x", logprobs=[{5: -0.1, 8: -2.0, 9: -3.0}]),
    EngineChunk([6], "y", logprobs=[{7: -0.5, 6: -1.5, 9: -4.0}], finish_reason="length"),
]


class Renderer:
    """Every chat is the same three prompt tokens."""

    def chat(self, messages) -> list[int]:
        return list(PROMPT)

    def token_text(self, token_id: int) -> str:
        return f"<{token_id}>"


class Shadow:
    """The shadow path as ShadowTap sees it, recording every outcome it is handed."""

    top_k = 1

    def __init__(self, sampled: bool = True, failing: bool = False):
        self.sampled, self.failing = sampled, failing
        self.samples: list = []
        self.skips: list[str] = []

    def admit(self, header=None, adapter="", adapter_id=None) -> bool:
        return self.sampled

    def submit(self, sample) -> None:
        if self.failing:
            raise RuntimeError("a shadow bug")
        self.samples.append(sample)

    def skip(self, adapter="", outcome="skipped") -> None:
        self.skips.append(outcome)


def handler(engine, shadow=None, cls: type[ChatHandler] = ChatHandler) -> ChatHandler:
    validator = RequestValidator(max_n=4, max_logprobs=5)
    return cls(ServingContext(engine=engine, renderer=Renderer(), model_name="m", validator=validator, shadow=shadow))


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields})


async def serve(response: EventStream, fail_at: int | None = None) -> list[dict]:
    """Run the streamed response as an ASGI app; the client leaves (the send fails) at
    message `fail_at`. Returns the events it received ([DONE] as the string)."""
    sent: list[dict] = []

    async def send(message):
        if len(sent) == fail_at:
            raise OSError("connection reset")
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    with contextlib.suppress(Exception):
        await response({"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST"}, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    frames = [f.removeprefix("data: ") for f in body.split("\n\n") if f]
    return [f if f == "[DONE]" else json.loads(f) for f in frames]


def endless(streaming: asyncio.Event):
    """A script that never ends: the engine streams until its stream is closed."""
    for i in itertools.count():
        streaming.set()
        yield EngineChunk([10 + i % 5], "z")


@pytest.fixture
def adds(monkeypatch) -> list[int]:
    """Every Choice.add call (the accumulation of one chunk into a choice), by choice index."""
    calls: list[int] = []
    add = Choice.add

    def counted(self, chunk):
        calls.append(self.index)
        add(self, chunk)

    monkeypatch.setattr(Choice, "add", counted)
    return calls


# --- a request that ends normally ------------------------------------------------------


def test_a_finished_sampled_request_submits_once_and_accumulates_each_chunk_once(adds):
    plain = asyncio.run(handler(ScriptedEngine(SCRIPT)).create(chat(n=2)))
    adds.clear()
    shadow = Shadow()
    reply = asyncio.run(handler(ScriptedEngine(SCRIPT), shadow).create(chat(n=2)))
    assert sorted(adds) == [0, 0, 1, 1]  # 2 choices x 2 chunks, each once: no second copy for the tap
    assert [c.model_dump() for c in reply.choices] == [c.model_dump() for c in plain.choices]
    assert [c.message.content for c in reply.choices] == ["xy", "xy"]
    assert shadow.skips == [] and len(shadow.samples) == 1
    (sample,) = shadow.samples
    assert sample.request_id == reply.id and sample.model == "m"
    assert [(s.prompt_ids, s.output_ids) for s in sample.sequences] == [(PROMPT, [5, 6])] * 2
    # Trimmed to the shadow's top-1 plus the emitted token.
    assert sample.sequences[0].logprobs.to_dicts() == [{5: pytest.approx(-0.1)}, {7: -0.5, 6: -1.5}]


def test_a_finished_sampled_stream_submits_once_after_the_last_event(adds):
    plain = asyncio.run(_stream(ScriptedEngine(SCRIPT), None))
    adds.clear()
    shadow = Shadow()
    events = asyncio.run(_stream(ScriptedEngine(SCRIPT), shadow))
    assert adds == [0, 0]  # the tee's accumulation, once per chunk; the events only forward pieces
    assert _contents(events) == _contents(plain) == [("", None), ("x", None), ("y", "length"), "[DONE]"]
    assert shadow.skips == [] and len(shadow.samples) == 1
    assert [s.output_ids for s in shadow.samples[0].sequences] == [[5, 6]]


async def _stream(engine, shadow, **fields) -> list:
    response = await handler(engine, shadow).create(chat(stream=True, **fields))
    assert isinstance(response, EventStream)
    return await serve(response)


def _contents(events: list) -> list:
    return [e if e == "[DONE]" else (e["choices"][0]["delta"].get("content"), e["choices"][0]["finish_reason"])
            for e in events]


def test_an_unsampled_request_gets_no_tap_and_no_extra_layer(adds):
    shadow = Shadow(sampled=False)
    asyncio.run(_stream(ScriptedEngine(SCRIPT), shadow))
    assert adds == []  # a stream is not accumulated at all when nobody needs its choices
    asyncio.run(handler(ScriptedEngine(SCRIPT), shadow).create(chat()))
    assert adds == [0, 0]
    assert shadow.samples == [] and shadow.skips == []
    engine = ScriptedEngine(SCRIPT)
    jobs = plan_jobs(chat(), [PROMPT], engine, validator=RequestValidator())
    stream = run_jobs(engine, jobs, "r")
    assert tapped(stream, jobs, None) is stream
    choices = asyncio.run(collected(jobs, stream, None))
    assert [c.text for c in choices] == ["xy"]


def test_a_shadow_error_never_reaches_the_client():
    shadow = Shadow(failing=True)
    reply = asyncio.run(handler(ScriptedEngine(SCRIPT), shadow).create(chat()))
    assert reply.choices[0].message.content == "xy"
    assert shadow.skips == ["error"] and shadow.samples == []
    events = asyncio.run(_stream(ScriptedEngine(SCRIPT), shadow))
    assert _contents(events)[-2:] == [("y", "length"), "[DONE]"]
    assert shadow.skips == ["error", "error"]


# --- a request that does not end normally: one skip, the streams closed at once ----------


def test_a_client_that_leaves_mid_stream_closes_the_engine_stream_at_once():
    async def scenario():
        streaming = asyncio.Event()
        engine, shadow = ScriptedEngine(endless(streaming)), Shadow()
        response = await handler(engine, shadow).create(chat(stream=True, n=2))
        events = await serve(response, fail_at=4)  # the start, two openings, one piece
        # Checked before this coroutine yields again: a stream left to the garbage
        # collector would be closed later, by a task the event loop runs.
        return events, sorted(engine.closed), shadow

    events, closed, shadow = asyncio.run(scenario())
    assert len(events) == 3 and closed[0].endswith("-0") and closed[1].endswith("-1")
    assert shadow.skips == ["skipped"] and shadow.samples == []


def test_a_client_gone_before_the_first_send_still_closes_the_engine_stream():
    """The events generator never ran, so its own cleanup never runs: the response closes
    what it reads from."""

    async def scenario():
        engine, shadow = ScriptedEngine(endless(asyncio.Event())), Shadow()
        response = await handler(engine, shadow).create(chat(stream=True))
        events = await serve(response, fail_at=0)
        return events, list(engine.closed), shadow

    events, closed, shadow = asyncio.run(scenario())
    assert events == [] and len(closed) == 1
    assert shadow.skips == ["skipped"] and shadow.samples == []


def test_a_cancelled_whole_response_closes_the_engine_stream_and_skips_once():
    async def scenario():
        streaming = asyncio.Event()
        engine, shadow = ScriptedEngine(endless(streaming)), Shadow()
        task = asyncio.create_task(handler(engine, shadow).create(chat(n=2)))
        await streaming.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return sorted(engine.closed), shadow

    closed, shadow = asyncio.run(scenario())
    assert len(closed) == 2 and shadow.skips == ["skipped"] and shadow.samples == []


def test_an_event_that_fails_closes_the_engine_stream_at_once():
    """The client is still there: the events end with an error event, and the engine
    requests end with them, not when the abandoned stream is collected."""

    class FailingChat(ChatHandler):
        def chunk(self, *args):
            raise ValueError("a formatting bug")

    async def scenario():
        engine, shadow = ScriptedEngine(endless(asyncio.Event())), Shadow()
        events = await serve(await handler(engine, shadow, FailingChat).create(chat(stream=True)))
        return events, list(engine.closed), shadow

    events, closed, shadow = asyncio.run(scenario())
    assert events[1]["error"]["message"] == "internal server error" and events[2:] == ["[DONE]"]
    assert len(closed) == 1 and shadow.skips == ["skipped"] and shadow.samples == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_engine_refusal_before_the_first_output_is_an_http_error_and_one_skip(stream):
    engine, shadow = ScriptedEngine(iter(()), error=EngineInputError("bad seed")), Shadow()  # no output at all
    with pytest.raises(InvalidRequestError, match="bad seed"):
        asyncio.run(handler(engine, shadow).create(chat(stream=stream)))
    assert len(engine.closed) == 1 and shadow.skips == ["skipped"] and shadow.samples == []


def test_an_engine_failure_mid_stream_is_an_error_event_and_one_skip():
    engine, shadow = ScriptedEngine(SCRIPT[:1], error=EngineDeadError("the engine died")), Shadow()
    events = asyncio.run(_stream(engine, shadow))
    assert _contents(events[:2]) == [("", None), ("x", None)]
    assert "the engine died" in events[2]["error"]["message"] and events[3:] == ["[DONE]"]
    assert len(engine.closed) == 1 and shadow.skips == ["skipped"] and shadow.samples == []
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(handler(ScriptedEngine(SCRIPT[:1], error=EngineDeadError("dead")), shadow).create(chat()))
    assert shadow.skips == ["skipped", "skipped"]


@pytest.mark.parametrize("fields, error", [({"n": 5}, InvalidRequestError), ({"max_tokens": 98}, ContextLengthError)],
                         ids=["n", "context"])
def test_a_refused_sampled_request_abandons_its_tap_once_and_runs_nothing(fields, error):
    engine, shadow = ScriptedEngine(SCRIPT), Shadow()
    with pytest.raises(error):
        asyncio.run(handler(engine, shadow).create(chat(**fields)))
    assert shadow.skips == ["skipped"] and shadow.samples == [] and engine.closed == []


def test_a_tap_hands_over_only_finished_choices():
    shadow = Shadow()
    finished = Choice(0, PROMPT, [5], logprobs=[{5: -0.1}], finish_reason="stop")
    ShadowTap(shadow, "r", "m").finish([finished, Choice(1, PROMPT, [6], logprobs=[{6: -0.2}])])
    assert [s.output_ids for s in shadow.samples[0].sequences] == [[5]]


def job() -> Job:
    return Job(0, [1, 2], SamplingOptions(max_tokens=2))


def test_a_started_stream_gives_its_first_item_then_the_rest_and_closing_it_closes_the_engine_stream():
    async def main() -> tuple[list, list, list]:
        engine = ScriptedEngine()
        whole = [item async for item in await started(run_jobs(engine, [job()], "whole"))]
        unread = await started(run_jobs(engine, [job()], "unread"))
        await unread.aclose()  # the client left after the first item was read, before the rest
        return whole, engine.closed, [item async for item in unread]

    whole, closed, after = asyncio.run(main())
    assert [chunk.text for _, chunk in whole] == ["x", "y"]
    assert closed == ["whole-0", "unread-0"] and after == []


def test_an_error_before_the_first_item_is_raised_by_started_and_the_stream_is_closed():
    class Refusing(ScriptedEngine):  # refuses before its first output
        async def generate(self, prompt_ids, options, request_id, adapter=None):
            try:
                raise EngineInputError("bad seed")
                yield
            finally:
                self.closed.append(request_id)

    engine = Refusing()
    with pytest.raises(InvalidRequestError, match="bad seed"):
        asyncio.run(started(run_jobs(engine, [job()], "refused")))
    assert engine.closed == ["refused-0"]
