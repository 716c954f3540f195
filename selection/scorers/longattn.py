"""LongAttn scorer: first-layer attention statistics of each window (SPEC section 2).

Convention (`scoring.prepend_bos`, default true as the authors): the scored sequence is
`[BOS] + window[:L-1]`, so it keeps the window's length L and the first query has a BOS to attend to.
The authors fed `bos + ' ' + text` through a tokenizer that adds its own BOS (two BOS tokens, one space
token) and truncated to 32768; we score the prepared token window directly, with one BOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from selection.scorers.attention_stats import IMPLS, default_min_distance, head_stats
from selection.scorers.first_layer import FirstLayerQK
from selection.scorers.registry import DTYPES, SCORERS, ScorerSetup, resolve_dtype, typed_options


@dataclass
class LongAttnOptions:
    """`selection.scoring` for LongAttn."""

    impl: str = "auto"
    """reference | blocked | triton | auto (triton on CUDA when installed, else blocked)."""
    rope_theta: float | None = None
    """Override the model's RoPE base (the authors used 2.5e6); null keeps the model's."""
    prepend_bos: bool = True
    min_distance: int | None = None
    """Minimum query-key distance k; null = L - 3 * (L // 4) (8192 at 32K)."""
    per_head: bool = False
    """Also write ds_h{i} / variance_h{i} columns."""
    dtype: str = "auto"
    """Weights and q/k dtype: float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU)."""

    def __post_init__(self) -> None:
        if self.impl not in (*IMPLS, "auto"):
            raise ValueError(f"selection.scoring.impl={self.impl}: choose one of {IMPLS} or auto")
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"selection.scoring.dtype={self.dtype}: choose one of {DTYPES} or auto")
        if self.min_distance is not None and self.min_distance < 1:
            raise ValueError(f"selection.scoring.min_distance={self.min_distance}: must be >= 1 or null")


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl != "auto":
        return impl
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "blocked"
    return "blocked"


class LongAttnScorer:
    requires_window_vocabulary = True

    def __init__(self, setup: ScorerSetup) -> None:
        self.options = opts = typed_options(LongAttnOptions, setup.options, "longattn")
        device = torch.device(setup.device)
        dtype = resolve_dtype(opts.dtype, setup.device)
        self.impl = resolve_impl(opts.impl, device)
        self.qk = FirstLayerQK.from_pretrained(setup.model, setup.cache_dir, opts.rope_theta, device, dtype)
        self.bos = self.qk.config.bos_token_id
        if opts.prepend_bos and self.bos is None:
            raise ValueError(
                f"model {setup.model} has no bos_token_id; set selection.scoring.prepend_bos=false"
            )
        self.columns = ["ds", "variance"]
        if opts.per_head:
            heads = self.qk.heads
            self.columns += [f"ds_h{h}" for h in range(heads)] + [f"variance_h{h}" for h in range(heads)]

    def sequence(self, window: np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(window, dtype=np.int64))
        if self.options.prepend_bos:
            ids = torch.cat([torch.tensor([self.bos]), ids[:-1]])
        return ids

    def score_window(self, window: np.ndarray) -> dict[str, float]:
        q, k = self.qk(self.sequence(window))
        length = q.shape[1]
        k_dist = (
            self.options.min_distance
            if self.options.min_distance is not None
            else default_min_distance(length)
        )
        stats = head_stats(q, k, k_dist, self.impl)
        row = {"ds": stats.mean_ds, "variance": stats.mean_variance}
        if self.options.per_head:
            row.update({f"ds_h{h}": float(v) for h, v in enumerate(stats.ds)})
            row.update({f"variance_h{h}": float(v) for h, v in enumerate(stats.variance)})
        return row

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str] = ()) -> list[dict[str, float]]:
        return [self.score_window(w) for w in windows]


SCORERS.add("longattn", LongAttnScorer)
