"""LongAttn scorer: first-layer attention statistics of each window (SPEC section 2).

Convention (`scoring.prepend_bos`, default true as the authors): the scored sequence is
`[BOS] + window[:L-1]`, so it keeps the window's length L and the first query has a BOS to attend to.
The authors fed `bos + ' ' + text` through a tokenizer that adds its own BOS (two BOS tokens, one space
token) and truncated to 32768; we score the prepared token window directly, with one BOS.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.errors import ConfigError
from selection.scorers.attention_stats import IMPLS, HeadStats, default_min_distance, head_stats
from selection.scorers.deep_layers import LayerStackQK
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
    layers: list[int] = field(default_factory=lambda: [0])
    """Decoder layers to score with ([0] = the paper). Several: each layer's statistics are kept as
    ds_l{i} / variance_l{i} and ds / variance are their means. Layer i > 0 runs layers 0..i-1 (SDPA)."""
    exclude_sink_tokens: int = 0
    """Keys at positions < n leave the far region (they still count in the softmax normaliser); 0 = paper."""

    def __post_init__(self) -> None:
        self.layers = [int(self.layers)] if isinstance(self.layers, int) else [int(i) for i in self.layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(
                f"selection.scoring.layers={self.layers}: give one or more distinct layer indices"
            )
        if self.per_head and len(self.layers) > 1:
            raise ConfigError("selection.scoring.per_head needs a single entry in selection.scoring.layers")
        if self.exclude_sink_tokens < 0:
            raise ConfigError(
                f"selection.scoring.exclude_sink_tokens={self.exclude_sink_tokens}: must be >= 0"
            )
        if self.impl not in (*IMPLS, "auto"):
            raise ConfigError(f"selection.scoring.impl={self.impl}: choose one of {IMPLS} or auto")
        if self.dtype not in (*DTYPES, "auto"):
            raise ConfigError(f"selection.scoring.dtype={self.dtype}: choose one of {DTYPES} or auto")
        if self.min_distance is not None and self.min_distance < 1:
            raise ConfigError(f"selection.scoring.min_distance={self.min_distance}: must be >= 1 or null")


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
        self.first_layer_only = opts.layers == [0]
        if self.first_layer_only:  # the paper's path: embeddings + layer-0 q/k, nothing else
            self.qk = FirstLayerQK.from_pretrained(
                setup.model, setup.cache_dir, opts.rope_theta, device, dtype
            )
            config, heads = self.qk.config, self.qk.heads
        else:
            self.stack = LayerStackQK(
                setup.model, opts.layers, setup.cache_dir, opts.rope_theta, device, dtype
            )
            config, heads = self.stack.config, self.stack.heads
        self.bos = config.bos_token_id
        if opts.prepend_bos and self.bos is None:
            raise ConfigError(
                f"model {setup.model} has no bos_token_id; set selection.scoring.prepend_bos=false"
            )
        self.columns = ["ds", "variance"]
        if opts.per_head:
            self.columns += [f"ds_h{h}" for h in range(heads)] + [f"variance_h{h}" for h in range(heads)]
        if not self.first_layer_only:
            self.columns += [f"ds_l{i}" for i in opts.layers] + [f"variance_l{i}" for i in opts.layers]
        self.stats_seconds = dict.fromkeys(opts.layers, 0.0)
        """Seconds spent in each layer's statistics; the rest of score time is the forward pass."""

    def sequence(self, window: np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(window, dtype=np.int64))
        if self.options.prepend_bos:
            ids = torch.cat([torch.tensor([self.bos]), ids[:-1]])
        return ids

    def _stats(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> HeadStats:
        start = time.perf_counter()
        k_dist = (
            self.options.min_distance
            if self.options.min_distance is not None
            else default_min_distance(q.shape[1])
        )
        stats = head_stats(q, k, k_dist, self.impl, self.options.exclude_sink_tokens)
        self.stats_seconds[layer] += time.perf_counter() - start
        return stats

    def score_window(self, window: np.ndarray) -> dict[str, float]:
        sequence = self.sequence(window)
        per_layer: dict[int, HeadStats] = {}
        if self.first_layer_only:
            per_layer[0] = self._stats(0, *self.qk(sequence))
        else:
            self.stack.run(
                sequence, lambda layer, q, k: per_layer.__setitem__(layer, self._stats(layer, q, k))
            )
        layers = self.options.layers
        row = {
            "ds": float(np.mean([per_layer[i].mean_ds for i in layers])),
            "variance": float(np.mean([per_layer[i].mean_variance for i in layers])),
        }
        if self.options.per_head:
            stats = per_layer[layers[0]]
            row.update({f"ds_h{h}": float(v) for h, v in enumerate(stats.ds)})
            row.update({f"variance_h{h}": float(v) for h, v in enumerate(stats.variance)})
        if not self.first_layer_only:
            row.update({f"ds_l{i}": per_layer[i].mean_ds for i in layers})
            row.update({f"variance_l{i}": per_layer[i].mean_variance for i in layers})
        return row

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str] = ()) -> list[dict[str, float]]:
        return [self.score_window(w) for w in windows]


SCORERS.add("longattn", LongAttnScorer)
