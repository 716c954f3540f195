"""DeepSpeed set-up: process group, the resolved DeepSpeed config, optimizer and LR schedule.

CPU notes (measured with DeepSpeed 0.19.8): the first process group compiles DeepSpeed's shared-memory
all-reduce op (about 30-90 s, cached in TORCH_EXTENSIONS_DIR); the optimizer is a client torch AdamW so
FusedAdam is never compiled; ZeRO-Offload needs DeepSpeedCPUAdam (compiled on first use, minutes).
"""

from __future__ import annotations

import copy
import json
import os
import socket
from typing import Any

import torch

from common.distributed import RankInfo
from training.config import TrainConfig
from training.schedule import StepPlan, cosine_lr


def ensure_process_env(ranks: RankInfo) -> None:
    """A launcher sets these; a plain `python run.py` gets a one-process group on a free local port."""
    os.environ.setdefault("RANK", str(ranks.rank))
    os.environ.setdefault("WORLD_SIZE", str(ranks.world_size))
    os.environ.setdefault("LOCAL_RANK", str(ranks.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def init_distributed(device: torch.device, ranks: RankInfo) -> None:
    import deepspeed

    ensure_process_env(ranks)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def apply_determinism(enabled: bool) -> None:
    """`training.deterministic=true`: the settings an exact resume on CUDA needs (set before CUDA work).

    Attention backward is the usual culprit: flash-attn's is non-deterministic unless
    FLASH_ATTENTION_DETERMINISTIC=1 (read by transformers), sdpa's memory-efficient kernel likewise; with
    deterministic algorithms on, PyTorch picks deterministic kernels or raises naming the op.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # run.py sets it at process start already
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def training_device(requested: str, ranks: RankInfo) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


def _fill_auto(node: Any, values: dict[str, Any], path: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _fill_auto(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node == "auto":
        if path not in values:
            raise ValueError(f"DeepSpeed config: no value for '{path}: auto'")
        return values[path]
    return node


def deepspeed_config(conf: TrainConfig, plan: StepPlan) -> dict[str, Any]:
    """The JSON template with its "auto" entries filled from the training config (as HF Trainer does)."""
    template = json.loads(conf.deepspeed_path().read_text())
    values = {
        "train_micro_batch_size_per_gpu": conf.micro_batch,
        "gradient_accumulation_steps": plan.grad_accumulation,
        "gradient_clipping": conf.grad_clip,
        "bf16.enabled": conf.precision == "bf16",
        "data_types.grad_accum_dtype": conf.grad_accum_dtype,
        "communication_data_type": conf.grad_reduce_dtype,
    }
    config = _fill_auto(copy.deepcopy(template), values)
    config.pop("train_batch_size", None)  # DeepSpeed derives it from micro x accumulation x world
    return config


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def build_optimizer(
    model: torch.nn.Module, conf: TrainConfig, ds_config: dict[str, Any], device: torch.device
):
    """AdamW with weight decay on matrices only (not norms or biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": conf.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=conf.lr, betas=conf.adam_betas)
    return torch.optim.AdamW(groups, lr=conf.lr, betas=conf.adam_betas, fused=device.type == "cuda")


def build_scheduler(optimizer, conf: TrainConfig, total_steps: int):
    """Linear warmup then cosine to lr * min_lr_ratio, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: cosine_lr(step, 1.0, conf.warmup_steps, total_steps, min_lr=conf.min_lr_ratio),
    )
