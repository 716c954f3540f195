"""Rival scorers: their formulas on hand-made inputs, literal references, determinism, the demo runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.pipeline import run_pipeline
from selection.scorers.ladm import ABLATIONS, LadmOptions, chunk_starts, layer_cds, layer_cds_reference
from selection.scorers.prolong import (
    NO_PAIR,
    dependency_entropy,
    long_dependency_score,
    sample_chunks,
    sample_pairs,
)
from selection.scorers.registry import ScorerSetup, build_scorer, window_rng

# ---------------------------------------------------------------- ProLong


def test_dependency_entropy_by_hand():
    assert dependency_entropy([3.0]) == 1.0  # one entry: fully concentrated
    assert dependency_entropy([2.0, 2.0]) == pytest.approx(0.0)  # uniform: no concentration
    p = np.exp([1.0, 5.0]) / np.exp([1.0, 5.0]).sum()
    h = -(p * np.log(p)).sum()
    assert dependency_entropy([1.0, 5.0]) == pytest.approx((math.log(2) - h) / math.log(2))


def test_lds_on_a_3x3_matrix_by_hand():
    """single = 10 everywhere; pairs (1,0) = 8, (2,0) = 9, (2,1) = 5; chunk_num 3 -> distance scale 1/2.
    Row 1: delta 0.2 > 0.1, gain (1-0)/2 = 0.5, DE 1 (one entry) -> 0.7.
    Row 2: delta 0.1 is NOT above the threshold; delta 0.5 -> (0.5 + 0.5) * DE([1, 5])."""
    single = [10.0, 10.0, 10.0]
    pair = np.full((3, 3), NO_PAIR)
    pair[1, 0], pair[2, 0], pair[2, 1] = 8.0, 9.0, 5.0
    lds, delta, de = long_dependency_score(single, pair, chunk_num=3, threshold=0.1)
    assert delta[1, 0] == pytest.approx(0.2) and delta[2, 1] == pytest.approx(0.5)
    assert de[1] == 1.0 and de[2] == pytest.approx(dependency_entropy([1.0, 5.0]))
    assert lds == pytest.approx(0.7 + 1.0 * de[2])


def test_unsampled_pairs_do_not_count():
    pair = np.full((3, 3), NO_PAIR)
    pair[2, 0] = 5.0
    lds, _, de = long_dependency_score([10.0, 10.0, 10.0], pair, chunk_num=3)
    assert de.tolist() == [0.0, 0.0, 1.0]
    assert lds == pytest.approx(0.5 + 1.0)  # distance 2 * 1/2 = 1


def test_chunk_and_pair_sampling():
    rng = np.random.default_rng(0)
    kept = sample_chunks(10, 4, rng)
    assert kept == sorted(kept) and len(set(kept)) == 4  # order preserved, no repeats
    assert sample_chunks(3, 4, rng) == [0, 1, 2]
    assert sample_pairs(4, 500, "authors", rng) == []  # the authors' quirk: 6 < 500 pairs -> none
    assert len(sample_pairs(4, 500, "all", rng)) == 6
    pairs = sample_pairs(40, 50, "authors", rng)
    assert len(pairs) == len(set(pairs)) == 50 and all(j < i for i, j in pairs)


def test_window_rng_depends_only_on_seed_and_id():
    assert window_rng(1, "a").random() == window_rng(1, "a").random()
    assert window_rng(1, "a").random() != window_rng(2, "a").random()


@pytest.fixture(scope="module")
def tiny_setup(smollm2_dir):
    return lambda method, **opts: ScorerSetup(
        method, "tiny_llama", opts, smollm2_dir.parent.parent, "cpu", "tiny_llama"
    )


def test_prolong_batched_equals_reference(tiny_setup):
    window = np.random.default_rng(3).integers(0, 49152, size=256)
    opts = {"chunk_size": 16, "sample_pairs": 30}
    fast = build_scorer(tiny_setup("prolong", **opts, batch_size=7)).score_batch([window], ["w/1"])[0]
    ref = build_scorer(tiny_setup("prolong", **opts, impl="reference")).score_batch([window], ["w/1"])[0]
    assert fast["n_chunks"] == 16 and fast["n_pairs"] == 30
    for key in ("lds", "mean_delta"):
        assert fast[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-9)


def test_prolong_retokenizes_without_bos_so_chunks_start_where_the_authors_do(tmp_path, smollm2_dir):
    """A scorer tokenizer that prepends a BOS by default (as OPT's `</s>`), with a vocabulary of its own:
    windows are decoded and re-encoded WITHOUT that BOS (the authors set add_bos_token=False), so chunk i
    holds text tokens [i*c, (i+1)*c) and a trailing partial chunk is dropped, as their construct_data."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from common.model_sources import resolve_model_path

    other = tmp_path / "other"
    shutil.copytree(resolve_model_path("tiny_llama", smollm2_dir.parent.parent), other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A",
        special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))],
    )
    tok.save_pretrained(other)
    tok = AutoTokenizer.from_pretrained(other)
    scorer = build_scorer(
        ScorerSetup("prolong", str(other), {"chunk_size": 16}, smollm2_dir.parent.parent, "cpu", "tiny_llama")
    )
    assert scorer.windows_tokenizer is not None
    text = "def f(x):\n    return x + 1\n" * 40
    window = tok(text, add_special_tokens=False).input_ids[:250]
    decoded = scorer.windows_tokenizer.decode(window)
    with_bos = tok(decoded).input_ids
    assert with_bos[0] == tok.convert_tokens_to_ids("<|endoftext|>")  # what the default would prepend
    text_ids = tok(decoded, add_special_tokens=False).input_ids
    assert scorer._token_ids(np.array(window)) == text_ids == with_bos[1:]
    seen = []

    def perplexities(sequences, scored):
        seen.append(sequences)
        return [2.0] * len(sequences)

    scorer._perplexities = perplexities
    scorer.score_batch([np.array(window)], ["w"])
    n = len(text_ids) // 16
    assert n == 15 and seen[0] == [text_ids[16 * i : 16 * (i + 1)] for i in range(n)]  # single chunks


