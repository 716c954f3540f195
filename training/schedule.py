"""Step arithmetic and learning-rate schedule (nanoGPT's get_lr shape): pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(frozen=True)
class StepPlan:
    tokens_per_step: int
    """Tokens per optimizer step across all ranks (the global batch)."""
    grad_accumulation: int
    """Micro-batches per rank per step."""
    steps: int
    """Optimizer steps that fit the token budget (floor)."""
    seq_len: int
    micro_batch: int
    world_size: int

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch * self.grad_accumulation * self.world_size

    def describe(self) -> str:
        """The one line printed at start, e.g. for the paper batch on 8 GPUs at 5B tokens:
        "tokens per step: 2,097,152 (64 sequences of 32,768 = micro-batch 1 x accumulation 8 x 8 ranks);
        steps: 2,384"."""
        return (
            f"tokens per step: {self.tokens_per_step:,} ({self.sequences_per_step} sequences of "
            f"{self.seq_len:,} = micro-batch {self.micro_batch} x accumulation {self.grad_accumulation} x "
            f"{self.world_size} ranks); steps: {self.steps:,}"
        )


def plan_steps(
    budget_tokens: float, global_batch_tokens: int, seq_len: int, micro_batch: int = 1, world_size: int = 1
) -> StepPlan:
    """Gradient accumulation and step count from a token budget and a global batch in tokens.

    The global batch is fixed by the config (the paper: 64 sequences of 32K), whatever the world size:
    accumulation = sequences / (micro_batch x ranks), so 8, 16 or 64 ranks train the same steps. The
    sequences must split evenly over micro-batches on every rank; otherwise the error names the keys.
    """
    if global_batch_tokens % seq_len:
        raise ConfigError(
            f"training.global_batch_tokens={global_batch_tokens:,} is not a multiple of "
            f"training.seq_len={seq_len:,}"
        )
    sequences = global_batch_tokens // seq_len
    per_pass = micro_batch * world_size
    if sequences % per_pass:
        raise ConfigError(
            f"training.global_batch_tokens={global_batch_tokens:,} is {sequences} sequences per step, which "
            f"do not split over training.micro_batch={micro_batch} x {world_size} ranks; run on a number of "
            "ranks that divides sequences / micro_batch, or change training.global_batch_tokens or "
            "training.micro_batch"
        )
    steps = int(budget_tokens // global_batch_tokens)
    if steps < 1:
        raise ConfigError(
            f"training.budget_tokens={budget_tokens:,.0f} is less than one step "
            f"({global_batch_tokens:,} tokens)"
        )
    return StepPlan(
        tokens_per_step=global_batch_tokens,
        grad_accumulation=sequences // per_pass,
        steps=steps,
        seq_len=seq_len,
        micro_batch=micro_batch,
        world_size=world_size,
    )


def cosine_lr(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
