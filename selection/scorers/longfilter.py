"""LongFilter information gain (Deng et al., arXiv 2510.25804, "Beyond Length: Quantifying Long-Range
Information for Long-Context LLM Pretraining Data"). The authors released no code: this is our reading
of the paper.

The paper measures how much the extended context E (the part of the long context before the short one)
tells about the next token given the short context S: the conditional mutual information
I(T; E | S) = E[KL(p(T | S, E) || p(T | S))], estimated per token and averaged over the sample.

Ours, per window (README "Scorers beyond the paper" says which choices are the paper's and which ours):
- long context = every window token before t; short context = LongPPL's sliding passes (`short_len`
  tokens plus up to `stride` - 1 more, `stride` tokens scored per pass), so the same passes serve
  `longppl` and `longfilter`;
- tokens = every token after the first `short_len` (those with an extended context);
- `kl_gain` (the ranking score, higher is better) = mean over those tokens of the exact
  KL(p(.|long) || p(.|short)) over the whole vocabulary, from both full distributions, LM head in chunks;
- `ce_gain` = mean of loss_short - loss_long = log p(x_t|long) - log p(x_t|short), the one-sample
  estimate of the same expectation with the observed next token (what secondary summaries of the paper
  call its token-level surrogate); `n_scored`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selection.scorers.context_contrast import ContextOptions, SlidingContrastScorer, TokenContrast
from selection.scorers.registry import SCORERS, ScorerSetup, typed_options


@dataclass
class LongFilterOptions(ContextOptions):
    """LongFilter has no options of its own: the sliding geometry, BOS and speed keys of ContextOptions."""


def information_gain_columns(contrast: TokenContrast) -> dict[str, float]:
    if contrast.kl is None:
        raise ValueError("LongFilter needs the KL of every scored token (contrast(..., kl=True))")
    return {
        "kl_gain": float(contrast.kl.double().mean()),
        "ce_gain": float((contrast.loss_short - contrast.loss_long).double().mean()),
        "n_scored": float(len(contrast.positions)),
    }


class LongFilterScorer(SlidingContrastScorer):
    options_class = LongFilterOptions
    columns = ["kl_gain", "ce_gain", "n_scored"]
    rank_column = "kl_gain"
    """Higher is better: the long context changes the next-token distributions more."""
    with_kl = True

    def __init__(self, setup: ScorerSetup) -> None:
        super().__init__(setup, typed_options(LongFilterOptions, setup.options, "longfilter"))

    def score_window(self, window: np.ndarray) -> dict[str, float]:
        contrast, _ = self.token_contrast(window)
        return information_gain_columns(contrast)


SCORERS.add("longfilter", LongFilterScorer)
