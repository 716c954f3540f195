"""Which source each training sequence comes from: proportions of the mixture, seeded, resumable.

Sequence k takes the k-th uniform draw of one generator seeded with `seed`; the stream is prefix-stable,
so the source of sequence k depends only on (seed, k). Resuming at step s needs no saved generator
state, just the number of sequences already drawn, and any rank can compute any slice of the schedule.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np


class MixtureSchedule:
    def __init__(self, proportions: Mapping[str, float], seed: int) -> None:
        total = float(sum(proportions.values()))
        if total <= 0 or any(v < 0 for v in proportions.values()):
            raise ValueError(f"mixture proportions must be >= 0 and not all 0: {dict(proportions)}")
        self.names = sorted(proportions)
        self.cumulative = np.cumsum([proportions[n] / total for n in self.names])
        self.seed = seed

    def assignment(self, start: int, count: int) -> np.ndarray:
        """Source index (into `names`) of sequences start .. start + count - 1."""
        draws = np.random.default_rng(self.seed).random(start + count)[start:]
        return np.minimum(np.searchsorted(self.cumulative, draws, side="right"), len(self.names) - 1)

    def source(self, index: int) -> str:
        """The source of sequence `index` (0-based, global across the run)."""
        return self.sources(index, 1)[0]

    def sources(self, start: int, count: int) -> list[str]:
        return [self.names[i] for i in self.assignment(start, count)]

    def counts(self, start: int, count: int) -> Counter:
        return Counter(self.sources(start, count))

    def ordinals(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """For sequences 0 .. count - 1: the source index and how many earlier sequences drew that source
        (the row to take from the source's stream)."""
        assigned = self.assignment(0, count)
        ordinal = np.empty(count, dtype=np.int64)
        for source in range(len(self.names)):
            where = np.flatnonzero(assigned == source)
            ordinal[where] = np.arange(len(where))
        return assigned, ordinal
