"""LongAttn scorer: first-layer attention statistics of each window (SPEC section 2).

Attention (`scoring.causal`): false (default) = the authors' released code, whose softmax runs over all
L keys of an unpadded window; true = the paper's text, a causal softmax. The far region is r - c >= k in
both. Scored sequence (`scoring.sequence`), always at most the window's length L:
- `bos`: `[BOS] + window[:L-1]`, the prepared ids with one BOS in front;
- `authors`: their pipeline literally: the window decoded to text by the windows' tokenizer, then
  `tokenizer(bos_token + ' ' + text)` with the tokenizer's own special tokens (Llama-3: a second BOS),
  truncated to L. A re-encoding shorter than L is scored at its own length (see `authors_sequence`);
- `window`: the prepared ids as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError
from selection.scorers.attention_stats import IMPLS, HeadStats, default_min_distance, head_stats
from selection.scorers.deep_layers import LayerStackQK
from selection.scorers.first_layer import FirstLayerQK
from selection.scorers.registry import DTYPES, SCORERS, ScorerSetup, resolve_dtype, typed_options

log = logging.getLogger(__name__)
SEQUENCES = ("bos", "authors", "window")


@dataclass
class LongAttnOptions:
    """`selection.scoring` for LongAttn."""

    impl: str = "auto"
    """reference | blocked | triton | auto (triton on CUDA when installed, else blocked)."""
    rope_theta: float | None = None
    """Override the model's RoPE base (the authors used 2.5e6); null keeps the model's."""
    causal: bool = False
    """false = the authors' released code (softmax over all L keys); true = the paper's text (causal)."""
    sequence: str = "bos"
    """bos ([BOS] + window[:L-1]) | authors (decode, `bos + ' ' + text` re-encoded, truncated to L) |
    window (the ids as prepared)."""
    min_distance: int | None = None
    """Minimum query-key distance k; null = L - 3 * (L // 4) (8192 at 32K)."""
    per_head: bool = False
    """Also write ds_h{i} / variance_h{i} columns."""
    dtype: str = "auto"
    """Weights and q/k dtype: float32 | bfloat16 | float16 | auto (selection.scorer_model.dtype on CUDA,
    float32 on CPU)."""
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
        if self.sequence not in SEQUENCES:
            raise ConfigError(f"selection.scoring.sequence={self.sequence}: choose one of {SEQUENCES}")
        if self.impl not in (*IMPLS, "auto"):
            raise ConfigError(f"selection.scoring.impl={self.impl}: choose one of {IMPLS} or auto")
        if self.dtype not in (*DTYPES, "auto"):
            raise ConfigError(f"selection.scoring.dtype={self.dtype}: choose one of {DTYPES} or auto")
        if self.min_distance is not None and self.min_distance < 1:
            raise ConfigError(f"selection.scoring.min_distance={self.min_distance}: must be >= 1 or null")


def authors_sequence(window: Sequence[int], decoder, encoder, length: int) -> list[int]:
    """The ids the authors' pipeline scores for a window: their preprocessing decodes the window's ids
    to text (`batch_decode`, the tokenizer's defaults), their scoring encodes `bos_token + ' ' + text`
    with `add_special_tokens=True` (so Llama-3 gets two BOS) and `truncation=True, max_length=32768`
    (here: `length`, the window's own).

    Their code also pads to `max_length`; a padded sample makes their whole batch causal with the pad keys
    masked, so its score depends on its batch-mates. We do not emulate that: a re-encoding shorter than
    `length` (rare: decode/re-encode is nearly length-preserving) is returned as is and scored unpadded at
    its own length."""
    text = decoder.decode([int(t) for t in window])
    if encoder.bos_token is None:
        raise ConfigError(
            "selection.scoring.sequence=authors needs a tokenizer with a bos_token; use sequence=bos or window"
        )
    encoded = encoder(
        encoder.bos_token + " " + text, add_special_tokens=True, truncation=True, max_length=length
    )
    return list(encoded["input_ids"])


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on CPU), so a host clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    options_class = LongAttnOptions
    requires_window_vocabulary = True

    def __init__(self, setup: ScorerSetup) -> None:
        self.options = opts = typed_options(LongAttnOptions, setup.options, "longattn")
        device = torch.device(setup.device)
        dtype = resolve_dtype(opts.dtype, setup.device, setup.model_dtype)
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
        if opts.sequence == "bos" and self.bos is None:
            raise ConfigError(
                f"model {setup.model} has no bos_token_id; set selection.scoring.sequence=window or authors"
            )
        if opts.sequence == "authors":
            from common.model_sources import load_tokenizer

            self.encoder = load_tokenizer(setup.model, setup.cache_dir)
            windows_tok = setup.windows_tokenizer or setup.model
            same = windows_tok == setup.model
            self.decoder = self.encoder if same else load_tokenizer(windows_tok, setup.cache_dir)
        self.columns = ["ds", "variance"]
        if opts.per_head:
            self.columns += [f"ds_h{h}" for h in range(heads)] + [f"variance_h{h}" for h in range(heads)]
        if not self.first_layer_only:
            self.columns += [f"ds_l{i}" for i in opts.layers] + [f"variance_l{i}" for i in opts.layers]
        self.stats_seconds: dict[tuple[int, bool], float] = {}
        """Seconds spent in each (layer, causal) statistics; the rest of score time is the forward pass."""

    @staticmethod
    def describe(options: dict[str, Any]) -> dict[str, Any]:
        """What the score manifest records about these options (attention mode and scored sequence)."""
        opts = typed_options(LongAttnOptions, options, "longattn")
        attention = (
            "causal: softmax over keys c <= r (the paper's text)"
            if opts.causal
            else "non-causal: softmax over all L keys (the authors' released code)"
        )
        return {"attention": attention, "sequence": opts.sequence, "layers": opts.layers}

    def sequence(self, window: np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(window, dtype=np.int64))
        if self.options.sequence == "bos":
            ids = torch.cat([torch.tensor([self.bos]), ids[:-1]])
        elif self.options.sequence == "authors":
            out = authors_sequence(ids.tolist(), self.decoder, self.encoder, len(ids))
            if len(out) < len(ids):
                log.warning(
                    "longattn: authors' sequence has %d of %d tokens; scored unpadded", len(out), len(ids)
                )
            ids = torch.tensor(out, dtype=torch.int64)
        return ids

    def _stats(self, layer: int, q: torch.Tensor, k: torch.Tensor, causal: bool) -> HeadStats:
        sync(q.device)  # the q/k projection may still be running: keep it out of this timing
        start = time.perf_counter()
        k_dist = (
            self.options.min_distance
            if self.options.min_distance is not None
            else default_min_distance(q.shape[1])
        )
        stats = head_stats(q, k, k_dist, self.impl, self.options.exclude_sink_tokens, causal)
        sync(q.device)  # CUDA kernels are asynchronous: read the clock after they finish
        key = (layer, causal)
        self.stats_seconds[key] = self.stats_seconds.get(key, 0.0) + time.perf_counter() - start
        return stats

    def layer_stats(self, window: np.ndarray, modes: Sequence[bool] | None = None) -> dict:
        """{(layer, causal): HeadStats} for every scored layer and attention mode (default: the configured
        one), from one forward pass. q/k always come from the model's own (causal) forward; `causal` only
        decides the statistics' softmax."""
        modes = (self.options.causal,) if modes is None else tuple(modes)
        sequence = self.sequence(window)
        out: dict[tuple[int, bool], HeadStats] = {}

        def collect(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
            for causal in modes:
                out[(layer, causal)] = self._stats(layer, q, k, causal)

        if self.first_layer_only:
            collect(0, *self.qk(sequence))
        else:
            self.stack.run(sequence, collect)
        return out

    def score_window(self, window: np.ndarray) -> dict[str, float]:
        causal = self.options.causal
        per_layer = {layer: s for (layer, mode), s in self.layer_stats(window).items() if mode == causal}
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
