"""Which source each training sequence comes from: proportions of the mixture, seeded, resumable.

The source of sequence k depends only on (seed, k): resuming at step s needs no saved generator state,
just the number of sequences already drawn, and any rank can compute any slice of the schedule.
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

    def source(self, index: int) -> str:
        """The source of sequence `index` (0-based, global across the run)."""
        u = np.random.default_rng([self.seed, index]).random()
        return self.names[min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.names) - 1)]

    def sources(self, start: int, count: int) -> list[str]:
        return [self.source(i) for i in range(start, start + count)]

    def counts(self, start: int, count: int) -> Counter:
        return Counter(self.sources(start, count))
