"""Compression baseline: how incompressible a window's text is under zlib (ZIP, "Entropy Law: The Story
Behind Data Selection and Data Compression", USTC-StarTeam/ZIP at f77b0b5). No model; CPU only.

ZIP's `get_compression_ratio` (ZIP.py lines 15-19) is len(raw) / len(zlib.compress(raw, level=9)) of
the UTF-8 bytes, and ZIP prefers LOW ratios (less redundancy: `torch.topk(..., largest=False)`, line
46). Ours scores each window alone (ZIP re-scores candidates greedily against the set selected so far,
lines 21-116, and compresses the `str()` of its JSON records; we compress the window's decoded text).
Columns: `incompressibility` = len(compressed) / len(raw), the ranking score (higher is better: less
redundant text, ZIP's preference), `compression_ratio` (ZIP's ratio, lower is less redundant),
`text_bytes`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError
from selection.scorers.registry import SCORERS, ScorerSetup, typed_options


@dataclass
class CompressionOptions:
    level: int = 9
    """zlib compression level (ZIP: 9)."""

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 9:
            raise ConfigError(f"selection.scoring.level={self.level}: zlib levels are 0..9")


def compression_columns(text: str, level: int = 9) -> dict[str, float]:
    raw = text.encode("utf-8")
    packed = len(zlib.compress(raw, level=level))
    return {
        "incompressibility": packed / max(len(raw), 1),
        "compression_ratio": len(raw) / packed,
        "text_bytes": float(len(raw)),
    }


class CompressionScorer:
    options_class = CompressionOptions
    columns = ["incompressibility", "compression_ratio", "text_bytes"]
    rank_column = "incompressibility"
    """Higher is better: less redundant text (ZIP keeps the lowest compression ratios)."""
    requires_window_vocabulary = False  # reads text, decoded with the windows' own tokenizer

    def __init__(self, setup: ScorerSetup) -> None:
        from common.model_sources import load_tokenizer

        self.options = typed_options(CompressionOptions, setup.options, "compression")
        self.tokenizer = load_tokenizer(setup.windows_tokenizer or setup.model, setup.cache_dir)

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str] = ()) -> list[dict[str, float]]:
        return [
            compression_columns(self.tokenizer.decode([int(t) for t in w]), self.options.level)
            for w in windows
        ]


SCORERS.add("compression", CompressionScorer)
