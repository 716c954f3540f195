"""Causal-LM loss without materialising full logits: the LM head and cross-entropy in sequence chunks.

For Llama-3 (128K vocabulary) at 32K tokens the full float32 logits would be 16 GB; here at most one
chunk of logits exists at a time, and each chunk is recomputed in the backward pass (checkpointing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(
    hidden_BTD: torch.Tensor, lm_head_weight: torch.Tensor, labels_BT: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; IGNORE_INDEX labels are skipped.

    Equal to `F.cross_entropy(lm_head(hidden)[:, :-1], labels[:, 1:])` (same value and gradients).
    """
    hidden = hidden_BTD[:, :-1].reshape(-1, hidden_BTD.shape[-1])
    labels = labels_BT[:, 1:].reshape(-1)
    count = (labels != IGNORE_INDEX).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            _chunk_loss_sum, hidden[part], lm_head_weight, labels[part], use_reentrant=False
        )
    return total / count.clamp_min(1)
