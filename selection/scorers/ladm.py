"""LADM contextual dependency score (CDS; Chen et al. 2025, SPEC section 4).

Per layer, query chunks of `attn_chunk_size` tokens start at s = L - chunk, L - chunk - stride, ... while
s > keep_at_start + 4 * interval (stride = chunk * d_cds, interval = chunk * d_afs, keep_at_start = chunk).
For a chunk: p = softmax over the PREFIX keys [0, s) only of q_chunk . k / sqrt(D), summed over the
chunk's queries and averaged over heads. For t = interval, 2*interval, ... while s - t >= keep_at_start:
pfs_t = sum of p over keys [s - t, s - t + chunk). afs = sum_t pfs_t * t / L, times std_t(pfs_t)
(unbiased, before the length weights) and s / L. CDS = mean of afs over chunks, then over layers.
Ablations: `no_std` drops the std factor; `no_len_weight` drops t / L and s / L.

Only the sampled chunks' rows against their prefixes are computed, from q/k captured during an SDPA
forward (no attention maps). The authors cast the softmax to float16 before summing; we keep float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import ConfigError
from selection.scorers.registry import SCORERS, ScorerSetup, resolve_dtype, typed_options

ABLATIONS = ("none", "no_std", "no_len_weight")


@dataclass
class LadmOptions:
    attn_chunk_size: int = 128
    d_afs: int = 4
    d_cds: int = 4
    ablation: str = "none"
    """none | no_std | no_len_weight (the LADM paper's ablations)."""
    impl: str = "fast"
    """fast (vectorised over distances) | reference (the authors' loops, literally)."""
    dtype: str = "auto"
    """Model dtype: float32 | bfloat16 | float16 | auto (selection.scorer_model.dtype on CUDA, float32 on
    CPU). The authors load their model in float16 (LADM score.py)."""

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"selection.scoring.ablation={self.ablation}: choose one of {ABLATIONS}")
        if self.impl not in ("fast", "reference"):
            raise ConfigError(f"selection.scoring.impl={self.impl}: choose fast or reference")


def chunk_starts(length: int, chunk: int, d_afs: int, d_cds: int) -> list[int]:
    """Query-chunk starts, from the end backwards (the authors' `range(L - chunk, keep + 4*interval, -stride)`)."""
    return list(range(length - chunk, chunk + 4 * chunk * d_afs, -chunk * d_cds))


