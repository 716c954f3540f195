"""Pack short documents into fixed-length sequences: EOS after each document, position ids reset at
every document start (so an attention implementation with document masking sees the boundaries).

A document that does not fit is continued in the next sequence as a new segment (positions restart at
0); the final incomplete sequence is dropped so every training sequence has exactly seq_len tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class PackedSequence:
    input_ids: list[int]
    position_ids: list[int]


def pack_documents(documents: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[PackedSequence]:
    ids: list[int] = []
    positions: list[int] = []
    for doc in documents:
        tokens = [*doc, eos_id]
        offset = 0
        while tokens:
            room = seq_len - len(ids)
            piece, tokens = tokens[:room], tokens[room:]
            ids += piece
            positions += range(offset, offset + len(piece))
            offset = 0  # a continuation in the next sequence is a new segment
            if len(ids) == seq_len:
                yield PackedSequence(ids, positions)
                ids, positions = [], []


def document_boundaries(position_ids: list[int]) -> list[int]:
    """Start offsets of the segments in a packed sequence (where positions restart at 0)."""
    return [i for i, p in enumerate(position_ids) if p == 0]
