"""The shadow path's lanes: one per mounted LoRA adapter, `""` for the base model.

Each adapter is its own candidate (the base with that adapter, judged against the
reference with it unmerged in fp32), so each has its own series (the `adapter` label),
its own compared history and verdict, and its own share of the queue's bookkeeping.
The queue, the reference and its batches are shared; a batch holds one lane's samples.

Label cardinality stays bounded: live lanes are the base and the adapters mounted now
(at most --max-cpu-loras); an unloaded adapter's lane is retired with its series kept
(its last counts stay readable), and past `retired_max` retired lanes the oldest one's
series are removed.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from shadow.history import History
from shadow.metrics import ShadowMetrics

BASE = ""


@dataclass(eq=False)
class Lane:
    adapter: str
    metrics: ShadowMetrics
    history: History
    waiting: deque[float] = field(default_factory=deque)  # finished_at of its queued samples, oldest first
    tokens: int = 0  # prompt + output tokens of its queued samples

    def __post_init__(self):
        self.metrics.oldest_age_from(self.oldest_age)

    def oldest_age(self) -> float:
        """Seconds its oldest waiting sample has waited (read at each scrape)."""
        return time.monotonic() - self.waiting[0] if self.waiting else 0.0

    def queued(self, finished_at: float, tokens: int) -> None:
        self.waiting.append(finished_at)
        self.tokens += tokens
        self.gauge()

    def taken(self, tokens: int) -> None:
        self.waiting.popleft()
        self.tokens -= tokens
        self.gauge()

    def cleared(self) -> None:
        self.waiting.clear()
        self.tokens = 0
        self.gauge()

    def gauge(self) -> None:
        self.metrics.queue_depth(len(self.waiting), self.tokens)


class Lanes:
    def __init__(self, metrics: ShadowMetrics, max_sequences: int, retired_max: int = 16):
        self._metrics = metrics
        self._max_sequences = max_sequences
        self._retired_max = retired_max
        self._live: dict[str, Lane] = {BASE: Lane(BASE, metrics, History(max_sequences))}
        self._retired: OrderedDict[str, Lane] = OrderedDict()

    @property
    def base(self) -> Lane:
        return self._live[BASE]

    def __iter__(self) -> Iterator[Lane]:
        return iter(list(self._live.values()))

    def live(self, adapter: str) -> Lane | None:
        """The lane of a mounted adapter (or the base); None when not mounted."""
        return self._live.get(adapter)

    def find(self, adapter: str) -> Lane | None:
        """Live or retired: where a late outcome of an unloaded adapter is still counted."""
        return self._live.get(adapter) or self._retired.get(adapter)

    def add(self, adapter: str) -> Lane:
        """A newly mounted adapter's lane; one mounted before under that name gets its
        series back (counters keep counting), with a fresh history (it may be other weights)."""
        if adapter in self._live:
            raise ValueError(f"the adapter {adapter!r} is mounted already")
        retired = self._retired.pop(adapter, None)
        metrics = retired.metrics if retired is not None else self._metrics.for_adapter(adapter)
        lane = Lane(adapter, metrics, History(self._max_sequences))
        self._live[adapter] = lane
        return lane

    def retire(self, adapter: str) -> Lane:
        """An unloaded adapter's lane: no longer live, its series kept until it is among
        the oldest past `retired_max`."""
        if adapter == BASE or adapter not in self._live:
            raise KeyError(adapter)
        lane = self._live.pop(adapter)
        lane.cleared()
        self._retired[adapter] = lane
        while len(self._retired) > self._retired_max:
            _, oldest = self._retired.popitem(last=False)
            oldest.metrics.remove()
        return lane
