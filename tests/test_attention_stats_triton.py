"""The fused Triton kernel against the literal reference (CPU: under TRITON_INTERPRET=1, set in conftest)."""

from __future__ import annotations

import pytest
import torch

from selection.scorers.attention_stats import head_stats, reference_head_stats
from selection.scorers.attention_stats_triton import triton_head_stats

triton = pytest.importorskip("triton", reason="triton is installed with the dev extras")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def rel_err(a, b) -> float:
    return float(((a.cpu() - b.cpu()).abs() / b.cpu().abs()).max())


# (length, heads, kv heads, head dim); 2048 kept small because the interpreter runs tiles in numpy
CASES = [(256, 4, 1, 32), (256, 8, 8, 128), (1000, 6, 2, 48), (2048, 4, 2, 32)]


@pytest.mark.parametrize(("length", "heads", "kv", "dim"), CASES)
def test_triton_matches_reference_fp32(length, heads, kv, dim):
    gen = torch.Generator().manual_seed(length + dim)
    q = torch.randn(heads, length, dim, generator=gen) * 1.5
    k = torch.randn(kv, length, dim, generator=gen) * 1.5
    ref = reference_head_stats(q, k)
    got = head_stats(q.to(DEVICE), k.to(DEVICE), None, "triton")
    assert rel_err(got.ds, ref.ds) < 1e-4 and rel_err(got.variance, ref.variance) < 1e-4


# Non-causal visits every key tile; 128-wide tiles keep the interpreter's tile count down on CPU.
NON_CAUSAL = [(256, 4, 1, 32, 0), (1000, 6, 2, 48, 3), (2048, 2, 1, 16, 0)]


@pytest.mark.parametrize(("length", "heads", "kv", "dim", "sink"), NON_CAUSAL)
def test_triton_matches_reference_non_causal_fp32(length, heads, kv, dim, sink):
    gen = torch.Generator().manual_seed(length + dim + 1)
    q = torch.randn(heads, length, dim, generator=gen) * 1.5
    k = torch.randn(kv, length, dim, generator=gen) * 1.5
    ref = reference_head_stats(q, k, None, sink, causal=False)
    blocks = 64 if ON_GPU or length <= 256 else 128
    got = triton_head_stats(
        q.to(DEVICE), k.to(DEVICE), None, blocks, blocks, exclude_sink_tokens=sink, causal=False
    )
    assert rel_err(got.ds, ref.ds) < 1e-4 and rel_err(got.variance, ref.variance) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(4, 256, 64, generator=gen) * 1.5).to(dtype)
    k = (torch.randn(2, 256, 64, generator=gen) * 1.5).to(dtype)
    ref = reference_head_stats(q.float(), k.float())
    got = head_stats(q.to(DEVICE), k.to(DEVICE), None, "triton")
    assert rel_err(got.ds, ref.ds) < 1e-3 and rel_err(got.variance, ref.variance) < 1e-3


def test_triton_custom_distance_and_real_weights(smollm2_dir):
    from selection.scorers.first_layer import FirstLayerQK

    ids = torch.randint(0, 49152, (512,), generator=torch.Generator().manual_seed(9))
    q, k = FirstLayerQK.from_pretrained(str(smollm2_dir))(ids)
    for distance in (None, 100):
        ref = reference_head_stats(q, k, distance)
        got = head_stats(q.to(DEVICE), k.to(DEVICE), distance, "triton")
        assert rel_err(got.ds, ref.ds) < 1e-4 and rel_err(got.variance, ref.variance) < 1e-4
