"""Which attention kernel trains: chosen once at start, so that packed documents never attend to each other.

Short sources are packed several documents per sequence with position ids restarting at every document
(training/packing.py). Each implementation keeps the documents apart differently (transformers 5):
- `flash_attention_2` (flash-attn installed, CUDA): varlen kernels with boundaries taken from the restarting
  position ids. transformers does that only for micro-batch 1 (`_is_packed_sequence` needs batch size 1);
  at micro-batch > 1 documents would see each other, so that is refused.
- `flex_attention` (PyTorch's FlexAttention, no extra dependency, CUDA): a block mask built from the
  position ids; fully masked blocks (future, other documents) are skipped. It has no attention dropout and
  no backward on CPU (torch 2.13).
- `sdpa` / `eager`: transformers' mask builder detects the restarting position ids and gives a
  block-diagonal causal mask: seq_len^2 booleans per packed sequence (1 GiB at 32K) and no causal
  skipping there; long windows (one document) keep the fast causal path. Older transformers (< 5) had no
  packed-sequence detection, and documents attended to each other silently: refused there.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError

CHOICES = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")
FLASH_PRECISIONS = ("bf16",)
"""`training.precision` values flash-attn can train in (it has no fp32 kernels)."""


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    """The `attn_implementation` handed to transformers."""
    reason: str
    """Why, in one line (logged once at start)."""


def packed_masks_supported() -> bool:
    """transformers builds per-document masks from restarting position ids (masking_utils, transformers 5)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def _sdpa_mask_note(seq_len: int) -> str:
    gib = seq_len * seq_len / 2**30
    return (
        f"transformers' block-diagonal mask from the restarting position ids ({seq_len:,}^2 booleans = "
        f"{gib:.2g} GiB per packed sequence, no causal skipping there)"
    )


def _auto(
    device_type: str, flash_available: bool, dropout: float, micro_batch: int, seq_len: int, precision: str
):
    if device_type != "cuda":
        return AttentionChoice(
            "sdpa",
            f"auto on {device_type}: FlexAttention has no backward on CPU; sdpa with {_sdpa_mask_note(seq_len)}",
        )
    if flash_available and micro_batch == 1 and precision in FLASH_PRECISIONS:
        return AttentionChoice(
            "flash_attention_2",
            "auto: flash-attn is installed; varlen kernels with document boundaries from the position ids",
        )
    if not flash_available:
        why = "flash-attn is not installed"
    elif precision not in FLASH_PRECISIONS:
        why = f"flash-attn has no {precision} kernels (training.precision={precision})"
    else:
        why = "training.micro_batch > 1"
    if dropout == 0:
        return AttentionChoice(
            "flex_attention",
            f"auto: {why}; PyTorch FlexAttention with a per-document block mask (future and other "
            "documents' blocks skipped)",
        )
    return AttentionChoice(
        "sdpa",
        f"auto: {why} and FlexAttention has no attention dropout (training.dropout={dropout}); sdpa with "
        f"{_sdpa_mask_note(seq_len)}. Install flash-attn, or set training.dropout=0 for FlexAttention",
    )


def choose_attention(
    requested: str,
    device_type: str,
    *,
    flash_available: bool,
    dropout: float,
    micro_batch: int,
    seq_len: int,
    packed_masks: bool = True,
    precision: str = "bf16",
) -> AttentionChoice:
    """The implementation for `training.attn_implementation=requested`, or a ConfigError naming the fix
    when it would let packed documents attend to each other or cannot train here. `precision` is
    `training.precision`: flash-attn has fp16/bf16 kernels only, so fp32 training (`training=cpu_demo`,
    `debug=tiny` on a GPU) never gets it."""
    key = f"training.attn_implementation={requested}"
    if requested not in CHOICES:
        raise ConfigError(f"{key}: choose one of {CHOICES} (others are not checked for document masking)")
    if requested == "auto":
        choice = _auto(device_type, flash_available, dropout, micro_batch, seq_len, precision)
    elif requested == "flash_attention_2":
        if device_type != "cuda" or not flash_available:
            raise ConfigError(f"{key} needs CUDA and flash-attn (pip install flash-attn); or use auto")
        if precision not in FLASH_PRECISIONS:
            raise ConfigError(
                f"{key} with training.precision={precision}: flash-attn runs fp16/bf16 only; set "
                "training.precision=bf16, or training.attn_implementation=auto (FlexAttention or sdpa in fp32)"
            )
        if micro_batch > 1:
            raise ConfigError(
                f"{key} with training.micro_batch={micro_batch}: transformers takes document boundaries from "
                "the position ids only at micro-batch 1, so packed documents would attend to each other; set "
                "training.micro_batch=1 (the paper's) or training.attn_implementation=flex_attention"
            )
        choice = AttentionChoice(requested, "requested; varlen kernels, boundaries from the position ids")
    elif requested == "flex_attention":
        if device_type != "cuda":
            raise ConfigError(f"{key}: FlexAttention has no backward on {device_type}; use sdpa or auto")
        if dropout > 0:
            raise ConfigError(
                f"{key}: FlexAttention has no attention dropout, but training.dropout={dropout}; set "
                "training.dropout=0, or use flash_attention_2 / sdpa"
            )
        choice = AttentionChoice(requested, "requested; a per-document block mask from the position ids")
    else:
        choice = AttentionChoice(requested, f"requested; {_sdpa_mask_note(seq_len)}")
    if choice.implementation in ("sdpa", "eager") and not packed_masks:
        raise ConfigError(
            f"{key} resolves to {choice.implementation}, but this transformers builds no per-document mask "
            "from position ids: packed documents would attend to each other. Install transformers >= 5"
        )
    return choice