# ---------------------------------------------------------------- LADM


def test_chunk_starts_follow_the_authors_range():
    # L = 1024, chunk 32, d_afs 4, d_cds 4: interval 128, stride 128, starts while s > 32 + 512
    assert chunk_starts(1024, 32, 4, 4) == [992, 864, 736, 608]
    assert chunk_starts(32768, 128, 4, 4)[:2] == [32640, 32128] and chunk_starts(2000, 128, 4, 4) == []


def test_ladm_pfs_afs_on_a_synthetic_pattern():
    """q = 0: every prefix softmax is uniform, p = chunk/s per key (summed over the chunk's queries).
    With L=1024, chunk 32, interval 128: for s = 992 the distances 128..896 fit (s - t >= 32), each
    pfs_t = 32 * 32/992; std over 7 equal values is 0, so afs = 0 for every chunk and CDS = 0."""
    q, k = torch.zeros(2, 1024, 8), torch.randn(1, 1024, 8)
    assert layer_cds(q, k, LadmOptions(attn_chunk_size=32)) == pytest.approx(0.0, abs=1e-12)
    # Without the std factor: afs = sum_t pfs_t * t/L * s/L, pfs_t = chunk^2 / s, averaged over chunks.
    expected = []
    for s in chunk_starts(1024, 32, 4, 4):
        ts = list(range(128, s - 32 + 1, 128))
        expected.append(sum(32 * 32 / s * t / 1024 for t in ts) * s / 1024)
    got = layer_cds(q, k, LadmOptions(attn_chunk_size=32, ablation="no_std"))
    assert got == pytest.approx(float(np.mean(expected)), rel=1e-6)  # float32 softmax


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ladm_fast_equals_the_authors_loop(ablation):
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(6, 1500, 32, generator=gen), torch.randn(2, 1500, 32, generator=gen)
    opts = LadmOptions(attn_chunk_size=64, ablation=ablation)
    assert layer_cds(q, k, opts) == pytest.approx(layer_cds_reference(q, k, opts), rel=1e-4)


