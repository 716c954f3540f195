"""The part of a Llama-family model that LongAttn's score depends on: embeddings -> layer-0 input RMSNorm
-> q/k projections -> RoPE (SPEC section 2). No V, no O projection, no MLP, no other layer, no LM head.

Works for any HF model whose layer 0 has `input_layernorm`, `self_attn.{q,k}_proj` (biases allowed, as
Qwen2) and a `<Arch>RotaryEmbedding` in its modeling module, which we instantiate from the model's own
config so every rope scaling type (llama3, yarn, dynamic, ...) is computed by transformers itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import find_prefix, load_config, load_tensors, tensor_locations
from common.model_sources import ModelSourceError


def _rope_functions(config):
    """The architecture's own rotary embedding class and apply function."""
    arch = type(config).__name__.removesuffix("Config")
    module_name = f"transformers.models.{config.model_type}.modeling_{config.model_type}"
    try:
        module = importlib.import_module(module_name)
        return getattr(module, f"{arch}RotaryEmbedding"), module.apply_rotary_pos_emb
    except (ImportError, AttributeError) as exc:
        raise ModelSourceError(
            f"model_type={config.model_type}: no {arch}RotaryEmbedding in {module_name}. LongAttn scoring needs a "
            "Llama-family model with RoPE attention (Llama 2/3, Qwen2, Mistral, SmolLM, ...)."
        ) from exc


@dataclass
class LayerZeroWeights:
    embed: torch.Tensor
    norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None


def load_layer_zero(name_or_path: str, cache_dir: Path | None = None) -> LayerZeroWeights:
    where = tensor_locations(name_or_path, cache_dir)
    prefix = find_prefix(where, "embed_tokens.weight")
    layer = f"{prefix}layers.0."
    names = {
        "embed": f"{prefix}embed_tokens.weight",
        "norm": f"{layer}input_layernorm.weight",
        "q_proj": f"{layer}self_attn.q_proj.weight",
        "k_proj": f"{layer}self_attn.k_proj.weight",
        "q_bias": f"{layer}self_attn.q_proj.bias",
        "k_bias": f"{layer}self_attn.k_proj.bias",
    }
    tensors = load_tensors(
        name_or_path, names.values(), cache_dir, optional=[names["q_bias"], names["k_bias"]]
    )
    return LayerZeroWeights(**{key: tensors.get(name) for key, name in names.items()})


class FirstLayerQK:
    """Post-RoPE queries and keys of layer 0 for one token sequence."""

    def __init__(
        self,
        config,
        weights: LayerZeroWeights,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = getattr(config, "rms_norm_eps", 1e-6)
        self.dtype, self.device = dtype, torch.device(device)

        def put(t):
            return None if t is None else t.to(device=self.device, dtype=dtype)

        self.embed, self.norm = put(weights.embed), put(weights.norm)
        self.q_proj, self.k_proj = put(weights.q_proj), put(weights.k_proj)
        self.q_bias, self.k_bias = put(weights.q_bias), put(weights.k_bias)
        rotary_cls, self.apply_rope = _rope_functions(config)
        self.rotary = rotary_cls(config=config).to(self.device)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        cache_dir: Path | None = None,
        rope_theta: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FirstLayerQK:
        config = load_config(name_or_path, cache_dir, rope_theta)
        return cls(config, load_layer_zero(name_or_path, cache_dir), device, dtype)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [L] -> q [H, L, D], k [K, L, D] (in the model dtype; statistics upcast to float32).

        Computed `chunk` positions at a time into preallocated outputs, so the only full-length tensors
        are q and k themselves (RoPE depends on absolute positions, which each chunk passes on)."""
        ids = input_ids.to(self.device, dtype=torch.long)
        length = ids.shape[0]
        if "dynamic" in str(getattr(self.rotary, "rope_type", "")):
            chunk = length  # dynamic NTK rescales by the longest position seen: project in one piece
        q = torch.empty(self.heads, length, self.head_dim, device=self.device, dtype=self.dtype)
        k = torch.empty(self.kv_heads, length, self.head_dim, device=self.device, dtype=self.dtype)
        for start in range(0, length, chunk):
            q[:, start : start + chunk], k[:, start : start + chunk] = self._project(
                ids[start : start + chunk], start
            )
        return q, k

    def _project(self, ids: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed[ids]
        # LlamaRMSNorm: normalise in float32, cast back, then scale.
        h32 = hidden.float()
        normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.dtype) * self.norm
        q = torch.nn.functional.linear(normed, self.q_proj, self.q_bias)
        k = torch.nn.functional.linear(normed, self.k_proj, self.k_bias)
        length = ids.shape[0]
        q = q.view(1, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(1, length, self.kv_heads, self.head_dim).transpose(1, 2)
        positions = torch.arange(offset, offset + length, device=self.device)[None]
        cos, sin = self.rotary(q, positions)
        q, k = self.apply_rope(q, k, cos, sin)
        return q[0], k[0]
