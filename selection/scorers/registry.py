"""The scorer registry: `selection.method` names a factory that builds a WindowScorer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.registry import Registry


@dataclass
class ScorerSetup:
    """What every scorer factory receives."""

    method: str
    model: str
    """name_or_path of the scorer model (Hub id, local dir, or embedded name)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The `selection.scoring` mapping; each scorer types it into its own dataclass."""
    cache_dir: Path | None = None
    device: str = "cpu"


class WindowScorer(Protocol):
    columns: list[str]
    """Score columns this scorer writes, in order (the scores contract's method-specific part)."""

    def score_batch(self, windows: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """One dict of `columns` per window (token ids as int arrays)."""
        ...


SCORERS: Registry[Callable[[ScorerSetup], WindowScorer]] = Registry("scorer")


def build_scorer(setup: ScorerSetup) -> WindowScorer:
    import selection.scorers.longattn  # noqa: F401  (registers)

    return SCORERS.get(setup.method)(setup)
