"""Causal-LM losses and per-token statistics without materialising full logits: the LM head applied in
sequence chunks.

For Llama-3 (128K vocabulary) at 32K tokens the full float32 logits would be 16 GB; here at most one
chunk of logits (per stream) exists at a time. Two users:
- training (`chunked_lm_loss`): the summed or mean next-token loss, each chunk recomputed in the backward
  pass (checkpointing);
- scoring (`chunked_token_statistics`): per-token statistics of one or more hidden-state streams under
  the same head, no gradients: the cross-entropy of each stream (`token_cross_entropy`) and the KL
  divergence between two streams' next-token distributions (`token_kl`), e.g. long vs short context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


Head = Callable[[torch.Tensor], torch.Tensor]
Statistic = Callable[..., dict[str, torch.Tensor]]
"""statistic(*logits_NV, **aligned_N) -> {name: [N] tensor}: one chunk's per-token values."""


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


def token_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row, in float32 (as `F.cross_entropy(..., reduction="none")`)."""
    return F.cross_entropy(logits_NV.float(), targets_N, reduction="none")


def token_kl(logits_p_NV: torch.Tensor, logits_q_NV: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per row, p = softmax(logits_p), q = softmax(logits_q),
    in float32 over the full vocabulary."""
    log_p = torch.log_softmax(logits_p_NV.float(), dim=-1)
    log_q = torch.log_softmax(logits_q_NV.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@torch.no_grad()
def chunked_token_statistics(
    head: Head,
    hiddens_ND: Sequence[torch.Tensor],
    statistic: Statistic,
    chunk_tokens: int = 1024,
    **aligned_N: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-token statistics of hidden-state streams under one LM head, `chunk_tokens` rows at a time.

    `hiddens_ND` are row-aligned streams (row i of each belongs to the same token, e.g. its hidden state
    with a long and with a short context); `aligned_N` are row-aligned per-token tensors (targets).
    For each chunk of rows, `statistic(head(h_1[chunk]), ..., **{k: v[chunk]})` returns {name: [n]}; the
    chunks' values are concatenated. No gradients (scoring), at most one chunk of logits per stream.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1")
    rows = hiddens_ND[0].shape[0]
    for tensor in (*hiddens_ND, *aligned_N.values()):
        if tensor.shape[0] != rows:
            raise ValueError(f"streams must be row-aligned: {tensor.shape[0]} rows vs {rows}")
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, rows, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        logits = [head(hidden[part]) for hidden in hiddens_ND]
        for name, values in statistic(*logits, **{k: v[part] for k, v in aligned_N.items()}).items():
            parts.setdefault(name, []).append(values)
    return {name: torch.cat(values) for name, values in parts.items()}
