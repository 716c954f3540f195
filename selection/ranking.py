"""Selection maths: normalisation (within each domain, or over the whole scored set), LongAttn's combined
score, per-domain picks.

Pure functions of arrays. Ties are broken by window id everywhere, so a selection is a function of the
scores alone, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from common.errors import ConfigError

NORMALIZATIONS = ("min_max", "zscore")
SCOPES = ("domain", "global")


def normalize(values: np.ndarray, method: str) -> np.ndarray:
    """`min_max` to [0, 1] (the authors' code; a constant column maps to 0.5, as theirs) or `zscore`
    (the paper's Eq. 8; sample standard deviation as the authors' `statistics.stdev`; constant -> 0)."""
    v = np.asarray(values, dtype=np.float64)
    if method == "min_max":
        lo, hi = v.min(), v.max()
        return np.full_like(v, 0.5) if hi == lo else (v - lo) / (hi - lo)
    if method == "zscore":
        std = v.std(ddof=1) if v.size > 1 else 0.0
        return np.zeros_like(v) if std == 0 else (v - v.mean()) / std
    raise ConfigError(f"selection.normalization={method}: choose one of {NORMALIZATIONS}")


def normalize_within(values: np.ndarray, groups: Sequence[str] | None, method: str) -> np.ndarray:
    """`normalize` applied to each group's values separately (`groups` None: over all values at once)."""
    v = np.asarray(values, dtype=np.float64)
    if groups is None:
        return normalize(v, method)
    labels = np.asarray(groups)
    if labels.shape != v.shape:
        raise ValueError(f"{len(labels)} group labels for {len(v)} values")
    out = np.empty_like(v)
    for group in np.unique(labels):
        mine = labels == group
        out[mine] = normalize(v[mine], method)
    return out


def longattn_score(
    ds: np.ndarray,
    variance: np.ndarray,
    alpha: float = 0.5,
    normalization: str = "min_max",
    use_uniformity: bool = True,
    groups: Sequence[str] | None = None,
) -> np.ndarray:
    """score = norm(DS_T) - alpha * norm(variance) = norm(DS_T) + alpha * norm(DU_T) with DU_T = -variance.

    With z-scores this is the paper's LDS_T = Std(DS_T) + alpha * Std(DU_T); `use_uniformity=False` is the
    paper's "w/o DU_T" ablation. `groups` (the windows' domains) normalises within each group, as the
    authors' per-file run does; None normalises over all windows.
    """
    score = normalize_within(ds, groups, normalization)
    if use_uniformity:
        score = score - alpha * normalize_within(variance, groups, normalization)
    return score


def rank_order(ids: Sequence[str], scores: np.ndarray) -> list[int]:
    """Indices from best to worst: higher score first, then smaller id."""
    return sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))


def domain_budgets(
    budget_tokens: float, domains: Sequence[str], ratios: Mapping[str, float] | None
) -> dict[str, int]:
    """Split a token budget across the domains present, by `ratios` (equal when none are given)."""
    present = sorted(set(domains))
    weights = {d: float((ratios or {}).get(d, 1.0 if not ratios else 0.0)) for d in present}
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(
            f"selection.domain_ratios={dict(ratios or {})} gives no weight to the domains {present}"
        )
    return {d: int(budget_tokens * w / total) for d, w in weights.items()}


def select_per_domain(
    ids: Sequence[str],
    domains: Sequence[str],
    n_tokens: Sequence[int],
    scores: np.ndarray,
    fraction: float | None = None,
    budget_tokens: float | None = None,
    domain_ratios: Mapping[str, float] | None = None,
) -> dict[str, list[int]]:
    """Per domain, the chosen indices in rank order.

    `fraction`: the top floor(n * fraction) windows of each domain (the authors' `len // 2` at 0.5).
    `budget_tokens`: each domain's share of the budget, filled greedily in rank order; a window that would
    overflow the share is skipped and smaller later ones may still fit.
    """
    if (fraction is None) == (budget_tokens is None):
        raise ConfigError("set exactly one of selection.fraction and selection.budget_tokens")
    by_domain: dict[str, list[int]] = {}
    for i in rank_order(ids, scores):
        by_domain.setdefault(domains[i], []).append(i)
    chosen: dict[str, list[int]] = {}
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"selection.fraction={fraction}: must be in (0, 1]")
        for domain, order in sorted(by_domain.items()):
            chosen[domain] = order[: int(len(order) * fraction)]
        return chosen
    budgets = domain_budgets(budget_tokens, domains, domain_ratios)
    for domain, order in sorted(by_domain.items()):
        left, picked = budgets[domain], []
        for i in order:
            if n_tokens[i] <= left:
                picked.append(i)
                left -= n_tokens[i]
        chosen[domain] = picked
    return chosen


def training_mixture(
    long_domains: Sequence[str],
    long_share: float,
    short: Mapping[str, float],
    domain_ratios: Mapping[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """Sampling proportions for training: `long_share` split over the selected long domains, plus short
    sources (paper Table 7: long ArXiv/Book/Code 30 % each = 0.9 split three ways; Wiki 3 %, Github 3 %,
    Web 4 %)."""
    total_short = sum(short.values())
    if abs(long_share + total_short - 1.0) > 1e-6:
        raise ConfigError(
            f"selection.mixture: long_share={long_share} + short shares={total_short} must sum to 1"
        )
    weights = {
        d: float((domain_ratios or {}).get(d, 1.0 if not domain_ratios else 0.0))
        for d in sorted(long_domains)
    }
    norm = sum(weights.values()) or 1.0
    return {"long": {d: long_share * w / norm for d, w in weights.items()}, "short": dict(short)}
