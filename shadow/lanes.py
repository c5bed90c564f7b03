"""The shadow path's lanes: one per mounted LoRA adapter, `""` for the base model.

Each adapter is its own candidate (the base with that adapter, judged against the
reference with it unmerged in fp32), so each has its own series (the `adapter` label),
its own compared history and verdict, and its own share of the queue's bookkeeping.
The queue, the reference and its batches are shared; a batch holds one lane's samples.

Label cardinality stays bounded: live lanes are the base and the adapters mounted now
(at most --max-cpu-loras); an unloaded adapter's lane is retired: its gauges (verdict,
queue) are removed at once, so no alert or canary gate reads a verdict on weights no
longer served, and its counters stay readable until, past `retired_max` retired lanes,
the oldest one's series are removed.

A lane is one *mount*: `adapter_id` is the engine's id of that load (never reused), so a
request started before an unload and reload under the same name is not judged against
the new weights.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from shadow.history import History
from shadow.metrics import ShadowMetrics

BASE = ""


@dataclass(eq=False)
class Lane:
    adapter: str
    metrics: ShadowMetrics
    history: History
    adapter_id: int = 0  # the mount's id (the engine's, for its requests); 0 for the base
    waiting: deque[float] = field(default_factory=deque)  # finished_at of its queued samples, oldest first
    tokens: int = 0  # prompt + output tokens of its queued samples
    up: Callable[[], float] = lambda: 1.0  # whether the reference answers (the shadow_reference_up gauge)
    # Why the reference cannot score this adapter (served unshadowed: nothing sampled); None: shadowed.
    unshadowed: str | None = None

    def __post_init__(self):
        self.metrics.oldest_age_from(self.oldest_age)
        self.metrics.reference_up_from(self.up)

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
    def __init__(self, metrics: ShadowMetrics, max_sequences: int, retired_max: int = 16,
                 up: Callable[[], float] = lambda: 1.0):
        """`up`: whether the reference answers now, read by every lane's gauge."""
        self._metrics = metrics
        self._max_sequences = max_sequences
        self._retired_max = retired_max
        self._up = up
        self._live: dict[str, Lane] = {BASE: Lane(BASE, metrics, History(max_sequences), up=up)}
        self._retired: OrderedDict[str, Lane] = OrderedDict()

    @property
    def base(self) -> Lane:
        return self._live[BASE]

    def __iter__(self) -> Iterator[Lane]:
        return iter(list(self._live.values()))

    def live(self, adapter: str, adapter_id: int | None = None) -> Lane | None:
        """The lane of a mounted adapter (or the base); None when not mounted (or, given
        `adapter_id`, when what is mounted under that name now is another load)."""
        lane = self._live.get(adapter)
        return lane if lane is not None and adapter_id in (None, lane.adapter_id) else None

    def find(self, adapter: str) -> Lane | None:
        """Live or retired: where a late outcome of an unloaded adapter is still counted."""
        return self._live.get(adapter) or self._retired.get(adapter)

    def add(self, adapter: str, adapter_id: int = 0) -> Lane:
        """A newly mounted adapter's lane; one mounted before under that name gets its
        counters back (they keep counting), with fresh gauges (inconclusive) and history:
        it may be other weights."""
        if adapter in self._live:
            raise ValueError(f"the adapter {adapter!r} is mounted already")
        retired = self._retired.pop(adapter, None)
        if retired is not None:
            metrics = retired.metrics
            metrics.recreate()  # its gauges at their start values: nothing is decided on the new mount
        else:
            metrics = self._metrics.for_adapter(adapter)
        lane = Lane(adapter, metrics, History(self._max_sequences), adapter_id, up=self._up)
        self._live[adapter] = lane
        return lane

    def retire(self, adapter: str, served: bool = True) -> Lane:
        """An unloaded adapter's lane: no longer live, its gauges removed, its counters kept
        until it is among the oldest past `retired_max`. One that never `served` (its
        mount was rolled back) leaves no series at all."""
        if adapter == BASE or adapter not in self._live:
            raise KeyError(adapter)
        lane = self._live.pop(adapter)
        lane.cleared()
        if not served:
            lane.metrics.remove()
            return lane
        lane.metrics.remove(gauges_only=True)
        self._retired[adapter] = lane
        while len(self._retired) > self._retired_max:
            _, oldest = self._retired.popitem(last=False)
            oldest.metrics.remove()
        return lane
