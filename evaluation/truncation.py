"""Prompt truncation as LongBench does it: keep the head and the tail, cut the middle."""

from __future__ import annotations


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """At most `budget` tokens: the first budget // 2 and the last budget - budget // 2.

    LongBench's pred.py keeps `prompt[:half] + prompt[-half:]`, so the instruction at the start and
    the question at the end survive; left truncation (HF's default) would cut the instruction.
    """
    if budget <= 0:
        raise ValueError(f"truncation budget must be positive, got {budget}")
    if len(ids) <= budget:
        return list(ids)
    head = budget // 2
    return list(ids[:head]) + list(ids[len(ids) - (budget - head) :])
