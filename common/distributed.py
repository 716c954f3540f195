"""Rank and world size from the launcher's environment (torchrun, accelerate, deepspeed, SLURM via them).

Stages that shard work across ranks synchronise through files in the artifact directory, so multi-node
runs need `paths.artifacts_dir` on a shared filesystem, and no process group is required for scoring.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    return RankInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def launch_id(env: Mapping[str, str] = os.environ) -> str:
    """Identifies one launch of all ranks: the same on each of its ranks, different for a later launch (so a
    later launch ignores an earlier one's markers, and other runs never share its claims). A SLURM requeue
    keeps the job id (and a rendezvous id derived from it): its restart count tells the launches apart."""
    base = env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID") or env.get("MASTER_PORT", "local")
    restart = env.get("SLURM_RESTART_COUNT", "0")
    return base if restart in ("", "0") else f"{base}-restart{restart}"


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float | None = None, poll_s: float = 2.0
) -> None:
    """Poll until `condition()`; fail naming `what` after `timeout_s` (None waits forever)."""
    start = time.monotonic()
    while not condition():
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(poll_s)
