"""LongAttn's per-head attention statistics (SPEC section 2), as pure functions of post-RoPE q and k.

Shapes: q_HLD (query heads, tokens, head dim), k_KLD (key/value heads, tokens, head dim); query head h
reads key head h // (H // K), as HF's `repeat_kv`. For head h with softmax attention A (L x L, in float32)
and minimum distance k, Mt = A on entries (r, c) with r - c >= k, zero elsewhere:
    ds_h       = sum(Mt) / L
    variance_h = unbiased variance of Mt over all L*L entries, zeros included
Both follow from two sums per head, S1 = sum(Mt) and S2 = sum(Mt^2):
    ds = S1 / L,  variance = (S2 - S1^2 / N) / (N - 1),  N = L*L,
which is what the blocked and Triton versions accumulate without ever holding an L x L matrix.

`causal=True` (the paper's text): row r's softmax runs over keys c <= r. `causal=False` (the authors'
released code on full-length windows, SPEC section 2): row r's softmax runs over ALL L keys, future ones
included; the far region Mt is the same r - c >= k in both, only the normaliser differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.errors import ConfigError

IMPLS = ("reference", "blocked", "triton")


def default_min_distance(length: int) -> int:
    """k = L - mask_size with the authors' mask_size = 3 * (L // 4) (8192 at L = 32768)."""
    return length - 3 * (length // 4)


@dataclass(frozen=True)
class HeadStats:
    """Per-head statistics of one window (float64, shape [H])."""

    ds: torch.Tensor
    variance: torch.Tensor

    @property
    def mean_ds(self) -> float:
        return float(self.ds.mean())

    @property
    def mean_variance(self) -> float:
        return float(self.variance.mean())


def stats_from_sums(sum_p: torch.Tensor, sum_p2: torch.Tensor, length: int) -> HeadStats:
    """Per-head ds and unbiased variance from S1 = sum(Mt) and S2 = sum(Mt^2) (float64)."""
    sum_p, sum_p2 = sum_p.double(), sum_p2.double()
    n = float(length) * float(length)
    variance = (sum_p2 - sum_p * sum_p / n) / (n - 1) if n > 1 else torch.zeros_like(sum_p)
    return HeadStats(ds=sum_p / length, variance=variance)


def _check(q_HLD: torch.Tensor, k_KLD: torch.Tensor, min_distance: int) -> tuple[int, int, int, int]:
    if q_HLD.dim() != 3 or k_KLD.dim() != 3:
        raise ValueError(
            f"expected q [H, L, D] and k [K, L, D], got {tuple(q_HLD.shape)} and {tuple(k_KLD.shape)}"
        )
    heads, length, dim = q_HLD.shape
    kv_heads = k_KLD.shape[0]
    if k_KLD.shape[1:] != (length, dim) or heads % kv_heads:
        raise ValueError(
            f"q {tuple(q_HLD.shape)} and k {tuple(k_KLD.shape)} do not match (GQA needs H % K == 0)"
        )
    if min_distance < 1:
        raise ConfigError(f"scoring.min_distance={min_distance}: must be >= 1")
    return heads, kv_heads, length, dim


def reference_head_stats(
    q_HLD: torch.Tensor,
    k_KLD: torch.Tensor,
    min_distance: int | None = None,
    exclude_sink_tokens: int = 0,
    causal: bool = True,
) -> HeadStats:
    """The authors' algorithm, literally: full L x L softmax per head (causal, or over every key when
    `causal=False`), their triangular mask (with the first `exclude_sink_tokens` key columns cleared
    from it when asked).

    O(L^2) memory per head. Ground truth for tests and benchmarks only.
    """
    heads, kv_heads, length, dim = _check(q_HLD, k_KLD, min_distance or 1)
    k_dist = default_min_distance(length) if min_distance is None else min_distance
    mask_size = max(length - k_dist, 0)
    far_mask = torch.zeros(length, length, device=q_HLD.device)
    far_mask[length - mask_size :, :mask_size] = torch.tril(
        torch.ones(mask_size, mask_size, device=q_HLD.device)
    )
    far_mask[:, :exclude_sink_tokens] = 0
    future = torch.full((length, length), float("-inf"), device=q_HLD.device).triu(1)
    ds, variance = [], []
    for h in range(heads):
        k = k_KLD[h // (heads // kv_heads)].float()
        scores = q_HLD[h].float() @ k.transpose(0, 1) / math.sqrt(dim)
        if causal:
            scores = scores + future
        attn = torch.softmax(scores, dim=-1, dtype=torch.float32)
        masked = attn * far_mask
        variance.append(masked.double().var())
        ds.append(masked.double().sum() / length)
    return HeadStats(ds=torch.stack(ds), variance=torch.stack(variance))


def blocked_head_sums(
    q_HLD: torch.Tensor,
    k_KLD: torch.Tensor,
    min_distance: int,
    block_q: int = 256,
    block_k: int = 512,
    exclude_sink_tokens: int = 0,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head S1 = sum(Mt), S2 = sum(Mt^2) without materialising L x L.

    For each query block, key blocks up to the causal diagonal (later tiles are skipped; with
    `causal=False` every key block, since the normaliser runs over all L keys) with an online softmax:
    running row max m and normaliser l, and running far-region sums s1 = sum exp(s - m) and
    s2 = sum exp(2(s - m)), all rescaled when m grows. At the end a row's sum of p over far keys is s1 / l
    and of p^2 is s2 / l^2. Scores and sums are float32 whatever the input dtype; totals float64.
    Keys before `exclude_sink_tokens` stay in the normaliser but not in the far region.
    """
    heads, kv_heads, length, dim = _check(q_HLD, k_KLD, min_distance)
    rep = heads // kv_heads
    q = q_HLD.reshape(kv_heads, rep, length, dim)
    k = k_KLD.float()
    scale = dim**-0.5
    device = q.device
    sum_p = torch.zeros(kv_heads, rep, dtype=torch.float64, device=device)
    sum_p2 = torch.zeros_like(sum_p)
    for r0 in range(0, length, block_q):
        r1 = min(r0 + block_q, length)
        n = r1 - r0
        q_blk = q[:, :, r0:r1].reshape(kv_heads, rep * n, dim).float() * scale  # a block-sized copy only
        rows = torch.arange(r0, r1, device=device)[:, None]
        m = torch.full((kv_heads, rep, n), float("-inf"), device=device)
        norm = torch.zeros((kv_heads, rep, n), device=device)
        s1 = torch.zeros_like(norm)
        s2 = torch.zeros_like(norm)
        last_key = r1 if causal else length
        for c0 in range(0, last_key, block_k):
            c1 = min(c0 + block_k, last_key)
            s = torch.bmm(q_blk, k[:, c0:c1].transpose(1, 2)).view(kv_heads, rep, n, c1 - c0)
            cols = torch.arange(c0, c1, device=device)[None, :]
            if causal and c1 - 1 > r0:  # tile crosses the diagonal: hide future keys
                s.masked_fill_(cols > rows, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp(m - m_new)
            p = s.sub_(m_new[..., None]).exp_()
            row_sum = p.sum(-1)
            norm.mul_(alpha).add_(row_sum)
            s1.mul_(alpha)
            s2.mul_(alpha * alpha)
            sink = exclude_sink_tokens
            if c1 - 1 <= r0 - min_distance and c0 >= sink:  # whole tile is in the far region
                s1.add_(row_sum)
                s2.add_(torch.linalg.vecdot(p, p))
            elif c0 <= r1 - 1 - min_distance and c1 > sink:  # tile straddles a far-region boundary
                far = p * ((cols <= rows - min_distance) & (cols >= sink))
                s1.add_(far.sum(-1))
                s2.add_(torch.linalg.vecdot(far, far))
            m = m_new
        sum_p += (s1 / norm).sum(-1, dtype=torch.float64)
        sum_p2 += (s2 / (norm * norm)).sum(-1, dtype=torch.float64)
    return sum_p.reshape(heads), sum_p2.reshape(heads)


def blocked_head_stats(
    q_HLD: torch.Tensor,
    k_KLD: torch.Tensor,
    min_distance: int | None = None,
    block_q: int = 256,
    block_k: int = 512,
    exclude_sink_tokens: int = 0,
    causal: bool = True,
) -> HeadStats:
    length = q_HLD.shape[1]
    k_dist = default_min_distance(length) if min_distance is None else min_distance
    sums = blocked_head_sums(q_HLD, k_KLD, k_dist, block_q, block_k, exclude_sink_tokens, causal)
    return stats_from_sums(*sums, length)


def head_stats(
    q_HLD: torch.Tensor,
    k_KLD: torch.Tensor,
    min_distance: int | None = None,
    impl: str = "blocked",
    exclude_sink_tokens: int = 0,
    causal: bool = True,
) -> HeadStats:
    """One entry point for the three implementations (`scoring.impl`); `causal` as `scoring.causal`."""
    if exclude_sink_tokens < 0:
        raise ConfigError(f"scoring.exclude_sink_tokens={exclude_sink_tokens}: must be >= 0")
    if impl == "reference":
        return reference_head_stats(q_HLD, k_KLD, min_distance, exclude_sink_tokens, causal)
    if impl == "blocked":
        return blocked_head_stats(
            q_HLD, k_KLD, min_distance, exclude_sink_tokens=exclude_sink_tokens, causal=causal
        )
    if impl == "triton":
        from selection.scorers.attention_stats_triton import triton_head_stats

        return triton_head_stats(
            q_HLD, k_KLD, min_distance, exclude_sink_tokens=exclude_sink_tokens, causal=causal
        )
    raise ConfigError(f"scoring.impl={impl}: choose one of {IMPLS} (or auto)")
