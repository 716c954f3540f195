"""The `training` config group, typed and checked once at the stage boundary."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError

DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "conf" / "training" / "deepspeed"
PRECISIONS = ("bf16", "fp32")
GRAD_DTYPES = ("fp32", "bf16")
RESUME_MODES = ("auto", "never")
LAUNCHERS = ("torchrun", "deepspeed")


@dataclass
class TrainConfig:
    seq_len: int
    budget_tokens: float
    """Tokens trained on; steps = budget // global_batch_tokens (printed once at start)."""
    global_batch_tokens: int
    """Tokens per optimizer step over all ranks; gradient accumulation is derived from it."""
    micro_batch: int = 1
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio (the paper does not state its floor)."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    rope_theta: float | None = None
    """ABF: the RoPE base for the extended context; null keeps the model's (recorded in the saved config)."""
    dropout: float = 0.0
    """Attention dropout of the model config (the paper's Megatron runs used 0.1)."""
    attn_implementation: str = "auto"
    """auto | flash_attention_2 | flex_attention | sdpa | eager; auto = flash-attn varlen when installed on
    CUDA, else FlexAttention (sdpa when attention dropout is on), sdpa on CPU. Settings that would let
    packed documents attend to each other are refused (training/attention.py)."""
    ignore_boundary_targets: bool = True
    """In packed short sequences, do not train a document's first token from the previous document's EOS
    (ProLong's collator does the same); the loss is the mean over the step's valid targets."""
    gradient_checkpointing: bool = True
    loss_chunk_tokens: int = 4096
    """LM head + cross-entropy in chunks of this many tokens (never the full T x vocab logits)."""
    precision: str = "bf16"
    grad_accum_dtype: str = "fp32"
    """Gradient accumulation over micro-batches (DeepSpeed `data_types.grad_accum_dtype`). fp32 as
    Megatron (the paper's framework) does for bf16 runs; bf16 is DeepSpeed's default for bf16 models."""
    grad_reduce_dtype: str = "fp32"
    """Data-parallel gradient reduction (DeepSpeed `communication_data_type`): fp32 as Megatron; bf16 halves
    the traffic and rounds every partial sum."""
    deepspeed: str = "zero2"
    """A name in conf/training/deepspeed/ (zero2, zero3, zero3_offload) or a path to a DeepSpeed JSON."""
    save_every: int = 500
    checkpoint_at_end: bool = True
    """Also checkpoint after the last step (what a later run with more steps, or a crash in the model
    save, resumes from). false skips it (benchmarks, throw-away runs: at 8B, by arithmetic, ~90 GB of optimizer
    state); the final model/ is written either way."""
    keep_checkpoints: int = 2
    resume: str = "auto"
    """auto: continue from the latest complete step-N/ checkpoint of this artifact; never: start over."""
    log_every: int = 1
    num_gpus: int = 1
    """Processes per node; > 1 relaunches run.py under `launcher` (see experiments/launch.py)."""
    num_nodes: int = 1
    launcher: str = "torchrun"
    short_sources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Short-context sources named as in selection.mixture.short, each a list of data.sources-like entries."""
    on_bad_record: str = "error"
    max_steps: int | None = None
    """Stop after this many steps (the schedule still spans the whole budget); null = all."""
    peak_flops: float | None = None
    """Per-device peak for MFU; null = looked up from the GPU name (none on CPU)."""
    device: str = "auto"
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace, flash-attn's
    deterministic backward): needed for a bitwise-exact resume on CUDA; slower, and an op without a
    deterministic kernel then raises. CPU runs are deterministic already."""
    hostfile: str | None = None
    """launcher=deepspeed with num_nodes > 1: the DeepSpeed hostfile (`host slots=8` lines); the command
    then runs once, on the first host, and the runner starts every node."""

    def __post_init__(self) -> None:
        checks = {
            "seq_len": self.seq_len > 0,
            "global_batch_tokens": self.global_batch_tokens > 0,
            "micro_batch": self.micro_batch > 0,
            "save_every": self.save_every > 0,
            "keep_checkpoints": self.keep_checkpoints > 0,
            "log_every": self.log_every > 0,
            "loss_chunk_tokens": self.loss_chunk_tokens > 0,
            "num_gpus": self.num_gpus > 0,
            "num_nodes": self.num_nodes > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"training.{key}={getattr(self, key)}: must be positive")
        for key, allowed in (
            ("precision", PRECISIONS),
            ("resume", RESUME_MODES),
            ("launcher", LAUNCHERS),
            ("grad_accum_dtype", GRAD_DTYPES),
            ("grad_reduce_dtype", GRAD_DTYPES),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"training.{key}={getattr(self, key)}: choose one of {allowed}")
        self.adam_betas = tuple(self.adam_betas)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> TrainConfig:
        values = OmegaConf.to_container(cfg.training, resolve=True)
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ConfigError(f"training: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def deepspeed_path(self) -> Path:
        named = DEEPSPEED_DIR / f"{self.deepspeed}.json"
        if named.is_file():
            return named
        path = Path(self.deepspeed).expanduser()
        if path.is_file():
            return path
        names = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))
        raise ConfigError(f"training.deepspeed={self.deepspeed}: not one of {names} nor a JSON file")
