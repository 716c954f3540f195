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

    def describe(self) -> str:
        return f"tokens per step: {self.tokens_per_step:,}; steps: {self.steps:,}"


def plan_steps(
    budget_tokens: float, global_batch_tokens: int, seq_len: int, micro_batch: int = 1, world_size: int = 1
) -> StepPlan:
    """Gradient accumulation and step count from a token budget and a global batch in tokens.

    The global batch must be a whole number of sequences, and those must split evenly over
    micro-batches on every rank; otherwise the error names the keys to change.
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
            f"{sequences} sequences per step do not split over micro_batch={micro_batch} x "
            f"{world_size} ranks; change training.global_batch_tokens or training.micro_batch"
        )
    steps = int(budget_tokens // global_batch_tokens)
    if steps < 1:
        raise ConfigError(
            f"training.budget_tokens={budget_tokens:,.0f} is less than one step "
            f"({global_batch_tokens:,} tokens)"
        )
    return StepPlan(tokens_per_step=global_batch_tokens, grad_accumulation=sequences // per_pass, steps=steps)


def cosine_lr(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
