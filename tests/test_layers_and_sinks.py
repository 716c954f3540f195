"""LongAttn beyond the first layer, and attention-sink exclusion."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from selection.scorers.attention_stats import (
    blocked_head_stats,
    default_min_distance,
    head_stats,
    reference_head_stats,
)
from selection.scorers.deep_layers import LayerStackQK
from selection.scorers.registry import ScorerSetup, build_scorer


def maps_stats(attn_HLL: torch.Tensor, min_distance: int, sink: int = 0):
    length = attn_HLL.shape[-1]
    rows, cols = torch.arange(length)[:, None], torch.arange(length)[None]
    masked = attn_HLL.double() * ((rows - cols >= min_distance) & (cols >= sink))
    return masked.sum((-1, -2)) / length, masked.reshape(attn_HLL.shape[0], -1).var(-1)


def test_sink_exclusion_by_hand():
    """Uniform attention (q = 0), L = 8, k = 2, first key excluded: row r keeps c = 1..r-2, r >= 3."""
    s1 = sum(Fraction(r - 2, r + 1) for r in range(3, 8))
    s2 = sum(Fraction(r - 2, (r + 1) ** 2) for r in range(3, 8))
    ds, var = s1 / 8, (s2 - s1 * s1 / 64) / 63
    q, k = torch.zeros(2, 8, 4), torch.randn(1, 8, 4)
    for impl in ("reference", "blocked", "triton"):
        stats = head_stats(q, k, None, impl, exclude_sink_tokens=1)
        assert stats.ds.tolist() == pytest.approx([float(ds)] * 2, rel=1e-6), impl
        assert stats.variance.tolist() == pytest.approx([float(var)] * 2, rel=1e-6), impl


def test_non_causal_sink_exclusion_by_hand():
    """Non-causal uniform attention (q = 0): A = 1/8 everywhere; first key excluded: row r keeps
    c = 1..r-2 for r = 3..7, 1 + 2 + 3 + 4 + 5 = 15 entries of 1/8."""
    s1, s2 = Fraction(15, 8), Fraction(15, 64)
    ds, var = s1 / 8, (s2 - s1 * s1 / 64) / 63
    q, k = torch.zeros(2, 8, 4), torch.randn(1, 8, 4)
    for impl in ("reference", "blocked", "triton"):
        stats = head_stats(q, k, None, impl, exclude_sink_tokens=1, causal=False)
        assert stats.ds.tolist() == pytest.approx([float(ds)] * 2, rel=1e-6), impl
        assert stats.variance.tolist() == pytest.approx([float(var)] * 2, rel=1e-6), impl


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sink", [0, 1, 4, 100, 300])
def test_sink_exclusion_agrees_with_maps(sink, causal):
    gen = torch.Generator().manual_seed(sink)
    q, k = torch.randn(4, 300, 32, generator=gen) * 2, torch.randn(2, 300, 32, generator=gen) * 2
    full = reference_head_stats(q, k, causal=causal)
    ref = reference_head_stats(q, k, None, sink, causal=causal)
    got = blocked_head_stats(q, k, None, 64, 96, exclude_sink_tokens=sink, causal=causal)
    assert torch.allclose(got.ds, ref.ds, rtol=1e-4, atol=1e-12)
    assert torch.allclose(got.variance, ref.variance, rtol=1e-4, atol=1e-15)
    if sink:  # leaving keys out can only lower the far-region mass; the normaliser is unchanged
        assert (ref.ds <= full.ds + 1e-12).all()
    if sink >= 300 - default_min_distance(300):
        assert float(ref.ds.abs().max()) == 0.0


@pytest.mark.slow
def test_deep_layer_statistics_equal_eager_attention_maps(smollm2_dir):
    from transformers import AutoModelForCausalLM

    length = 128
    ids = torch.randint(0, 49152, (length,), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="eager")
    with torch.no_grad():
        maps = model(ids[None], output_attentions=True).attentions
    got = {}
    LayerStackQK(str(smollm2_dir), [0, 5, 29]).run(
        ids, lambda layer, q, k: got.__setitem__(layer, blocked_head_stats(q, k, exclude_sink_tokens=2))
    )
    for layer in (0, 5, 29):
        ds, var = maps_stats(maps[layer][0], default_min_distance(length), sink=2)
        assert torch.allclose(got[layer].ds, ds, rtol=1e-4, atol=0), layer
        assert torch.allclose(got[layer].variance, var, rtol=1e-4, atol=0), layer


@pytest.mark.parametrize("causal", [True, False])
def test_layer_zero_is_unchanged_by_the_multi_layer_path(smollm2_dir, causal):
    window = np.random.default_rng(1).integers(0, 49152, size=256)
    cache = smollm2_dir.parent.parent
    opts = {"causal": causal}
    first = build_scorer(ScorerSetup("longattn", "tiny_llama", opts, cache, "cpu")).score_batch([window])[0]
    both = build_scorer(ScorerSetup("longattn", "tiny_llama", {**opts, "layers": [0, 1]}, cache, "cpu"))
    row = both.score_batch([window])[0]
    assert both.columns == ["ds", "variance", "ds_l0", "ds_l1", "variance_l0", "variance_l1"]
    assert row["ds_l0"] == pytest.approx(first["ds"], rel=1e-6)
    assert row["variance_l0"] == pytest.approx(first["variance"], rel=1e-6)
    assert row["ds"] == pytest.approx((row["ds_l0"] + row["ds_l1"]) / 2)
    assert set(both.stats_seconds) == {(0, causal), (1, causal)}
    assert all(v > 0 for v in both.stats_seconds.values())


def test_non_causal_deep_layer_reads_q_k_of_the_causal_forward(smollm2_dir):
    """For layer 1, q/k come from the model's own causal forward (eager, recomputed here from each
    layer's input with a plain hook); only the statistics' softmax is non-causal."""
    from transformers import AutoModel
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from common.model_sources import resolve_model_path

    window = np.random.default_rng(2).integers(0, 49152, size=192)
    cache = smollm2_dir.parent.parent
    opts = {"layers": [0, 1], "causal": False, "sequence": "window"}
    scorer = build_scorer(ScorerSetup("longattn", "tiny_llama", opts, cache, "cpu"))
    stats = scorer.layer_stats(window, (True, False))
    row = scorer.score_batch([window])[0]
    eager = AutoModel.from_pretrained(resolve_model_path("tiny_llama", cache), attn_implementation="eager")
    inputs = []
    for layer in eager.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs: inputs.append(
                (mod, kwargs["hidden_states"], kwargs["position_embeddings"])
            ),
            with_kwargs=True,
        )
    with torch.no_grad():
        eager(input_ids=torch.as_tensor(window)[None])
        mod, hidden, (cos, sin) = inputs[1]
        shape = (*hidden.shape[:-1], -1, mod.head_dim)
        q = mod.q_proj(hidden).view(shape).transpose(1, 2)
        k = mod.k_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    for causal in (True, False):
        ref = reference_head_stats(q[0], k[0], causal=causal)
        assert torch.allclose(stats[1, causal].ds, ref.ds, rtol=1e-4), causal
        assert torch.allclose(stats[1, causal].variance, ref.variance, rtol=1e-4), causal
    assert row["ds_l1"] == pytest.approx(stats[1, False].mean_ds, rel=1e-9)
    assert abs(stats[1, True].mean_ds - stats[1, False].mean_ds) > 1e-3


def test_only_layers_up_to_i_are_loaded(tmp_path):
    """A 3-layer checkpoint whose layer 2 (and final norm) sit in a shard that is absent still scores layer 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    model = LlamaForCausalLM(config)
    model.save_pretrained(full_dir)
    config.save_pretrained(cut_dir)
    weights = {n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    early = {
        n: t
        for n, t in weights.items()
        if n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
    }
    late = {n: t for n, t in weights.items() if n not in early}
    save_file(early, cut_dir / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in early} | {
        n: "model-00002-of-00002.safetensors" for n in late
    }
    (cut_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    ids = torch.randint(0, 512, (96,), generator=torch.Generator().manual_seed(1))
    results = {}
    for name, path in (("full", full_dir), ("cut", cut_dir)):
        LayerStackQK(str(path), [1]).run(
            ids, lambda layer, q, k, name=name: results.__setitem__(name, (q, k))
        )
    assert torch.equal(results["full"][0], results["cut"][0]) and torch.equal(
        results["full"][1], results["cut"][1]
    )
    with pytest.raises(ValueError, match="the model has layers 0..2"):
        LayerStackQK(str(full_dir), [3])


def test_layer_options_are_validated(smollm2_dir):
    cache = smollm2_dir.parent.parent
    with pytest.raises(ValueError, match="per_head needs a single entry"):
        build_scorer(
            ScorerSetup("longattn", "tiny_llama", {"layers": [0, 1], "per_head": True}, cache, "cpu")
        )
    with pytest.raises(ValueError, match="exclude_sink_tokens=-1"):
        build_scorer(ScorerSetup("longattn", "tiny_llama", {"exclude_sink_tokens": -1}, cache, "cpu"))


def test_benchmark_layer_helpers():
    from benchmarks.selection_quality import layer_costs, parse_layers

    assert (
        parse_layers("all", 3) == [0, 1, 2]
        and parse_layers("0,5", 30) == [0, 5]
        and parse_layers(None, 3) is None
    )
    # 10 windows, 2.0 s each; statistics took 1 s (layer 0) and 3 s (layer 3) in all -> forward 1.6 s/window
    costs = layer_costs({(0, True): 1.0, (3, True): 3.0}, 2.0, 10)
    assert costs == pytest.approx({(0, True): 1.6 * 1 / 4 + 0.1, (3, True): 1.6 + 0.3})
    # both modes from one forward: 0.5 s of statistics per window in all -> forward 1.5 s/window
    costs = layer_costs({(0, True): 1.0, (0, False): 2.0, (3, True): 1.0, (3, False): 1.0}, 2.0, 10)
    assert costs == pytest.approx({(0, True): 0.475, (0, False): 0.575, (3, True): 1.6, (3, False): 1.6})
