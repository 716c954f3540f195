"""The attention kernel that trains (packed documents never attend to each other), ABF on a Llama-3.1
RoPE config, and the determinism switch."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import tiny_packed_lm

from common.errors import ConfigError
from training.attention import choose_attention
from training.config import TrainConfig

CUDA = {"device_type": "cuda", "seq_len": 32768}
CPU = {"device_type": "cpu", "seq_len": 32768}


@pytest.mark.parametrize(
    ("setting", "expected", "why"),
    [
        (
            {**CUDA, "flash_available": True, "dropout": 0.1, "micro_batch": 1},
            "flash_attention_2",
            "flash-attn is installed",
        ),
        (
            {**CUDA, "flash_available": False, "dropout": 0.0, "micro_batch": 1},
            "flex_attention",
            "FlexAttention",
        ),
        (
            {**CUDA, "flash_available": True, "dropout": 0.0, "micro_batch": 2},
            "flex_attention",
            "micro_batch > 1",
        ),
        (
            {**CUDA, "flash_available": False, "dropout": 0.1, "micro_batch": 1},
            "sdpa",
            "no attention dropout",
        ),
        ({**CPU, "flash_available": False, "dropout": 0.1, "micro_batch": 1}, "sdpa", "no backward on CPU"),
        # fp32 training (training=cpu_demo, debug=tiny) on a GPU: flash-attn has no fp32 kernels
        (
            {**CUDA, "flash_available": True, "dropout": 0.0, "micro_batch": 1, "precision": "fp32"},
            "flex_attention",
            "flash-attn has no fp32 kernels",
        ),
        (
            {**CUDA, "flash_available": True, "dropout": 0.1, "micro_batch": 1, "precision": "fp32"},
            "sdpa",
            "flash-attn has no fp32 kernels",
        ),
    ],
)
def test_auto_picks_a_document_masking_kernel_and_says_why(setting, expected, why):
    choice = choose_attention("auto", **setting)
    assert choice.implementation == expected and why in choice.reason


def test_the_sdpa_fallback_states_its_mask_cost():
    choice = choose_attention(
        "auto", "cuda", flash_available=False, dropout=0.1, micro_batch=1, seq_len=32768
    )
    assert "32,768^2 booleans = 1 GiB per packed sequence" in choice.reason
    assert "Install flash-attn, or set training.dropout=0" in choice.reason


@pytest.mark.parametrize(
    ("requested", "setting", "message"),
    [
        (
            "flash_attention_2",
            {**CUDA, "flash_available": True, "dropout": 0, "micro_batch": 2},
            "micro_batch=2",
        ),
        (
            "flash_attention_2",
            {**CUDA, "flash_available": False, "dropout": 0, "micro_batch": 1},
            "pip install",
        ),
        (
            "flash_attention_2",
            {**CUDA, "flash_available": True, "dropout": 0, "micro_batch": 1, "precision": "fp32"},
            "precision=fp32: flash-attn runs fp16/bf16 only",
        ),
        (
            "flex_attention",
            {**CPU, "flash_available": False, "dropout": 0, "micro_batch": 1},
            "no backward on cpu",
        ),
        (
            "flex_attention",
            {**CUDA, "flash_available": False, "dropout": 0.1, "micro_batch": 1},
            "no attention dropout",
        ),
        (
            "paged_attention",
            {**CUDA, "flash_available": True, "dropout": 0, "micro_batch": 1},
            "choose one of",
        ),
    ],
)
def test_settings_that_cannot_keep_documents_apart_are_refused(requested, setting, message):
    with pytest.raises(ConfigError, match=f"training.attn_implementation={requested}.*{message}"):
        choose_attention(requested, **setting)


def test_sdpa_is_refused_where_transformers_builds_no_per_document_mask():
    with pytest.raises(ConfigError, match="packed documents would attend to each other"):
        choose_attention(
            "auto", "cpu", flash_available=False, dropout=0, micro_batch=1, seq_len=64, packed_masks=False
        )
    from training.attention import packed_masks_supported

    assert packed_masks_supported()  # transformers 5 here


def test_the_model_loader_logs_the_choice_once(caplog):
    from common.model_sources import resolve_model_path
    from training.model import load_causal_lm

    conf = TrainConfig(seq_len=64, budget_tokens=64, global_batch_tokens=64, gradient_checkpointing=False)
    with caplog.at_level(logging.INFO, logger="training.model"):
        lm = load_causal_lm(resolve_model_path("tiny_llama", None), None, conf, torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records if "attention" in r.getMessage()]
    assert lines == [
        "train: attention sdpa (auto on cpu: FlexAttention has no backward on CPU; sdpa with transformers' "
        "block-diagonal mask from the restarting position ids (64^2 booleans = 3.8e-06 GiB per packed "
        "sequence, no causal skipping there))"
    ]
    assert lm.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_flex_document_mask_gives_the_loss_of_the_documents_alone():
    """FlexAttention's block mask from packed position ids (forward on CPU: its backward needs CUDA;
    ~30 s of compilation) equals the block-diagonal reference: each document run alone."""
    from training.model import ChunkedLossLM
    from training.targets import next_token_labels

    docs = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 7, 4)]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    flex = ChunkedLossLM(tiny_packed_lm("flex_attention"), chunk_tokens=6)
    reference = ChunkedLossLM(tiny_packed_lm("eager"), chunk_tokens=6)
    with torch.no_grad():
        ours = flex(packed, positions, next_token_labels(packed, positions))
        alone = sum(reference(d, torch.arange(d.shape[1])[None], d.clone()) for d in docs)
        unmasked = reference(
            packed, torch.arange(packed.shape[1])[None], next_token_labels(packed, positions)
        )
    assert torch.allclose(ours, alone, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # the reference does depend on the mask


def _llama31_config(tmp_path, rope_type: str = "llama3"):
    from transformers import LlamaConfig

    params = {"rope_type": rope_type, "rope_theta": 500000.0, "factor": 8.0}
    if rope_type == "llama3":
        params |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters=params,
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def test_abf_on_a_llama31_config_switches_to_plain_rope(tmp_path):
    """Llama-3.1's llama3 scaling (factor 8) is dropped, not combined with the new base."""
    from transformers import LlamaForCausalLM

    from training.model import rope_theta_of, training_config

    conf = TrainConfig(seq_len=128, budget_tokens=1, global_batch_tokens=128, rope_theta=8e6)
    config = training_config(_llama31_config(tmp_path), None, conf)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 8e6}
    assert rope_theta_of(config) == 8e6
    rotary = LlamaForCausalLM(config).model.rotary_emb
    head_dim = 32 // 4
    plain = 1.0 / 8e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert rotary.rope_type == "default" and torch.allclose(rotary.inv_freq, plain)
    # without ABF the model keeps its own llama3 scaling
    kept = training_config(
        _llama31_config(tmp_path), None, TrainConfig(seq_len=128, budget_tokens=1, global_batch_tokens=128)
    )
    assert kept.rope_parameters["rope_type"] == "llama3" and kept.rope_parameters["factor"] == 8.0


def test_abf_refuses_rope_types_it_cannot_reset(tmp_path):
    from training.model import training_config

    conf = TrainConfig(seq_len=128, budget_tokens=1, global_batch_tokens=128, rope_theta=8e6)
    with pytest.raises(ConfigError, match="RoPE is of type 'linear'.*training.rope_theta=null"):
        training_config(_llama31_config(tmp_path, "linear"), None, conf)


def test_deterministic_switch_sets_the_kernels_an_exact_cuda_resume_needs(monkeypatch):
    from training.engine import apply_determinism

    for name in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.setenv(name, "")  # recorded, so teardown restores the caller's environment
        monkeypatch.delenv(name)
    apply_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        apply_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"  # read by transformers' flash-attn path
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
