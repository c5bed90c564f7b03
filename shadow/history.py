"""The compared sequences the verdict is computed from: a bounded, thread-safe window.

The shadow worker appends one entry per compared sequence (from its recording thread);
the verdict endpoint and `verify` read a snapshot, optionally only the last N seconds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from shadow.compare import SequenceComparison


@dataclass(frozen=True)
class ComparedSequence:
    time: float  # when it was recorded (time.time())
    request_id: str
    candidate: SequenceComparison
    noise: SequenceComparison | None  # the noise floor over the same positions; None when off
    output_ids: tuple[int, ...] = ()  # what the candidate emitted (token ids only, never text)


class History:
    def __init__(self, max_sequences: int):
        self._items: deque[ComparedSequence] = deque(maxlen=max_sequences)
        self._lock = threading.Lock()
        self.started = time.time()
        self.evicted = 0  # sequences that fell out of the window (older than what it holds)

    def add(self, item: ComparedSequence) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.evicted += 1
            self._items.append(item)

    def snapshot(self, window_s: float | None = None) -> list[ComparedSequence]:
        with self._lock:
            items = list(self._items)
        if window_s is None:
            return items
        since = time.time() - window_s
        return [item for item in items if item.time >= since]
