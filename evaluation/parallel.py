"""Evaluation on every rank of the job, with lm-eval's own data parallelism.

lm-eval shards and gathers through its LM object: `evaluator.evaluate` builds each task's requests for
`lm.rank` of `lm.world_size` (documents rank, rank + world_size, ...), pads the shorter ranks through
`lm.all_gather`, and gathers every rank's per-sample metrics and logged samples on rank 0 with
`lm.gather_object`, where the metrics are computed; `simple_evaluate` returns results on rank 0 only, and
its `CachingLM` keeps one request cache per rank (`<use_cache>_rank<r>.db`). HFLM sets rank, world size
and its accelerator only when it loads a model by name on several GPUs under `accelerate launch`
(`models/huggingface.py`); given a model object, as here, it assumes one process. `make_data_parallel`
gives the in-memory HFLM what that path sets (an `accelerate.Accelerator`, the rank and the world size),
so lm-eval's own sharding, padding and gathering run unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from common.distributed import rank_info
from common.errors import ConfigError


def accelerator(device: str) -> Any:
    """The process group and this rank's device, as HFLM's accelerate path builds them (a year-long
    timeout: ranks wait for each other at every gather, and a long suite keeps one waiting). An existing
    process group (the train stage's) is reused."""
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"evaluation.device={device} with {rank_info().world_size} ranks: each rank takes its own device "
            "(cuda:<local rank>); set evaluation.device to auto, cuda or cpu"
        )
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])


def make_data_parallel(lm: Any, acc: Any) -> None:
    """What HFLM's `__init__` sets for an `accelerate launch` run. The rank is the global process index
    (HFLM takes the local one, which is the same on one node and would repeat shards across nodes)."""
    ranks = rank_info()
    if (acc.process_index, acc.num_processes) != (ranks.rank, ranks.world_size):
        raise RuntimeError(
            f"accelerate sees rank {acc.process_index} of {acc.num_processes}, the launcher "
            f"RANK={ranks.rank} WORLD_SIZE={ranks.world_size}"
        )
    lm.accelerator = acc
    lm._rank = acc.process_index
    lm._world_size = acc.num_processes


def counters(lm: Any) -> dict[str, int]:
    """What this rank's model has generated and truncated so far (evaluation.backend.CountsTruncation)."""
    return {k: int(getattr(lm, k, 0)) for k in ("generated_prompts", "truncated_prompts")}


def gather_counts(lm: Any, before: Mapping[str, int]) -> dict[str, Any] | None:
    """Per rank, the prompts generated and truncated since `before`, gathered on rank 0 through the LM's
    `gather_object` (as lm-eval gathers samples); None on the other ranks. Every rank must call it."""
    now = counters(lm)
    mine = {k: now[k] - before.get(k, 0) for k in now}
    per_rank = lm.gather_object(mine, dst=0)
    if per_rank is None:
        return None
    return {"world_size": len(per_rank), **{k: [r[k] for r in per_rank] for k in mine}}


def close_request_cache(lm: Any) -> None:
    """Commit and close the suite's request cache (lm-eval's CachingLM leaves it open), before rank 0
    may delete the cache directory."""
    db = getattr(getattr(lm, "cache_hook", None), "dbdict", None)
    if db is not None:
        db.close()


def drop_padding_copies(samples: Mapping[str, list], configs: Mapping[str, Any]) -> dict[str, list]:
    """lm-eval appends the answers to its padding copies (see backend.first_copies) to the padded
    Instance's `resps`; each request keeps its task's `repeats` answers, as a one-process run logs them.
    The copies are the same greedy answer, so no metric changes: most read the first, HumanEval's pass@1
    the share of passing answers."""
    out = {}
    for task, rows in samples.items():
        repeats = int((configs.get(task) or {}).get("repeats") or 1)
        out[task] = [{**row, "resps": [r[:repeats] for r in row["resps"]]} for row in rows]
    return out
