"""The model to train: any HF causal LM, with ABF (RoPE base), dropout and a chunked-loss forward."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import load_config
from common.chunked_loss import chunked_lm_loss
from common.distributed import rank_info
from common.errors import ConfigError
from common.model_sources import resolve_model_path
from training.attention import AttentionChoice, choose_attention, packed_masks_supported
from training.config import TrainConfig

log = logging.getLogger(__name__)

# Config attributes that hold a dropout probability, across architectures (Llama has attention_dropout).
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")
# RoPE types ABF may reset to plain RoPE: llama3 (Llama-3.1's frequency rescaling, factor 8) is a
# context-extension recipe of its own; ABF replaces it with a larger base, as for Llama-3.
RESETTABLE_ROPE_TYPES = ("default", "llama3")


def attention_for(conf: TrainConfig, device: torch.device) -> AttentionChoice:
    from transformers.utils import is_flash_attn_2_available

    return choose_attention(
        conf.attn_implementation,
        device.type,
        flash_available=is_flash_attn_2_available(),
        dropout=conf.dropout,
        micro_batch=conf.micro_batch,
        seq_len=conf.seq_len,
        packed_masks=packed_masks_supported(),
        precision=conf.precision,
    )


def rope_theta_of(config) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def apply_abf(config, theta: float) -> str | None:
    """ABF: plain RoPE with base `theta`. A Llama-3.1 config's `llama3` scaling (factor 8 over an 8K
    original context) is dropped, not combined with the new base; other scaling types (linear, yarn,
    dynamic, longrope) are refused. Returns the replaced rope type when it was not plain RoPE."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):  # no rope_parameters (transformers < 5 or a non-RoPE model)
        config.rope_theta = float(theta)
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type not in RESETTABLE_ROPE_TYPES:
        raise ConfigError(
            f"training.rope_theta={theta:g}: the model's RoPE is of type '{rope_type}', which ABF does not "
            f"reset (it resets {RESETTABLE_ROPE_TYPES} to plain RoPE); set training.rope_theta=null to keep "
            "the model's own scaling"
        )
    config.rope_parameters = {"rope_type": "default", "rope_theta": float(theta)}
    return rope_type if rope_type != "default" else None


def with_legacy_rope_fields(config_json: dict) -> dict:
    """config.json with transformers-4 RoPE fields beside transformers 5's `rope_parameters`.

    transformers 5 saves the RoPE base only inside `rope_parameters`. A reader on transformers 4 (vLLM
    pinned to a 4.x transformers) builds LlamaConfig with its default `rope_theta` (10000) and, in vLLM's
    `patch_rope_parameters` (vllm/transformers_utils/config.py, transformers < 5 branch), copies that
    default INTO `rope_parameters`: a model trained with ABF (8e6) would be evaluated with base 1e4. So
    the saved config also carries `rope_theta` (and `rope_scaling` for a scaled RoPE type), which
    transformers 5 ignores when `rope_parameters` is present (tested)."""
    params = config_json.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return config_json
    out = dict(config_json, rope_theta=params["rope_theta"])
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    out["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    return out


def training_config(name_or_path: str, cache_dir: Path, conf: TrainConfig):
    """The model config for training: ABF theta (plain RoPE), dropout, and room for seq_len positions."""
    config = load_config(name_or_path, cache_dir)
    if conf.rope_theta is not None:
        replaced = apply_abf(config, conf.rope_theta)
        if replaced and rank_info().is_main:
            log.info("train: ABF replaces rope_type %s by plain RoPE, theta %g", replaced, conf.rope_theta)
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
    attention = attention_for(conf, device)
    if rank_info().is_main:
        log.info("train: attention %s (%s)", attention.implementation, attention.reason)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path, cache_dir),
        config=config,
        dtype=torch.bfloat16 if conf.precision == "bf16" else torch.float32,
        attn_implementation=attention.implementation,
    )
    if conf.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if rank_info().is_main:
        log.info("train: model %s, rope theta %s", name_or_path, rope_theta_of(config))
    return model


class ChunkedLossLM(nn.Module):
    """Wraps a causal LM so forward returns the SUMMED next-token loss over the valid targets of `labels`,
    computed in sequence chunks (the caller weighs it by the step's global target count).

    The backbone gives hidden states; the output embedding is applied chunk by chunk, so the
    [T, vocab] logits never exist at once (Llama-3: 128K x 32K fp32 would be 16 GB).
    Position ids that restart mark packed documents: the attention implementation keeps them apart
    (training/attention.py).
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        head = self.lm.get_output_embeddings()
        return chunked_lm_loss(hidden, head, labels, self.chunk_tokens, reduction="sum")
