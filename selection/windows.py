"""Sliding windows over a tokenized document: the paper's Algorithm 1, exactly as the authors' code."""

from __future__ import annotations


def window_starts(n_tokens: int, window: int, keep_exact_fit: bool = False) -> list[int]:
    """Start offsets (ascending) of the windows Algorithm 1 cuts from a document of `n_tokens` tokens.

    Windows are taken in pairs from both ends while more than 3W tokens remain; the remainder d then gives
    two windows (W < d <= 2W, overlapping in the middle) or three (2W < d <= 3W, the middle one centred).
    A document of exactly W tokens gets NO window in the authors' code (their first branch needs d > W);
    `keep_exact_fit=True` gives it its single window instead (our fix, off by default for fidelity).
    """
    if window <= 0:
        raise ValueError(f"window size must be positive, got {window}")
    if n_tokens < window:
        return []
    if n_tokens == window:
        return [0] if keep_exact_fit else []
    left, right = 0, n_tokens
    starts: list[int] = []
    while right - left > 3 * window:
        starts += [left, right - window]
        left += window
        right -= window
    remaining = right - left
    if window < remaining <= 2 * window:
        starts += [left, right - window]
    elif 2 * window < remaining <= 3 * window:
        starts += [left, left + (remaining - window) // 2, right - window]
    return sorted(starts)


def window_id(domain: str, source_id: str, position: int) -> str:
    """Stable id: the same document in the same domain gives the same ids on any machine."""
    return f"{domain}/{source_id}/{position:05d}"
