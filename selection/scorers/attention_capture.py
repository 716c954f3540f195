"""See every layer's post-RoPE queries and keys during a normal forward pass, without attention maps.

Registers an attention implementation with transformers' `AttentionInterface` that hands (layer index,
query, key) to the active sink and then runs SDPA as usual. Models loaded with
`attn_implementation=CAPTURE` work unchanged; nothing is monkeypatched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAPTURE = "longattn_capture"
Sink = Callable[[int, torch.Tensor, torch.Tensor], None]
_sinks: list[Sink] = []


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    if _sinks:
        _sinks[-1](module.layer_idx, query, key)  # query [B, H, L, D], key [B, K, L, D] (GQA not repeated)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE, _capturing_attention)


@contextlib.contextmanager
def capture(sink: Sink) -> Iterator[None]:
    _sinks.append(sink)
    try:
        yield
    finally:
        _sinks.pop()
