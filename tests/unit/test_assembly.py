"""server/assembly.py: which exit code each failure at start gets, and that a start that
fails after its engine started shuts that engine (and the reference client) down first.
The engine and the context are narrow fakes; the refusal matrix runs the real commands
(tests/integration/test_start_refusals.py)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.assembly import VERDICT_EXIT, ExitCode, StartFailed, bring_up, start_failure
from server.errors import InvalidRequestError
from server.serving.context import ReferenceRefusedError
from shadow.calibration import CalibrationError
from shadow.scoring import ReferenceLoadError


@pytest.mark.parametrize("exc, code, said", [
    (CalibrationError("the calibration x.json was measured on vllm"), ExitCode.REFUSED, "the calibration x.json"),
    (ReferenceRefusedError("another vocabulary"), ExitCode.REFUSED, "the reference was refused: another vocabulary"),
    (ReferenceLoadError("no config.json"), ExitCode.REFUSED, "the reference failed to load: no config.json"),
    (InvalidRequestError("rank 64 is over --max-lora-rank 16"), ExitCode.REFUSED, "--lora-modules: rank 64"),
    (RuntimeError("out of memory"), ExitCode.FAILED, "engine failed to load: out of memory"),
    (SystemExit(3), ExitCode.FAILED, "engine failed to load: SystemExit(3)"),
])
def test_each_failure_at_start_gets_its_code_and_names_its_side(exc, code, said):
    message, got = start_failure(exc)
    assert got == code and message.startswith(said), (message, got)


def test_the_codes_are_the_documented_ones():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3]
    assert VERDICT_EXIT == {"pass": 0, "fail": 1, "inconclusive": 3}


class FakeEngine:
    def __init__(self) -> None:
        self.shut = 0

    async def shutdown(self) -> None:
        self.shut += 1


@dataclass
class FakeScorer:
    closed: int = 0

    async def close(self) -> None:
        self.closed += 1


@dataclass
class FakeShadow:
    scorer: FakeScorer = field(default_factory=FakeScorer)


@dataclass
class FakeContext:
    engine: FakeEngine = field(default_factory=FakeEngine)
    shadow: FakeShadow | None = None
    adapters: object | None = None
    mount_error: BaseException | None = None
    mount_wait: asyncio.Event | None = None
    mount_wait_reached: bool = False

    async def mount(self, mounts, reference_paths=None) -> None:
        if self.mount_wait is not None:
            self.mount_wait_reached = True
            await self.mount_wait.wait()
        if self.mount_error is not None:
            raise self.mount_error


def settings(start_timeout_s: float = 0.0) -> SimpleNamespace:
    """What bring_up reads of ServeSettings."""
    return SimpleNamespace(start_timeout_s=start_timeout_s, lora_mounts=lambda: [("a", Path("/adapters/a"))],
                           reference_lora_paths=dict)


def test_a_refusal_after_the_engine_started_shuts_it_down_then_exits_2():
    ctx = FakeContext(adapters=object(), shadow=FakeShadow(),
                      mount_error=ReferenceRefusedError("the adapter a is not on the remote reference"))
    loaded = threading.Event()
    with pytest.raises(StartFailed) as failed:
        asyncio.run(bring_up(settings(), lambda s, r: ctx, None, loaded.set))
    assert failed.value.code == ExitCode.REFUSED
    assert failed.value.message == "the reference was refused: the adapter a is not on the remote reference"
    assert loaded.is_set() and ctx.engine.shut == 1 and ctx.shadow.scorer.closed == 1


def test_a_load_that_fails_is_the_engines_failure_and_nothing_is_shut_twice():
    def load(s, r):
        raise RuntimeError("weights missing")

    with pytest.raises(StartFailed) as failed:
        asyncio.run(bring_up(settings(), load, None, lambda: None))
    assert failed.value.code == ExitCode.FAILED and failed.value.message == "engine failed to load: weights missing"


def test_a_load_past_its_timeout_exits_1_and_leaves_the_thread_marked_loading():
    release, loaded = threading.Event(), threading.Event()

    def load(s, r):
        release.wait(10)
        return FakeContext()

    with pytest.raises(StartFailed) as failed:
        asyncio.run(bring_up(settings(start_timeout_s=0.2), load, None, loaded.set))
    assert failed.value.code == ExitCode.FAILED and "--start-timeout-s" in failed.value.message
    assert not loaded.is_set()  # the caller abandons the load (server/lifecycle.abandon_load)
    release.set()


def test_a_start_cancelled_while_mounting_shuts_the_engine_down():
    ctx = FakeContext(adapters=object())

    async def main() -> None:
        ctx.mount_wait = asyncio.Event()  # never set: SIGTERM arrives while the adapters mount
        start = asyncio.create_task(bring_up(settings(), lambda s, r: ctx, None, lambda: None))
        while not ctx.mount_wait_reached:
            await asyncio.sleep(0.02)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start

    asyncio.run(main())
    assert ctx.engine.shut == 1


def test_a_start_that_finishes_starts_the_shadow_after_its_self_check():
    events = []

    class Shadow(FakeShadow):
        def start(self) -> None:
            events.append("start")

    ctx = FakeContext(shadow=Shadow(scorer=type("S", (), {"ready": False})()))
    got = asyncio.run(bring_up(settings(), lambda s, r: ctx, None, lambda: events.append("loaded")))
    assert got is ctx and events == ["loaded", "start"] and ctx.engine.shut == 0