def _chunk_prefix_attention(q_HLD: torch.Tensor, k_KLD: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Sum over the chunk's queries, mean over heads, of softmax over prefix keys [0, start): shape [start]."""
    heads, _, dim = q_HLD.shape
    kv_heads = k_KLD.shape[0]
    rep = heads // kv_heads
    q = q_HLD[:, start:end].float().reshape(kv_heads, rep * (end - start), dim)
    scores = torch.bmm(q, k_KLD[:, :start].float().transpose(1, 2)) / math.sqrt(dim)
    return torch.softmax(scores, dim=-1).sum(dim=(0, 1)) / heads


def _afs(pfs: torch.Tensor, distances: torch.Tensor, start: int, length: int, ablation: str) -> torch.Tensor:
    std = pfs.std()
    if ablation != "no_len_weight":
        pfs = pfs * (distances / length)
    afs = pfs.sum()
    if ablation != "no_std":
        afs = afs * std
    if ablation != "no_len_weight":
        afs = afs * (start / length)
    return afs


def layer_cds(q_HLD: torch.Tensor, k_KLD: torch.Tensor, opts: LadmOptions) -> float:
    """One layer's CDS from its post-RoPE q [H, L, D] and k [K, L, D]."""
    length = q_HLD.shape[1]
    chunk, interval = opts.attn_chunk_size, opts.attn_chunk_size * opts.d_afs
    starts = chunk_starts(length, chunk, opts.d_afs, opts.d_cds)
    if not starts:
        raise ConfigError(
            f"LADM needs windows longer than keep_at_start + 4*interval + chunk = {chunk + 4 * interval + chunk} "
            f"tokens (got {length}); lower selection.scoring.attn_chunk_size or d_afs"
        )
    afs = []
    for start in starts:
        end = min(start + chunk, length)
        p = _chunk_prefix_attention(q_HLD, k_KLD, start, end).double()
        distances = torch.arange(  # s - t >= keep; on p's device (CUDA scoring)
            interval, start - chunk + 1, interval, dtype=torch.float64, device=p.device
        )
        prefix = torch.cat([p.new_zeros(1), p.cumsum(0)])
        lo = (start - distances).long()
        hi = torch.clamp(end - distances, max=start).long()
        pfs = prefix[hi] - prefix[lo]
        afs.append(_afs(pfs, distances, start, length, opts.ablation))
    return float(torch.stack(afs).mean())


def layer_cds_reference(q_HLD: torch.Tensor, k_KLD: torch.Tensor, opts: LadmOptions) -> float:
    """The authors' per-layer loop, literally (repeat_kv, 4-D tensors, a Python loop over distances)."""
    heads, length, dim = q_HLD.shape
    rep = heads // k_KLD.shape[0]
    query = q_HLD[None].float()
    key = k_KLD[None].float().repeat_interleave(rep, dim=1)
    chunk, interval, stride = (
        opts.attn_chunk_size,
        opts.attn_chunk_size * opts.d_afs,
        opts.attn_chunk_size * opts.d_cds,
    )
    keep_at_start = chunk
    all_afs = []
    for start_idx in range(length - chunk, keep_at_start + 4 * interval, -stride):
        end_idx = min(start_idx + chunk, length)
        context_len_ratio = start_idx / length
        w = torch.matmul(
            query[:, :, start_idx:end_idx, :], key[:, :, :start_idx, :].transpose(2, 3)
        ) / math.sqrt(dim)
        w = torch.softmax(w, dim=-1, dtype=torch.float32)
        w = w.sum(dim=2).mean(dim=1)
        all_pfs, intervals = [], []
        for t in range(interval, length + interval, interval):
            if start_idx - t < keep_at_start:
                break
            all_pfs.append(w[:, start_idx - t : end_idx - t].sum(dim=-1))
            intervals.append(t)
        all_pfs = torch.stack(all_pfs, dim=-1)
        pfs_std = all_pfs.std(dim=1)
        if opts.ablation != "no_len_weight":
            all_pfs = all_pfs * (torch.tensor(intervals, device=all_pfs.device) / length)
        afs = all_pfs.sum(dim=1)
        if opts.ablation != "no_std":
            afs = afs * pfs_std
        if opts.ablation != "no_len_weight":
            afs = afs * context_len_ratio
        all_afs.append(afs)
    return float(torch.stack(all_afs, dim=1).mean(dim=1)[0])


class LadmScorer:
    """All layers of the scorer model; each layer's CDS from q/k captured during an SDPA forward."""

    options_class = LadmOptions

    columns = ["cds"]
    requires_window_vocabulary = True

    def __init__(self, setup: ScorerSetup) -> None:
        from transformers import AutoModel

        from common.model_sources import resolve_model_path
        from selection.scorers.attention_capture import CAPTURE

        self.options = opts = typed_options(LadmOptions, setup.options, "ladm")
        device = torch.device(setup.device)
        dtype = resolve_dtype(opts.dtype, setup.device, setup.model_dtype)
        path = resolve_model_path(setup.model, setup.cache_dir)
        self.model = (
            AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=CAPTURE).to(device).eval()
        )
        self.device = device
        self.per_layer = layer_cds_reference if opts.impl == "reference" else layer_cds

    def score_window(self, window: np.ndarray) -> dict[str, float]:
        from selection.scorers.attention_capture import capture

        layers: dict[int, float] = {}

        def sink(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
            layers[layer] = self.per_layer(query[0], key[0], self.options)

        ids = torch.as_tensor(np.asarray(window, dtype=np.int64), device=self.device)[None]
        with capture(sink), torch.no_grad():
            self.model(input_ids=ids, use_cache=False)
        return {"cds": float(np.mean([layers[i] for i in sorted(layers)]))}

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str] = ()) -> list[dict[str, float]]:
        return [self.score_window(w) for w in windows]


SCORERS.add("ladm", LadmScorer)
