"""LongAttn statistics: a hand-computed case, and every implementation against the literal reference."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from selection.scorers.attention_stats import (
    blocked_head_stats,
    default_min_distance,
    head_stats,
    reference_head_stats,
    stats_from_sums,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def test_min_distance_is_the_authors_mask():
    assert default_min_distance(32768) == 8192
    assert default_min_distance(8) == 2
    assert default_min_distance(1000) == 250
    assert default_min_distance(1023) == 1023 - 3 * 255


def test_uniform_attention_at_l8_by_hand():
    """q = 0 makes every causal row uniform: A[r, c] = 1/(r+1). With L = 8, k = 2 the far entries are
    r = 2..7, c = 0..r-2, so row r holds r-1 entries of 1/(r+1)."""
    length = 8
    s1 = sum(Fraction(r - 1, r + 1) for r in range(2, 8))
    s2 = sum(Fraction(r - 1, (r + 1) ** 2) for r in range(2, 8))
    ds = s1 / length
    var = (s2 - s1 * s1 / 64) / 63
    q = torch.zeros(2, length, 4)
    k = torch.randn(1, length, 4)
    for impl in ("reference", "blocked"):
        stats = head_stats(q, k, None, impl)
        assert stats.ds.tolist() == pytest.approx([float(ds)] * 2, rel=1e-6)
        assert stats.variance.tolist() == pytest.approx([float(var)] * 2, rel=1e-6)


def test_one_hot_attention_by_hand():
    """Huge scores on key 0 put all attention there: Mt = 1 at (r, 0) for r >= k, so S1 = S2 = L - k."""
    length, dim = 16, 8
    k = torch.zeros(1, length, dim)
    k[0, 0, 0] = 1000.0
    q = torch.zeros(1, length, dim)
    q[0, :, 0] = 1000.0
    stats = blocked_head_stats(q, k, min_distance=4)
    expected = stats_from_sums(torch.tensor([12.0]), torch.tensor([12.0]), length)
    assert rel_err(stats.ds, expected.ds) < 1e-6 and rel_err(stats.variance, expected.variance) < 1e-6
    assert float(stats.ds[0]) == pytest.approx(12 / 16)


def test_non_causal_uniform_attention_at_l8_by_hand():
    """q = 0 and no causal mask: every row is uniform over ALL L keys, A[r, c] = 1/8. The far entries are
    the same as causal (r = 2..7, c = 0..r-2: 21 of them), each 1/8."""
    s1, s2 = Fraction(21, 8), Fraction(21, 64)
    ds, var = s1 / 8, (s2 - s1 * s1 / 64) / 63
    q, k = torch.zeros(2, 8, 4), torch.randn(1, 8, 4)
    for impl in ("reference", "blocked", "triton"):
        stats = head_stats(q, k, None, impl, causal=False)
        assert stats.ds.tolist() == pytest.approx([float(ds)] * 2, rel=1e-6), impl
        assert stats.variance.tolist() == pytest.approx([float(var)] * 2, rel=1e-6), impl


def test_non_causal_normaliser_by_hand():
    """Scores depend on the key only: s[r, c] = log(c + 1), L = 4, k = 2. Far entries (2,0), (3,0), (3,1).
    Non-causal rows normalise over all keys (sum 1+2+3+4 = 10): 1/10, 1/10, 2/10. Causal rows over keys
    c <= r: row 2 sums 6 (1/6), row 3 sums 10 (1/10, 2/10)."""
    q = torch.zeros(1, 4, 4)
    q[0, :, 0] = 2.0  # / sqrt(4) = 1
    k = torch.zeros(1, 4, 4)
    k[0, :, 0] = torch.log(torch.arange(1.0, 5.0))
    cases = {
        False: [Fraction(1, 10), Fraction(1, 10), Fraction(2, 10)],
        True: [Fraction(1, 6), Fraction(1, 10), Fraction(2, 10)],
    }
    for causal, far in cases.items():
        s1, s2 = sum(far), sum(p * p for p in far)
        ds, var = s1 / 4, (s2 - s1 * s1 / 16) / 15
        for impl in ("reference", "blocked", "triton"):
            stats = head_stats(q, k, 2, impl, causal=causal)
            assert float(stats.ds[0]) == pytest.approx(float(ds), rel=1e-6), (impl, causal)
            assert float(stats.variance[0]) == pytest.approx(float(var), rel=1e-6), (impl, causal)


def test_non_causal_attention_to_a_future_key_by_hand():
    """Every query puts all its weight on the LAST key when it may see it. Non-causal: all mass sits at
    c = L-1, never in the far region (r - c >= k), so ds = variance = 0. Causal: rows r < L-1 cannot see
    it and stay uniform over c <= r (the q.k of every other key is 0), row L-1 puts its mass on itself."""
    length = 8
    q, k = torch.zeros(1, length, 4), torch.zeros(1, length, 4)
    q[0, :, 0] = 1.0
    k[0, -1, 0] = 1000.0
    causal_s1 = sum(Fraction(r - 1, r + 1) for r in range(2, 7))
    for impl in ("reference", "blocked", "triton"):
        free = head_stats(q, k, None, impl, causal=False)
        assert float(free.ds[0]) == 0.0 and float(free.variance[0]) == 0.0, impl
        masked = head_stats(q, k, None, impl, causal=True)
        assert float(masked.ds[0]) == pytest.approx(float(causal_s1 / length), rel=1e-6), impl


# (query heads, kv heads, head dim): MHA, GQA, MQA, across the ranges (heads 4-32, kv 1-8, dim 32-128)
SHAPES = {256: [(4, 1, 32), (8, 8, 128)], 1000: [(12, 4, 48), (6, 2, 96)], 2048: [(32, 8, 128), (9, 3, 64)]}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", sorted(SHAPES))
def test_blocked_matches_reference_on_random_gqa(length, causal):
    gen = torch.Generator().manual_seed(length)
    for heads, kv, dim in SHAPES[length]:
        q = torch.randn(heads, length, dim, generator=gen) * 1.5
        k = torch.randn(kv, length, dim, generator=gen) * 1.5
        ref = reference_head_stats(q, k, causal=causal)
        got = blocked_head_stats(q, k, causal=causal)
        assert rel_err(got.ds, ref.ds) < 1e-4, (heads, kv, dim)
        assert rel_err(got.variance, ref.variance) < 1e-4, (heads, kv, dim)


def test_causal_and_non_causal_differ_on_random_inputs():
    """The mode reaches the kernel: the same q/k give clearly different statistics."""
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 256, 32, generator=gen), torch.randn(2, 256, 32, generator=gen)
    causal, free = blocked_head_stats(q, k), blocked_head_stats(q, k, causal=False)
    assert float((causal.ds - free.ds).abs().min()) > 1e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("min_distance", "block_q", "block_k"), [(1, 64, 64), (37, 48, 80), (255, 100, 33), (128, 256, 512)]
)
def test_blocked_handles_any_block_and_distance(min_distance, block_q, block_k, causal):
    gen = torch.Generator().manual_seed(min_distance)
    q, k = torch.randn(6, 256, 32, generator=gen), torch.randn(2, 256, 32, generator=gen)
    ref = reference_head_stats(q, k, min_distance, causal=causal)
    got = blocked_head_stats(q, k, min_distance, block_q, block_k, causal=causal)
    assert rel_err(got.ds, ref.ds) < 1e-4 and rel_err(got.variance, ref.variance) < 1e-4


def test_half_precision_inputs_use_float32_statistics():
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(4, 300, 64, generator=gen) * 2).bfloat16()
    k = (torch.randn(2, 300, 64, generator=gen) * 2).bfloat16()
    ref = reference_head_stats(q.float(), k.float())
    got = blocked_head_stats(q, k)
    assert rel_err(got.ds, ref.ds) < 1e-4 and rel_err(got.variance, ref.variance) < 1e-4


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="GQA"):
        blocked_head_stats(torch.zeros(3, 8, 4), torch.zeros(2, 8, 4))
    with pytest.raises(ValueError, match="min_distance=0"):
        blocked_head_stats(torch.zeros(2, 8, 4), torch.zeros(1, 8, 4), min_distance=0)
    with pytest.raises(ValueError, match="scoring.impl=fast"):
        head_stats(torch.zeros(2, 8, 4), torch.zeros(1, 8, 4), impl="fast")
