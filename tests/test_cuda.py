"""The CUDA paths against their CPU results: every scorer, the Triton kernel, a DeepSpeed step, lm-eval.

Every test here is marked `cuda`: it skips where no CUDA device is visible (CI, CUDA_VISIBLE_DEVICES=)
and is run on a lent GPU by `benchmarks/gpu_suite.py` (part 2, `pytest -m cuda`). Models are the
embedded `tiny_llama` (random weights, SmolLM2's tokenizer: on the device the GPU kit provides the
tokenizer, no weights travel).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.model_sources import default_cache_dir, resolve_model_path
from selection.scorers.registry import ScorerSetup, build_scorer

pytestmark = pytest.mark.cuda

WINDOW = 512


def windows(n: int = 2, length: int = WINDOW, vocab: int = 49152) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, size=length, dtype=np.int64) for _ in range(n)]


def scores(method: str, device: str, **options) -> list[dict[str, float]]:
    setup = ScorerSetup(method, "tiny_llama", options, default_cache_dir(), device, "tiny_llama")
    scorer = build_scorer(setup)
    return scorer.score_batch(windows(), ["a/0/0", "b/0/0"])


def assert_close(got: list[dict], want: list[dict], rel: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=rel, abs=1e-12), (key, g[key], w[key])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["reference", "blocked", "triton"])
def test_longattn_on_cuda_equals_cpu(impl, causal):
    opts = {"impl": impl, "causal": causal, "dtype": "float32"}
    cpu = scores("longattn", "cpu", **{**opts, "impl": "reference"})
    assert_close(scores("longattn", "cuda", **opts), cpu, rel=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_longattn_half_precision_on_cuda_stays_near_fp32(dtype):
    """The scorer model in the paper configs' fp16 (authors) or bf16: q/k rounded, statistics fp32."""
    want = scores("longattn", "cpu", impl="reference", dtype="float32")
    assert_close(scores("longattn", "cuda", impl="triton", dtype=dtype), want, rel=1e-3)


def test_longattn_deep_layers_and_sinks_on_cuda():
    opts = {"layers": [0, 1], "exclude_sink_tokens": 4, "dtype": "float32"}
    cpu = scores("longattn", "cpu", impl="blocked", **opts)
    assert_close(scores("longattn", "cuda", impl="triton", **opts), cpu, rel=1e-4)


def test_ladm_on_cuda_equals_cpu():
    """The distance weights used to be created on the CPU and multiplied with CUDA tensors."""
    for impl in ("fast", "reference"):
        opts = {"attn_chunk_size": 16, "impl": impl, "dtype": "float32"}
        assert_close(scores("ladm", "cuda", **opts), scores("ladm", "cpu", **opts), rel=1e-4)


def test_prolong_on_cuda_equals_cpu():
    opts = {"chunk_size": 32, "sample_pairs": 40, "dtype": "float32", "batch_size": 8}
    assert_close(scores("prolong", "cuda", **opts), scores("prolong", "cpu", **opts), rel=1e-4)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("longppl", {"short_len": 128, "stride": 64}),
        ("longfilter", {"short_len": 128, "stride": 64}),
        ("ppl_gain", {"chunk_len": 256, "short_len": 128, "scored_len": 64}),
    ],
)
def test_long_vs_short_context_scorers_on_cuda_equal_cpu(method, options):
    """Full and truncated-context passes, batched short passes, the LM head in chunks: on CUDA as on CPU."""
    opts = {**options, "dtype": "float32", "head_chunk_tokens": 100}
    assert_close(scores(method, "cuda", **opts), scores(method, "cpu", **opts), rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_equals_blocked_on_gpu(dtype, causal):
    from selection.scorers.attention_stats import head_stats

    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(8, 2048, 128, generator=gen) * 2).to(dtype).cuda()
    k = (torch.randn(2, 2048, 128, generator=gen) * 2).to(dtype).cuda()
    blocked = head_stats(q, k, None, "blocked", 4, causal)
    triton = head_stats(q, k, None, "triton", 4, causal)
    for got, want in ((triton.ds, blocked.ds), (triton.variance, blocked.variance)):
        assert float(((got - want).abs() / want.abs()).max()) < 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_launches_on_the_tensors_gpu_not_the_current_one():
    from selection.scorers.attention_stats import head_stats

    q, k = torch.randn(4, 1024, 64), torch.randn(2, 1024, 64)
    want = head_stats(q.cuda(0), k.cuda(0), None, "triton")
    with torch.cuda.device(0):
        got = head_stats(q.cuda(1), k.cuda(1), None, "triton")
    assert torch.allclose(got.ds.cpu(), want.ds.cpu(), rtol=1e-6)


@pytest.mark.slow
def test_one_deepspeed_training_step_on_cuda(make_cfg):
    """debug=tiny trains fp32 (training=cpu_demo): attention auto must not pick flash-attn (no fp32
    kernels); the stage reports MFU from the exact GPU name when it is in the peak table."""
    from experiments.pipeline import run_pipeline
    from training.flops import PEAK_BF16_FLOPS
    from training.metrics import read_records

    manifests = run_pipeline(
        make_cfg("debug=tiny", "stages=[prepare,score,select,train]", "training.max_steps=1")
    )
    train = manifests["train"]
    assert train["steps"] == 1 and train["attn_implementation"] in ("flex_attention", "sdpa")
    (record,) = read_records(Path(train["model_dir"]).parent)
    assert np.isfinite(record["loss"]) and record["memory_gib"] > 0
    known = torch.cuda.get_device_name() in PEAK_BF16_FLOPS
    assert (record["mfu"] is not None) == known


@pytest.mark.slow
def test_one_lm_eval_request_on_cuda(make_cfg, tmp_path):
    from experiments.pipeline import run_pipeline

    manifests = run_pipeline(
        make_cfg(
            "debug=tiny",
            "stages=[evaluate]",
            f"evaluation.model={resolve_model_path('tiny_llama')}",
            "evaluation.suites=[niah]",
            "evaluation.niah.lengths=[256]",
            "evaluation.niah.depths=[50]",
            "evaluation.device=cuda",
        )
    )
    evaluate = manifests["evaluate"]
    assert evaluate["truncated_prompts"] == 0 and "niah" in evaluate["scores"]
    (results,) = tmp_path.rglob("results.json")
    assert json.loads(results.read_text())["truncated_prompts"] == 0
