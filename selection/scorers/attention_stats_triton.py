"""Fused Triton kernel for LongAttn's per-head sums (same maths as `blocked_head_sums`, one pass).

One program per (query block, query head): it loads its query tile once, walks key tiles only up to the
causal diagonal (later tiles are never visited; with CAUSAL off, every key tile, since the normaliser then
runs over all L keys), keeps an online softmax (row max m, normaliser l) and
running far-region sums s1 = sum exp(s - m), s2 = sum exp(2(s - m)) in float32 registers, and writes
per-row sums of p and p^2 (s1 / l, s2 / l^2). The host adds rows in float64. Inputs bf16/fp16/fp32;
fp32 inputs use IEEE dot products (no TF32) so they agree with the reference to 1e-4.

On a CPU machine it runs under the Triton interpreter (TRITON_INTERPRET=1), which is how CI tests it.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from selection.scorers.attention_stats import HeadStats, _check, default_min_distance, stats_from_sums


@triton.jit
def _far_sums_kernel(
    q_ptr,
    k_ptr,
    out1_ptr,
    out2_ptr,
    stride_qh,
    stride_ql,
    stride_kh,
    stride_kl,
    length,
    min_distance,
    sink,
    scale,
    REP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // REP
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, DIM_P2)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + head * stride_qh + rows[:, None] * stride_ql + dims[None, :],
        mask=(rows[:, None] < length) & dim_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    s1 = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    if CAUSAL:  # noqa: SIM108  (a constexpr branch the Triton compiler resolves)
        hi = tl.minimum((block + 1) * BLOCK_M, length)  # causal tile skipping
    else:
        hi = length
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_ptr + kv_head * stride_kh + cols[None, :] * stride_kl + dims[:, None],
            mask=(cols[None, :] < length) & dim_ok[:, None],
            other=0.0,
        )
        if IEEE:  # noqa: SIM108  (a constexpr branch the Triton compiler resolves)
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        visible = cols[None, :] < length
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        far = visible & ((rows[:, None] - cols[None, :]) >= min_distance) & (cols[None, :] >= sink)
        pf = tl.where(far, p, 0.0)
        s1 = s1 * alpha + tl.sum(pf, 1)
        s2 = s2 * alpha * alpha + tl.sum(pf * pf, 1)
        m_i = m_new
    row_ok = rows < length
    safe_l = tl.where(row_ok, l_i, 1.0)
    tl.store(out1_ptr + head * length + rows, s1 / safe_l, mask=row_ok)
    tl.store(out2_ptr + head * length + rows, s2 / (safe_l * safe_l), mask=row_ok)


def triton_head_sums(
    q_HLD: torch.Tensor,
    k_KLD: torch.Tensor,
    min_distance: int,
    block_m: int = 64,
    block_n: int = 64,
    exclude_sink_tokens: int = 0,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    heads, kv_heads, length, dim = _check(q_HLD, k_KLD, min_distance)
    q, k = q_HLD.contiguous(), k_KLD.contiguous()
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # Triton 3.9's interpreter emulates bf16 dot products wrongly (measured: 0.5 relative error on
        # ds, while fp16 and fp32 match to 1e-7); interpret bf16 inputs as exact fp32 instead.
        q, k = q.float(), k.float()
    out1 = torch.empty(heads, length, device=q.device, dtype=torch.float32)
    out2 = torch.empty_like(out1)
    grid = (triton.cdiv(length, block_m), heads)
    # Triton launches on the current CUDA device: make it q's, whatever the caller's current device is
    launch_on = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with launch_on:
        _far_sums_kernel[grid](
            q,
            k,
            out1,
            out2,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            length,
            min_distance,
            exclude_sink_tokens,
            dim**-0.5,
            REP=heads // kv_heads,
            HEAD_DIM=dim,
            DIM_P2=max(16, triton.next_power_of_2(dim)),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            IEEE=q.dtype == torch.float32,
            CAUSAL=bool(causal),
        )
    return out1.sum(-1, dtype=torch.float64), out2.sum(-1, dtype=torch.float64)


def triton_head_stats(
    q_HLD: torch.Tensor,
    k_KLD: torch.Tensor,
    min_distance: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
    exclude_sink_tokens: int = 0,
    causal: bool = True,
) -> HeadStats:
    length = q_HLD.shape[1]
    k_dist = default_min_distance(length) if min_distance is None else min_distance
    sums = triton_head_sums(q_HLD, k_KLD, k_dist, block_m, block_n, exclude_sink_tokens, causal)
    return stats_from_sums(*sums, length)
