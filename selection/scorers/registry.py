"""The scorer registry: `selection.method` names a factory that builds a WindowScorer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import ConfigError
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
    windows_tokenizer: str | None = None
    """name_or_path whose tokenizer produced the window ids (text-based scorers decode with it)."""
    seed: int = 0
    model_dtype: str | None = None
    """`selection.scorer_model.dtype`: what `scoring.dtype: auto` means on CUDA."""


class WindowScorer(Protocol):
    columns: list[str]
    """Score columns this scorer writes, in order (the scores contract's method-specific part)."""
    requires_window_vocabulary: bool
    """True when the scorer's model reads the window ids directly (so its vocabulary must match)."""

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str]) -> list[dict[str, float]]:
        """One dict of `columns` per window (token ids as int arrays; `ids` seed per-window sampling)."""
        ...


SCORERS: Registry[Callable[[ScorerSetup], WindowScorer]] = Registry("scorer")


def scorer_class(method: str):
    import selection.scorers.compression  # noqa: F401  (each module registers its scorer)
    import selection.scorers.ladm  # noqa: F401
    import selection.scorers.longattn  # noqa: F401
    import selection.scorers.longfilter  # noqa: F401
    import selection.scorers.longppl  # noqa: F401
    import selection.scorers.ppl_gain  # noqa: F401
    import selection.scorers.prolong  # noqa: F401
    import selection.scorers.random_scorer  # noqa: F401

    return SCORERS.get(method)


def build_scorer(setup: ScorerSetup) -> WindowScorer:
    return scorer_class(setup.method)(setup)


def typed_options(cls, options: dict[str, Any], method: str):
    """`selection.scoring` as the scorer's dataclass; unknown keys are named, not ignored."""
    unknown = set(options) - set(cls.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"selection.scoring: unknown key(s) {sorted(unknown)} for {method}; "
            f"known: {sorted(cls.__dataclass_fields__)}"
        )
    return cls(**options)


DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(name: str, device: str, model_dtype: str | None = None, fallback: str = "bfloat16"):
    """`selection.scoring.dtype`: a name, or auto = the scorer model's own `dtype`
    (`selection.scorer_model.dtype`; `fallback` when none is given) on CUDA, and float32 on CPU, where
    half-precision matmuls are slow and exact statistics cost nothing extra."""
    import torch

    if name == "auto":
        if torch.device(device).type != "cuda":
            name = "float32"
        else:
            name = model_dtype or fallback
            if name not in DTYPES:
                raise ConfigError(f"selection.scorer_model.dtype={name}: choose one of {DTYPES}")
    if name not in DTYPES:
        raise ConfigError(f"selection.scoring.dtype={name}: choose one of {DTYPES} or auto")
    return getattr(torch, name)


def window_rng(seed: int, window_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, window id): the same draws on any rank, in any order."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{window_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))
