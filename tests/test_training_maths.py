"""Training arithmetic (issue 5's pure parts): steps, LR, MFU, packing, mixture, chunked loss."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from training.chunked_loss import IGNORE_INDEX, chunked_lm_loss
from training.flops import flops_per_token, mfu, non_embedding_params
from training.mixture import MixtureSchedule
from training.packing import document_boundaries, pack_documents
from training.schedule import cosine_lr, plan_steps


def test_budget_to_steps_matches_the_issue_example():
    plan = plan_steps(5e9, global_batch_tokens=262_144, seq_len=32_768, micro_batch=1, world_size=1)
    assert plan.describe() == "tokens per step: 262,144; steps: 19,073"
    assert plan.grad_accumulation == 8  # the paper's micro-batch 1 x accumulation 8
    assert plan_steps(5e9, 262_144, 32_768, 1, 8).grad_accumulation == 1


def test_budget_errors_name_the_keys():
    with pytest.raises(ValueError, match="not a multiple of training.seq_len"):
        plan_steps(1e9, 100_000, 32_768)
    with pytest.raises(ValueError, match="do not split over micro_batch=1 x 3 ranks"):
        plan_steps(1e9, 262_144, 32_768, 1, 3)
    with pytest.raises(ValueError, match="less than one step"):
        plan_steps(1000, 262_144, 32_768)


def test_cosine_schedule_by_hand():
    assert cosine_lr(0, 1e-5, 10, 110) == pytest.approx(1e-6)
    assert cosine_lr(9, 1e-5, 10, 110) == pytest.approx(1e-5)
    assert cosine_lr(60, 1e-5, 10, 110) == pytest.approx(0.5e-5)  # half way through the decay
    assert cosine_lr(110, 1e-5, 10, 110, min_lr=1e-6) == 1e-6


def test_flops_per_token_for_llama3_8b_at_32k():
    # Llama-3-8B: 6.98e9 non-embedding parameters, 32 layers, d_model 4096, T = 32768
    f = flops_per_token(6.98e9, 32, 4096, 32768)
    assert f == pytest.approx(6 * 6.98e9 + 12 * 32 * 4096 * 32768)
    assert f == pytest.approx(9.342e10, rel=1e-3)
    # 3,000 tokens/s per H100 at that cost is 28.3 % MFU
    assert mfu(3000, f, 989e12) == pytest.approx(3000 * f / 989e12)
    assert mfu(3000, f, 989e12) == pytest.approx(0.2834, rel=1e-3)


def test_packing_boundaries_eos_and_positions():
    seqs = list(pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], seq_len=4, eos_id=0))
    assert [s.input_ids for s in seqs] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    assert [s.position_ids for s in seqs] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert document_boundaries(seqs[1].position_ids) == [0, 3]
    # the last doc's EOS would start a 4th sequence, which is incomplete and dropped
    assert all(len(s.input_ids) == 4 for s in seqs)


def test_mixture_proportions_are_met_and_resumable():
    mix = MixtureSchedule(
        {"arxiv": 0.3, "book": 0.3, "code": 0.3, "wiki": 0.03, "github": 0.03, "web": 0.04}, seed=7
    )
    counts = mix.counts(0, 20_000)
    for name, share in {"arxiv": 0.3, "code": 0.3, "web": 0.04}.items():
        assert abs(counts[name] / 20_000 - share) < 0.015
    # resuming at sequence 500 gives exactly the uninterrupted schedule
    assert mix.sources(0, 500) + mix.sources(500, 300) == mix.sources(0, 800)
    assert MixtureSchedule({"a": 1, "b": 1}, seed=1).sources(0, 50) != MixtureSchedule(
        {"a": 1, "b": 1}, seed=2
    ).sources(0, 50)
    assert Counter(MixtureSchedule({"only": 1.0}, 0).sources(0, 10)) == {"only": 10}


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
    gen = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[0, 3] = IGNORE_INDEX
    plain = F.cross_entropy(
        F.linear(hidden, weight)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_lm_loss(hidden, lambda h: F.linear(h, weight), labels, chunk_tokens=chunk)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_plain, g_chunked):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not math.isnan(float(chunked.detach()))


def test_non_embedding_params_excludes_the_tied_embedding():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # per layer: q 16x16, k 16x8, v 16x8, o 16x16, mlp 3 x 16x32, two norms of 16; plus the final norm
    per_layer = 256 + 128 + 128 + 256 + 3 * 512 + 2 * 16
    assert non_embedding_params(model) == 2 * per_layer + 16
    assert sum(p.numel() for p in model.parameters()) == non_embedding_params(model) + 100 * 16
