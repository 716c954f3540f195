"""Queries and keys of any decoder layers, for LongAttn beyond the paper's first layer.

A truncated copy of the model, layers 0..max(layers) only, is built from just those layers' tensors
(embeddings plus `layers.0..i`, read shard-selectively like the first-layer loader), run with SDPA
through the capture attention (`attention_capture.py`), and each requested layer's post-RoPE q/k is
handed to a callback during the forward pass, so no attention map and no later layer ever exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from common.checkpoint import find_prefix, load_config, load_tensors, tensor_locations
from common.errors import ConfigError
from common.model_sources import ModelSourceError
from selection.scorers.attention_capture import CAPTURE, capture

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def layer_tensor_names(where: dict[str, str], top: int) -> tuple[str, list[str]]:
    """(prefix, names) of the embeddings and every tensor of layers 0..top."""
    prefix = find_prefix(where, "embed_tokens.weight")
    wanted = tuple(f"{prefix}layers.{j}." for j in range(top + 1))
    return prefix, [n for n in where if n == f"{prefix}embed_tokens.weight" or n.startswith(wanted)]


class LayerStackQK:
    def __init__(
        self,
        name_or_path: str,
        layers: Sequence[int],
        cache_dir: Path | None = None,
        rope_theta: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoModel
        from transformers.initialization import no_init_weights

        self.layers = sorted(set(int(i) for i in layers))
        config = load_config(name_or_path, cache_dir, rope_theta)
        total = config.num_hidden_layers
        if not self.layers or self.layers[0] < 0 or self.layers[-1] >= total:
            raise ConfigError(f"selection.scoring.layers={list(layers)}: the model has layers 0..{total - 1}")
        top = self.layers[-1]
        config.num_hidden_layers = top + 1
        where = tensor_locations(name_or_path, cache_dir)
        prefix, names = layer_tensor_names(where, top)
        state = {n[len(prefix) :]: t for n, t in load_tensors(name_or_path, names, cache_dir).items()}
        with no_init_weights():
            model = AutoModel.from_config(config, attn_implementation=CAPTURE, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # The final norm lives after the last layer (often in the last shard): unused here, so not loaded.
        missing = [m for m in missing if m != "norm.weight"]
        if missing or unexpected:
            raise ModelSourceError(
                f"model {name_or_path}: layers 0..{top} did not load (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        with torch.no_grad():
            model.norm.weight.fill_(1.0)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.config = config
        self.heads = config.num_attention_heads

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, callback: LayerCallback) -> None:
        """Forward `input_ids` [L] once; call `callback(layer, q [H, L, D], k [K, L, D])` per requested layer."""
        wanted = set(self.layers)

        def sink(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
            if layer in wanted:
                callback(layer, query[0], key[0])

        ids = input_ids.to(self.device, dtype=torch.long)[None]
        with capture(sink):
            self.model(input_ids=ids, use_cache=False)
