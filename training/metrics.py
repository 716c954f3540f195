"""One metrics record per log step: loss, lr, grad norm, tokens/s per device, MFU, memory."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_text
from training.flops import PEAK_BF16_FLOPS

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def peak_flops_for(device: torch.device, configured: float | None) -> float | None:
    """Configured peak, else the bf16 datasheet peak of this exact GPU name; None on CPU or for a GPU
    not in the table (MFU omitted, with one warning naming training.peak_flops)."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = PEAK_BF16_FLOPS.get(name)
    if peak is None:
        log.warning(
            "train: no bf16 peak FLOP/s known for GPU %r, so no MFU; set training.peak_flops=<FLOP/s> "
            "(dense bf16, per device) to report it",
            name,
        )
    return peak


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count here (after the model is loaded and the engine built), so the logged
    peak is training's, not a transient of loading or of an earlier stage in the same process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated since `reset_peak_memory`, or the process's peak resident set size on
    CPU (which cannot be reset: it includes loading)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def format_line(record: dict[str, Any], total_steps: int) -> str:
    mfu = record.get("mfu")
    grad = record.get("grad_norm")
    return (
        f"step {record['step']:>6}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
        f"grad norm {'-' if grad is None else f'{grad:.3f}'} | "
        f"{record['tokens_per_s_per_device']:,.0f} tok/s/device | "
        f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'} | mem {record['memory_gib']:.2f} GiB"
    )


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_records(run_dir: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records up to `last_step` (a resumed run re-logs the steps after its checkpoint)."""
    if not (Path(run_dir) / METRICS_FILE).is_file():
        return []
    kept = [r for r in read_records(run_dir) if r["step"] <= last_step]
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
