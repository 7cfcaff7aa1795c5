"""The samples of past iterations, kept so the screen can step back through them.

The paper's Table 1 compares the text of iterations 0, 50, 100 and the last
one; a run of thousands of iterations must not make that cost unbounded
memory, so the history keeps at most ``capacity`` records and thins its older
half when full (see ``SampleHistory``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import NamedTuple

from collapse_tui.records import IterationRecord

#: 5,000 records of ~5 KB of text each is ~25 MB: all of a paper-length run, bounded for longer ones.
DEFAULT_CAPACITY = 5_000


class Entry(NamedTuple):
    """A past iteration: its record, and its position among all records the charts were fed."""

    ordinal: int
    record: IterationRecord


class SampleHistory:
    """Iteration → record for the iterations seen so far, at most ``capacity`` of them.

    When full, the older half is thinned to every other iteration: the start
    of the run (Table 1's first rows) and the recent past stay, and stepping
    skips the gaps. A record whose iteration is not past the last one (a run
    resumed from an earlier snapshot) replaces everything from there on.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = max(4, capacity)
        #: The stored iterations, ascending: what stepping moves through.
        self.iterations: list[int] = []
        self._entries: dict[int, Entry] = {}

    def __len__(self) -> int:
        return len(self.iterations)

    def add(self, ordinal: int, record: IterationRecord) -> None:
        iteration = record.iteration
        self.forget_from(iteration)  # a record not past the last: a resume's branch replaces the old
        self.iterations.append(iteration)
        self._entries[iteration] = Entry(ordinal, record)
        if len(self.iterations) > self.capacity:
            self._thin()

    def forget_from(self, iteration: int) -> None:
        """Drop the entries of ``iteration`` and later: a resume from an earlier snapshot abandoned them."""
        cut = bisect_left(self.iterations, iteration)
        for dropped in self.iterations[cut:]:
            del self._entries[dropped]
        del self.iterations[cut:]

    def _thin(self) -> None:
        half = len(self.iterations) // 2
        older, newer = self.iterations[:half], self.iterations[half:]
        for dropped in older[1::2]:
            del self._entries[dropped]
        self.iterations = [*older[0::2], *newer]

    def get(self, iteration: int) -> Entry | None:
        return self._entries.get(iteration)

    def __getitem__(self, iteration: int) -> Entry:
        return self._entries[iteration]

    @property
    def first(self) -> int | None:
        return self.iterations[0] if self.iterations else None

    @property
    def last(self) -> int | None:
        return self.iterations[-1] if self.iterations else None

    def before(self, iteration: int, by: int = 1) -> int | None:
        """The latest stored iteration at least ``by`` before ``iteration``, else the first one."""
        index = bisect_right(self.iterations, iteration - by) - 1
        return self.iterations[max(index, 0)] if self.iterations else None

    def after(self, iteration: int, by: int = 1) -> int | None:
        """The earliest stored iteration at least ``by`` after ``iteration``; None past the last."""
        index = bisect_left(self.iterations, iteration + by)
        return self.iterations[index] if index < len(self.iterations) else None
