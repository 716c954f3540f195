"""The model to train: any HF causal LM, with ABF (RoPE base), dropout and a chunked-loss forward."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import load_config
from common.model_sources import resolve_model_path
from training.chunked_loss import chunked_lm_loss
from training.config import TrainConfig

log = logging.getLogger(__name__)

# Config attributes that hold a dropout probability, across architectures (Llama has attention_dropout).
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")


def attention_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"


def rope_theta_of(config) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def training_config(name_or_path: str, cache_dir: Path, conf: TrainConfig):
    """The model config for training: ABF theta, dropout, and room for seq_len positions."""
    config = load_config(name_or_path, cache_dir, conf.rope_theta)
    for key in DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, float(conf.dropout))
    if getattr(config, "max_position_embeddings", conf.seq_len) < conf.seq_len:
        config.max_position_embeddings = conf.seq_len
    config.use_cache = False
    return config


def load_causal_lm(name_or_path: str, cache_dir: Path, conf: TrainConfig, device: torch.device):
    """Weights in the training precision. Under ZeRO-3 the caller has registered the DeepSpeed config
    (HfDeepSpeedConfig), so `from_pretrained` loads straight into partitioned parameters."""
    from transformers import AutoModelForCausalLM

    config = training_config(name_or_path, cache_dir, conf)
    impl = attention_implementation(conf.attn_implementation, device)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path, cache_dir),
        config=config,
        dtype=torch.bfloat16 if conf.precision == "bf16" else torch.float32,
        attn_implementation=impl,
    )
    if conf.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("train: model %s, attention %s, rope theta %s", name_or_path, impl, rope_theta_of(config))
    return model


class ChunkedLossLM(nn.Module):
    """Wraps a causal LM so forward returns the next-token loss computed in sequence chunks.

    The backbone gives hidden states; the output embedding is applied chunk by chunk, so the
    [T, vocab] logits never exist at once (Llama-3: 128K x 32K fp32 would be 16 GB).
    Position ids that restart mark packed documents: transformers' mask builder turns them into a
    block-diagonal causal mask (sdpa, eager) or varlen boundaries (flash-attention 2).
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return chunked_lm_loss(hidden, self.lm.get_output_embeddings(), input_ids, self.chunk_tokens)
