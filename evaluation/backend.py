"""The model behind lm-eval: HF (default, CPU or GPU; prompts truncated in the middle) or vLLM."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.errors import ConfigError, UserError
from common.model_sources import resolve_model_path
from evaluation.truncation import truncate_middle

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")


def middle_truncating_hflm():
    """HFLM whose over-long prompts lose their middle, not their start (LongBench's rule)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class MiddleTruncatingHFLM(HFLM):
        truncated_prompts = 0

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            ids, mask = super().tok_batch_encode(strings, padding_side, None, truncation)
            if not left_truncate_len or ids.size(1) <= left_truncate_len:
                return ids, mask
            rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
            self.truncated_prompts += sum(len(r) > left_truncate_len for r in rows)
            rows = [truncate_middle(r, left_truncate_len) for r in rows]
            width = max(map(len, rows))
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            out_ids = torch.full((len(rows), width), pad, dtype=ids.dtype)
            out_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
            for i, row in enumerate(rows):
                span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
                out_ids[i, span] = torch.tensor(row, dtype=ids.dtype)
                out_mask[i, span] = 1
            return out_ids, out_mask

    return MiddleTruncatingHFLM


def load_lm(
    model: str,
    cache_dir: Path,
    backend: str,
    max_length: int,
    batch_size: int,
    device: str,
    dtype: str,
    tensor_parallel_size: int = 1,
) -> Any:
    path = resolve_model_path(model, cache_dir)
    if backend == "hf":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        lm.config.use_cache = True  # a checkpoint saved mid-training may have it off
        tokenizer = AutoTokenizer.from_pretrained(path)
        return middle_truncating_hflm()(
            pretrained=lm, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, device=device
        )
    if backend == "vllm":
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as exc:
            raise UserError(
                "evaluation.backend=vllm needs vllm installed (pip install vllm); or use evaluation.backend=hf"
            ) from exc
        return VLLM(
            pretrained=path,
            max_length=max_length,
            tensor_parallel_size=tensor_parallel_size,
            truncation_side="middle",
            dtype=dtype,
        )
    raise ConfigError(f"evaluation.backend={backend}: choose one of {BACKENDS}")
