"""Training arithmetic: steps of the paper batch, LR, MFU, packing, mixture, chunked loss, the
token-weighted loss over uneven micro-batches."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from common.chunked_loss import IGNORE_INDEX, chunked_lm_loss
from training.flops import (
    flops_per_token,
    mfu,
    non_embedding_params,
    squared_document_lengths,
    step_flops,
)
from training.mixture import MixtureSchedule
from training.packing import document_boundaries, pack_documents
from training.schedule import cosine_lr, plan_steps
from training.targets import count_targets, micro_batch_loss_scale, next_token_labels


@pytest.mark.parametrize(("ranks", "accumulation"), [(8, 8), (16, 4), (64, 1)])
def test_the_paper_batch_runs_on_8_16_and_64_ranks(ranks, accumulation):
    """64 sequences of 32K per step whatever the world size; accumulation is derived."""
    plan = plan_steps(5e9, global_batch_tokens=2_097_152, seq_len=32_768, micro_batch=1, world_size=ranks)
    assert plan.grad_accumulation == accumulation and plan.sequences_per_step == 64
    assert plan.steps == 2_384 == 5e9 // (64 * 32_768)
    assert plan.describe() == (
        f"tokens per step: 2,097,152 (64 sequences of 32,768 = micro-batch 1 x accumulation {accumulation} "
        f"x {ranks} ranks); steps: 2,384"
    )


def test_budget_errors_name_the_keys():
    with pytest.raises(ValueError, match="not a multiple of training.seq_len"):
        plan_steps(1e9, 100_000, 32_768)
    with pytest.raises(
        ValueError, match=r"64 sequences per step, which do not split over training.micro_batch=1 x 3"
    ):
        plan_steps(1e9, 2_097_152, 32_768, 1, 3)
    with pytest.raises(ValueError, match="x 128 ranks"):
        plan_steps(1e9, 2_097_152, 32_768, 1, 128)
    with pytest.raises(ValueError, match="less than one step"):
        plan_steps(1000, 2_097_152, 32_768)


def test_cosine_schedule_by_hand():
    assert cosine_lr(0, 1e-5, 10, 110) == pytest.approx(1e-6)
    assert cosine_lr(9, 1e-5, 10, 110) == pytest.approx(1e-5)
    assert cosine_lr(60, 1e-5, 10, 110) == pytest.approx(0.5e-5)  # half way through the decay
    assert cosine_lr(110, 1e-5, 10, 110, min_lr=1e-6) == 1e-6


def test_flops_per_token_for_llama3_8b_at_32k():
    # Llama-3-8B: 7.505e9 non-embedding parameters (8.030e9 minus the 128,256 x 4,096 input embedding; the
    # untied LM head counts), 32 layers, d_model 4096, T = 32768
    n = 8_030_261_248 - 128_256 * 4_096
    assert n == pytest.approx(7.505e9, rel=1e-4)
    f = flops_per_token(n, 32, 4096, 32768)
    assert f == pytest.approx(6 * n + 12 * 32 * 4096 * 32768)
    assert f == pytest.approx(9.657e10, rel=1e-3)
    # 3,000 tokens/s per H100 at that cost is 29.3 % MFU
    assert mfu(3000, f, 989e12) == pytest.approx(0.2929, rel=1e-3)


def test_packed_attention_flops_are_counted_per_document():
    # one unpacked row of 8 tokens, one packed row of documents 3 + 4 + 1 tokens
    positions = torch.tensor([list(range(8)), [0, 1, 2, 0, 1, 2, 3, 0]])
    assert squared_document_lengths(positions) == 64 + (9 + 16 + 1)
    # 6 N per token plus 12 L d sum(l^2): the unpacked row costs the T^2 figure, the packed one less
    n, layers, d = 1000.0, 2, 16
    assert step_flops(n, layers, d, 16, 90) == 6 * n * 16 + 12 * layers * d * 90
    assert step_flops(n, layers, d, 8, 64) == 8 * flops_per_token(n, layers, d, 8)


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


def test_chunked_loss_sum_is_the_mean_times_the_valid_count():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=gen)
    weight = torch.randn(50, 16, generator=gen)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[1, 4] = IGNORE_INDEX
    head = lambda h: F.linear(h, weight)  # noqa: E731
    mean = chunked_lm_loss(hidden, head, labels, chunk_tokens=5)
    total = chunked_lm_loss(hidden, head, labels, chunk_tokens=5, reduction="sum")
    assert count_targets(labels) == 15
    assert torch.allclose(total, mean * 15, rtol=1e-5)


def test_document_start_targets_are_ignored():
    ids = torch.tensor([[5, 6, 7, 8, 9, 4]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])  # documents [5 6 7] [8 9] [4]
    labels = next_token_labels(ids, positions)
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert count_targets(labels) == 3  # 6 and 7 from 5, 6; 9 from 8 (never 8 from 7, nor 4 from 9)
    assert next_token_labels(ids, positions, ignore_document_starts=False)[0, 1:].tolist() == [6, 7, 8, 9, 4]


LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def _uneven_micro_batches():
    """Vocabulary 2, logits = hidden states, so each token's cross-entropy is written down by hand:
    logits [ln3, 0] cost ln(4/3) for target 0 and ln 4 for target 1; logits [0, 0] cost ln 2."""
    packed = {  # documents [1 0] [1 1]: targets 0 (from position 0) and 1 (from position 2)
        "ids": torch.tensor([[1, 0, 1, 1]]),
        "positions": torch.tensor([[0, 1, 0, 1]]),
        "hidden": torch.tensor([[[LN3, 0.0], [5.0, -5.0], [0.0, 0.0], [1.0, 2.0]]], requires_grad=True),
    }
    window = {  # one document: targets 1, 1, 0 from positions 0, 1, 2
        "ids": torch.tensor([[0, 1, 1, 0]]),
        "positions": torch.tensor([[0, 1, 2, 3]]),
        "hidden": torch.tensor([[[0.0, LN3], [LN3, 0.0], [0.0, 0.0], [3.0, 3.0]]], requires_grad=True),
    }
    return [packed, window]


@pytest.mark.parametrize(("world", "accumulation"), [(1, 2), (2, 1)])
def test_step_loss_weighs_every_token_equally_over_uneven_micro_batches(world, accumulation):
    """2 + 3 valid targets in two micro-batches (one rank accumulating, or two ranks): the step's loss and
    gradient are those of the mean over all 5 targets, as DeepSpeed combines them (rank average, no
    division by the accumulation steps)."""
    micro = _uneven_micro_batches()
    expected = (math.log(4 / 3) + LN2 + math.log(4 / 3) + LN4 + LN2) / 5  # by hand
    labels = [next_token_labels(m["ids"], m["positions"]) for m in micro]
    total_targets = sum(count_targets(lab) for lab in labels)  # what the all-reduce gives every rank
    assert total_targets == 5
    scale = micro_batch_loss_scale(world, total_targets)
    sums = []
    for m, lab in zip(micro, labels):
        summed = chunked_lm_loss(m["hidden"], lambda h: h, lab, chunk_tokens=2, reduction="sum")
        (summed * scale).backward()  # each rank's backward; DeepSpeed then averages grads over ranks
        sums.append(float(summed.detach()))
    grads = [m["hidden"].grad / world for m in micro]
    assert sum(sums) / total_targets == pytest.approx(expected, abs=1e-6)
    # the per-micro-batch mean of means (the old weighting) is another number
    old = (sums[0] / 2 + sums[1] / 3) / 2
    assert abs(old - expected) > 1e-3
    # gradient of the global token mean, written out as one cross-entropy over the 5 valid targets
    fresh = _uneven_micro_batches()
    logits = torch.cat([fresh[0]["hidden"][0, [0, 2]], fresh[1]["hidden"][0, [0, 1, 2]]])
    F.cross_entropy(logits, torch.tensor([0, 1, 1, 1, 0])).backward()
    for got, ref in zip(grads, fresh):
        assert torch.allclose(got, ref["hidden"].grad, atol=1e-6)