def test_ladm_captures_every_layer_of_the_model(tiny_setup, smollm2_dir):
    """The scorer's per-layer q/k (captured during an SDPA forward) equal an eager recomputation."""
    from transformers import AutoModel

    from common.model_sources import resolve_model_path

    window = np.random.default_rng(5).integers(0, 49152, size=256)
    scorer = build_scorer(tiny_setup("ladm", attn_chunk_size=8))
    cds = scorer.score_batch([window], ["w"])[0]["cds"]
    eager = AutoModel.from_pretrained(
        resolve_model_path("tiny_llama", smollm2_dir.parent.parent), attn_implementation="eager"
    )
    per_layer = []
    for layer in eager.layers:  # recompute q/k from each layer's input, captured with a plain hook
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs: per_layer.append(
                (mod, args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
            ),
            with_kwargs=True,
        )
    with torch.no_grad():
        eager(input_ids=torch.as_tensor(window)[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    values = []
    for mod, hidden, (cos, sin) in per_layer:
        shape = (*hidden.shape[:-1], -1, mod.head_dim)
        q = mod.q_proj(hidden).view(shape).transpose(1, 2)
        kk = mod.k_proj(hidden).view(shape).transpose(1, 2)
        q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
        values.append(layer_cds_reference(q[0].detach(), kk[0].detach(), LadmOptions(attn_chunk_size=8)))
    assert len(values) == 2
    assert cds == pytest.approx(float(np.mean(values)), rel=1e-4)


# ---------------------------------------------------------------- random and the stages

SMALL = (
    "data.sources=[{domain: code, format: python_code, options: {packages: [json, tomllib]}},"
    "{domain: docs, format: python_docs, options: {modules: [json, textwrap, difflib], reference_topics: false}}]"
)


@pytest.mark.parametrize("method", ["random", "ladm", "prolong"])
def test_each_method_runs_prepare_score_select(make_cfg, method):
    cfg = make_cfg(
        "debug=tiny",
        SMALL,
        "data.max_windows_per_domain=6",
        f"selection={method}",
        "stages=[prepare,score,select]",
    )
    manifests = run_pipeline(cfg)
    column = {"random": "u", "ladm": "cds", "prolong": "lds"}[method]
    assert column in manifests["score"]["columns"]
    assert manifests["select"]["per_domain"]["code"]["windows"] == 3
    index = json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text())
    import pyarrow.parquet as pq

    scores = pq.read_table(Path(index["score"]) / "scores.parquet").column(column).to_pylist()
    assert all(np.isfinite(scores)) and len(set(scores)) > 1


def test_random_scores_are_seeded_and_order_free(tiny_setup):
    scorer = build_scorer(tiny_setup("random", seed=3))
    a = scorer.score_batch([None, None], ["x", "y"])
    b = scorer.score_batch([None, None], ["y", "x"])
    assert a == b[::-1] and 0 <= a[0]["u"] < 1
    other = build_scorer(tiny_setup("random", seed=4)).score_batch([None], ["x"])
    assert other[0] != a[0]


def test_roc_auc_known_values():
    from selection.analysis import roc_auc

    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 3], [2, 4]) == 0.25  # (1>2? no, 1>4? no, 3>2 yes, 3>4 no) = 1/4
    assert roc_auc([2, 2], [2, 2]) == 0.5  # all ties
    assert roc_auc([0.9, 0.8, 0.3], [0.1, 0.8]) == pytest.approx((2 + 1.5 + 1) / 6)


def test_benchmark_auc_intervals():
    from benchmarks.selection_quality import AucJudge, auc_interval, window_labels

    ones = np.ones((50, 2))
    assert auc_interval(np.array([3.0, 4.0]), np.array([1.0, 2.0]), ones, ones) == (1.0, 1.0, 1.0)
    # one resample drawing the first positive twice and the second negative twice: 1 > 2? no -> 0
    auc, lo, hi = auc_interval(
        np.array([1.0, 3.0]), np.array([2.0, 4.0]), np.array([[2, 0]]), np.array([[0, 2]])
    )
    assert (auc, lo, hi) == (0.25, 0.0, 0.0)
    labels = window_labels(["a", "b"], 30)
    values = np.random.default_rng(1).normal(size=120) + np.tile(np.repeat([0.8, 0.0], 30), 2)
    first, again = AucJudge(labels, 500, 7)(values), AucJudge(labels, 500, 7)(values)
    assert first == again  # seeded
    for auc, lo, hi in first.values():
        assert lo < auc < hi and 0.1 < hi - lo < 0.4  # 30 vs 30: a half-width near 0.1-0.15


def test_benchmark_windows_are_coherent_or_stitched():
    from benchmarks.selection_quality import build_windows

    docs = [list(range(i * 1000, i * 1000 + 600)) for i in range(5)]
    coherent, stitched = build_windows(docs, window=256, count=3, piece=64, rng=np.random.default_rng(0))
    for w in coherent:  # one contiguous run of one document
        assert len(w) == 256 and all(b - a == 1 for a, b in zip(w, w[1:]))
    for w in stitched:  # several documents, switching every 64 tokens
        assert len(w) == 256 and len({t // 1000 for t in w}) > 1
        assert all(w[k] // 1000 != w[k + 1] // 1000 for k in range(63, 255, 64))
