"""What each position is trained to predict, and how a step's loss weighs them.

Labels are the input ids (position t predicts token t + 1). In a packed short sequence the position ids
restart at every document start; the target at such a position (a document's first token, predicted
from the previous document's EOS) is ignored, as ProLong's collator does (`_label[0] = -100` per
document). Long windows have one document, so only position 0, never a target, is affected.

The step's loss is the mean over ALL its valid targets, across micro-batches and ranks: each rank
counts its targets before the step, one all-reduce gives the global count N, and every micro-batch
contributes sum(token losses) * world / N. DeepSpeed averages gradients over the ranks (/ world) and is
told not to divide by the accumulation steps, so the gradient is that of sum(all token losses) / N:
every token weighs the same whatever micro-batch or rank it sits in.
"""

from __future__ import annotations

import torch

from common.chunked_loss import IGNORE_INDEX


def next_token_labels(
    input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor, ignore_document_starts: bool = True
) -> torch.Tensor:
    """Labels for `chunked_lm_loss`: the input ids, with IGNORE_INDEX where a document starts (position
    id 0) when `ignore_document_starts`."""
    labels = input_ids_BT.clone()
    if ignore_document_starts:
        labels[position_ids_BT == 0] = IGNORE_INDEX
    return labels


def count_targets(labels_BT: torch.Tensor) -> int:
    """Valid next-token targets: labels[:, 1:] that are not IGNORE_INDEX (as chunked_lm_loss counts)."""
    return int((labels_BT[:, 1:] != IGNORE_INDEX).sum())


def micro_batch_loss_scale(world_size: int, global_targets: int) -> float:
    """Factor on a micro-batch's summed loss so that DeepSpeed's rank average (and no division by the
    accumulation steps) gives the gradient of the global token mean."""
    if global_targets <= 0:
        raise ValueError("a training step has no valid target token")
    return world_size / global_targets
