"""How long the shadow's worker waits before it asks a reference that could not answer
(unreachable, timed out, 429, 502-504, busy) again: exponential backoff with equal
jitter, so candidate replicas that lost one reference together do not come back in
step, and the reference's own Retry-After when it gives one.

Samples are evidence (docs/design.md, "Outages"): the batch being retried and the ones
waiting behind it stay queued, within the queue's bounds, until they are older than
--shadow-max-sample-age-s; only then are they counted as `error`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FIRST_S = 0.5
MAX_S = 10.0  # a restarted reference is found within this of answering again
MAX_ASKED_S = 60.0  # the most of a Retry-After that is honoured


@dataclass
class Backoff:
    first: float = FIRST_S
    cap: float = MAX_S
    rng: random.Random = field(default_factory=random.Random)
    _next: float = 0.0

    def __post_init__(self) -> None:
        self._next = self.first

    def delay(self, asked: float | None = None) -> float:
        """Seconds to wait before the next try: the reference's Retry-After (at most
        MAX_ASKED_S, at least half the current step) when it sent one, else half the
        current step plus a random half."""
        step, self._next = self._next, min(2 * self._next, self.cap)
        if asked is not None:  # never sooner than the backoff's own floor (a Retry-After of 0 would spin)
            return max(step / 2, min(asked, MAX_ASKED_S))
        return step / 2 + self.rng.uniform(0, step / 2)

    def reset(self) -> None:
        self._next = self.first
