"""LongPPL key tokens (Fang et al., ICLR 2025, "What is Wrong with Perplexity for Long-context Language
Modeling?"; reference: the `longppl` package 0.3.0, `find_key_token`).

Each token t after the first `short_len` is scored with the whole window as context (loss_full) and
with a truncated context (loss_short: short passes of short_len + stride tokens, each scoring its last
stride tokens, as `find_key_token`). Token t is a key token when

    loss_short(t) - loss_full(t) > alpha   and   loss_full(t) < -beta        (alpha 2, beta -2)

Columns (higher is better for the ranking column `key_fraction`):
- `key_fraction` = key tokens / scored tokens (the ranking score);
- `n_key`, `n_scored`;
- `longce_weight`: the mean LongCE weight over all next-token targets of the sequence, as LongCE's
  `loss_weight` (LongPPL repository finetune/finetune.py lines 21-44): 1 for the targets inside the
  first short_len tokens, min(exp(loss_short - loss_full), weight_cap) for the scored ones (cap 5).

BOS (`bos: auto`): `find_key_token` encodes the text with the tokenizer's defaults, so Llama-3 puts a BOS
first and SmolLM2 none; auto does the same on the window's ids, and positions count that BOS. The BOS is
then only in the long pass and the first short pass, as in the reference's slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import ConfigError
from selection.scorers.context_contrast import ContextOptions, SlidingContrastScorer, TokenContrast
from selection.scorers.registry import SCORERS, ScorerSetup, typed_options


@dataclass
class LongPPLOptions(ContextOptions):
    alpha: float = 2.0
    """Minimum loss_short - loss_full (nats) of a key token."""
    beta: float = -2.0
    """A key token has loss_full < -beta (the reference's sign convention)."""
    weight_cap: float = 5.0
    """LongCE's upper clamp of exp(loss_short - loss_full) (`thre`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_cap <= 0:
            raise ConfigError(f"selection.scoring.weight_cap={self.weight_cap}: must be > 0")


def key_token_mask(contrast: TokenContrast, alpha: float, beta: float) -> torch.Tensor:
    """`find_key_token`'s test, in float32 as the reference computes it (longppl.py line 44)."""
    return torch.logical_and((contrast.loss_short - contrast.loss_long) > alpha, contrast.loss_long < -beta)


def longce_weights(contrast: TokenContrast, n: int, cap: float) -> torch.Tensor:
    """LongCE's weight of each of the n - 1 next-token targets of an n-token sequence (target t is token
    t, t = 1..n-1): 1 where t was not scored, else min(exp(loss_short - loss_full), cap)."""
    weights = torch.ones(n)
    weights[contrast.positions] = torch.exp(contrast.loss_short - contrast.loss_long)
    return torch.clamp(weights[1:], max=cap)


def key_token_columns(contrast: TokenContrast, n: int, opts: LongPPLOptions) -> dict[str, float]:
    key = key_token_mask(contrast, opts.alpha, opts.beta)
    scored = len(contrast.positions)
    return {
        "key_fraction": float(key.sum()) / scored,
        "n_key": float(key.sum()),
        "n_scored": float(scored),
        "longce_weight": float(longce_weights(contrast, n, opts.weight_cap).double().mean()),
    }


class LongPPLScorer(SlidingContrastScorer):
    options_class = LongPPLOptions
    columns = ["key_fraction", "n_key", "n_scored", "longce_weight"]
    rank_column = "key_fraction"
    """Higher is better: more tokens that only the long context predicts well."""

    def __init__(self, setup: ScorerSetup) -> None:
        super().__init__(setup, typed_options(LongPPLOptions, setup.options, "longppl"))

    def key_positions(self, window: np.ndarray) -> list[int]:
        """Positions of the key tokens in the scored sequence (BOS included when there is one), as
        `find_key_token` collects them before mapping them to text offsets."""
        contrast, _ = self.token_contrast(window)
        mask = key_token_mask(contrast, self.options.alpha, self.options.beta)
        return contrast.positions[mask].tolist()

    def score_window(self, window: np.ndarray) -> dict[str, float]:
        contrast, n = self.token_contrast(window)
        return key_token_columns(contrast, n, self.options)


SCORERS.add("longppl", LongPPLScorer)
