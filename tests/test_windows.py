"""Algorithm 1 (paper) on hand-computed lengths, and against a literal copy of the authors' loop."""

from __future__ import annotations

import random

import pytest

from selection.windows import window_id, window_starts

W = 10


def authors_sliding_window(data: list[int], window_size: int) -> list[list[int]]:
    """The authors' SlideWindow.sliding_window_sample, transcribed literally (segments, in their order)."""
    segments: list[list[int]] = []
    if len(data) < window_size:
        return segments
    left, right = 0, len(data)
    while (right - left) > 3 * window_size:
        segments.append(data[left : left + window_size])
        left += window_size
        segments.append(data[right - window_size : right])
        right -= window_size
    remaining = right - left
    if window_size < remaining <= 2 * window_size:
        segments.append(data[left : left + window_size])
        segments.append(data[right - window_size : right])
    elif 2 * window_size < remaining <= 3 * window_size:
        segments.append(data[left : left + window_size])
        middle = left + (remaining - window_size) // 2
        segments.append(data[middle : middle + window_size])
        segments.append(data[right - window_size : right])
    return segments


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, []),
        (9, []),  # n < W
        (10, []),  # n == W: the authors' quirk, no window
        (11, [0, 1]),  # W < n <= 2W: head and tail, overlapping
        (15, [0, 5]),
        (20, [0, 10]),  # exactly 2W: no overlap
        (21, [0, 5, 11]),  # 2W < n <= 3W: head, centred middle (0 + (21-10)//2), tail
        (25, [0, 7, 15]),
        (30, [0, 10, 20]),  # exactly 3W
        (31, [0, 10, 11, 21]),  # > 3W: one pair from the ends, then 11 left -> two windows
        (57, [0, 10, 20, 27, 37, 47]),
        (65, [0, 10, 20, 27, 35, 45, 55]),  # two pairs, then 25 left -> three windows
    ],
)
def test_hand_computed_starts(n, expected):
    assert window_starts(n, W) == expected


def test_exact_fit_flag_gives_the_single_window():
    assert window_starts(10, 10, keep_exact_fit=True) == [0]
    assert window_starts(11, 10, keep_exact_fit=True) == [0, 1]  # only n == W changes


def test_matches_the_authors_code_on_random_lengths():
    rng = random.Random(0)
    for _ in range(400):
        window = rng.randint(1, 50)
        n = rng.randint(0, 12 * window)
        data = list(range(n))
        theirs = sorted(seg[0] for seg in authors_sliding_window(data, window))
        ours = window_starts(n, window)
        assert ours == theirs, (n, window)
        assert all(len(data[s : s + window]) == window and s + window <= n for s in ours)


def test_rejects_non_positive_window():
    with pytest.raises(ValueError, match="window size"):
        window_starts(100, 0)


def test_window_id_is_stable_text():
    assert window_id("book", "abc123", 7) == "book/abc123/00007"


def test_first_windowing_keeps_one_window_per_already_windowed_document():
    """data.windowing=first (released LongABC-32K rows are single decoded windows)."""
    from selection.windows import document_window_starts

    assert document_window_starts(1000, 1000, "first", keep_exact_fit=False) == [0]  # sliding gives none
    assert document_window_starts(1003, 1000, "first", keep_exact_fit=False) == [0]  # sliding gives two
    assert document_window_starts(999, 1000, "first", keep_exact_fit=True) == []
    assert document_window_starts(1003, 1000, "sliding", keep_exact_fit=False) == [0, 3]
