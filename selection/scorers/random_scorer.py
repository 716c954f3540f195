"""Random baseline: a seeded uniform score `u` per window (SPEC: the paper's "Random" rows).

u depends only on (seed, window id), so it is the same on any rank, in any order, on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selection.scorers.registry import SCORERS, ScorerSetup, typed_options, window_rng


@dataclass
class RandomOptions:
    seed: int = 0


class RandomScorer:
    options_class = RandomOptions
    columns = ["u"]
    requires_window_vocabulary = False

    def __init__(self, setup: ScorerSetup) -> None:
        self.options = typed_options(RandomOptions, setup.options, "random")

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str]) -> list[dict[str, float]]:
        return [{"u": float(window_rng(self.options.seed, i).random())} for i in ids]


SCORERS.add("random", RandomScorer)
