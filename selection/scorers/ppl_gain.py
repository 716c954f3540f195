"""LongWanjuan's coherence: the perplexity gain from a longer context (Liu et al. 2024, "LongWanjuan:
Towards Systematic Measurement for Long Text Quality"; OpenLMLab/LongWanjuan at ff5af3e,
`coherence/get_en_coherence.py`).

Their script, per document (lines 88-143): the token ids (no BOS: sentencepiece `encode`) cut into
chunk_num = n // 4096 chunks of 4096 tokens, the remainder dropped (lines 96-98); per chunk, the
perplexity of its last 1024 tokens (exp of the mean token loss, lines 107-115) with the whole chunk as
input ("wi", with context: 3072+ tokens before each) and with only its last 2048 tokens ("wo", lines
120-133: 1024+ tokens before each); ppl_wi and ppl_wo = the MEAN OF THE CHUNKS' PERPLEXITIES (lines
117-118, 135-136); the ratio (ppl_wo - ppl_wi) / (ppl_wo + 1e-5) (line 143, saved under the key
'acc_ratio', overwriting the accuracy ratio of line 142).

Here the same on each window's ids (no BOS, as theirs), lengths from `selection.scoring`: columns
`ppl_gain` (that ratio; the ranking score, higher is better: the long context lowers the perplexity
more), `ppl_long` (their ppl_wi), `ppl_short` (ppl_wo), `n_chunks`. Not reproduced: their loss ignores
labels equal to the pad id and still divides by 1024 (`ignore_index=pad_token_id`, `torch.mean`, lines
67, 110-111), and masks pad-id tokens out of attention (line 103); we score every token. Their argmax
accuracies (acc_wi, acc_wo) are not computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import ConfigError
from selection.scorers.context_contrast import (
    ContrastModel,
    TokenContrast,
    check_speed_keys,
    chunk_spans,
    with_bos,
)
from selection.scorers.registry import SCORERS, ScorerSetup, typed_options

EPSILON = 1e-5
"""Their denominator guard (line 143)."""


@dataclass
class PplGainOptions:
    chunk_len: int = 4096
    """Tokens per chunk (their max_context)."""
    short_len: int = 2048
    """Tokens of the short pass: the chunk's last ones (their med_context)."""
    scored_len: int = 1024
    """Tokens scored per chunk: its last ones (their min_context)."""
    passes_per_forward: int | str = "auto"
    """Chunks per forward (speed only); auto = as many as fit 16,384 tokens."""
    head_chunk_tokens: int = 1024
    """Scored tokens per LM-head chunk (memory only)."""
    dtype: str = "auto"
    """auto = selection.scorer_model.dtype on CUDA (they used float16), float32 on CPU."""

    def __post_init__(self) -> None:
        if not 1 <= self.scored_len < self.short_len < self.chunk_len:
            raise ConfigError(
                f"selection.scoring: need 1 <= scored_len ({self.scored_len}) < short_len "
                f"({self.short_len}) < chunk_len ({self.chunk_len})"
            )
        check_speed_keys(self.passes_per_forward, self.head_chunk_tokens)


def coherence_columns(contrast: TokenContrast, scored_len: int) -> dict[str, float]:
    """Per chunk exp(mean loss) with the long and the short context; their means over the chunks; the
    relative gain (ppl_short - ppl_long) / (ppl_short + 1e-5)."""
    chunks = len(contrast.positions) // scored_len
    ppl_long = torch.exp(contrast.loss_long.double().reshape(chunks, scored_len).mean(-1)).mean()
    ppl_short = torch.exp(contrast.loss_short.double().reshape(chunks, scored_len).mean(-1)).mean()
    return {
        "ppl_gain": float((ppl_short - ppl_long) / (ppl_short + EPSILON)),
        "ppl_long": float(ppl_long),
        "ppl_short": float(ppl_short),
        "n_chunks": float(chunks),
    }


class PplGainScorer:
    options_class = PplGainOptions
    columns = ["ppl_gain", "ppl_long", "ppl_short", "n_chunks"]
    rank_column = "ppl_gain"
    """Higher is better: a longer context lowers the perplexity relatively more (more coherent text)."""
    requires_window_vocabulary = True

    def __init__(self, setup: ScorerSetup) -> None:
        self.options = opts = typed_options(PplGainOptions, setup.options, "ppl_gain")
        self.lm = ContrastModel(setup, opts.dtype, opts.passes_per_forward, opts.head_chunk_tokens)

    def score_window(self, window: np.ndarray) -> dict[str, float]:
        opts = self.options
        ids = with_bos(window, None)
        long, short = chunk_spans(len(ids), opts.chunk_len, opts.short_len, opts.scored_len)
        return coherence_columns(self.lm.contrast(ids, long, short), opts.scored_len)

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str] = ()) -> list[dict[str, float]]:
        return [self.score_window(w) for w in windows]


SCORERS.add("ppl_gain", PplGainScorer)
