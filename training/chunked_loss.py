"""Causal-LM loss without materialising full logits: the LM head and cross-entropy in sequence chunks.

For Llama-3 (128K vocabulary) at 32K tokens the full float32 logits would be 16 GB; here at most one
chunk of logits exists at a time, and each chunk is recomputed in the backward pass (checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


Head = Callable[[torch.Tensor], torch.Tensor]


def _chunk_loss_sum(head: Head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(
    hidden_BTD: torch.Tensor,
    head: Head,
    labels_BT: torch.Tensor,
    chunk_tokens: int = 4096,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; IGNORE_INDEX labels are skipped.

    `reduction="mean"` equals `F.cross_entropy(head(hidden)[:, :-1], labels[:, 1:])` (same value and
    gradients); "sum" is the sum over the valid targets (training weighs it by the step's global count,
    see training/targets.py). `head` is the model's output-embedding module, called per chunk (and again in
    the backward recompute), so under ZeRO-3 its partitioned weight is gathered by DeepSpeed's module
    hooks as for any layer.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: choose mean or sum")
    hidden = hidden_BTD[:, :-1].reshape(-1, hidden_BTD.shape[-1])
    labels = labels_BT[:, 1:].reshape(-1)
    count = (labels != IGNORE_INDEX).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss_sum, head, hidden[part], labels[part], use_reentrant=False)
    return total if reduction == "sum" else total / count.clamp_min(1)
