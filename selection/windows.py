"""Sliding windows over a tokenized document: the paper's Algorithm 1, exactly as the authors' code.

`windowing=first` is for a corpus that is already windows (the authors' released LongABC-32K: 32K-token
windows decoded to text): one window per document, its first W tokens.
"""

from __future__ import annotations

WINDOWINGS = ("sliding", "first")


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


def document_window_starts(n_tokens: int, window: int, windowing: str, keep_exact_fit: bool) -> list[int]:
    """`sliding`: Algorithm 1 (`window_starts`); `first`: [0] when the document has at least W tokens."""
    if windowing == "first":
        return [0] if n_tokens >= window else []
    return window_starts(n_tokens, window, keep_exact_fit)


def window_id(domain: str, source_id: str, position: int) -> str:
    """Stable id: the same document in the same domain gives the same ids on any machine."""
    return f"{domain}/{source_id}/{position:05d}"
