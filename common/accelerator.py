"""CUDA housekeeping between the stages of one process (score, then train, then evaluate).

Each stage loads its own model; when it returns, its tensors are garbage, but PyTorch's caching allocator
keeps their blocks reserved for this process. The next stage's own allocations reuse them, yet a library
that asks the driver how much is free before it starts (vLLM's `gpu_memory_utilization` check, NCCL
buffers) sees the previous stage's reservation and fails. So the pipeline collects and empties the cache
after every stage.
"""

from __future__ import annotations

import gc
import sys


def release_accelerator_memory() -> dict[str, float] | None:
    """Collect garbage (reference cycles hold models: modules, hooks, closures) and return the cached
    CUDA blocks to the driver. Returns {reserved_gib_before, reserved_gib_after} on CUDA, else None.
    Touches CUDA only if this process already initialised it (never imports torch itself)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    before = torch.cuda.memory_reserved() / 2**30
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.ipc_collect()
    return {"reserved_gib_before": before, "reserved_gib_after": torch.cuda.memory_reserved() / 2**30}
