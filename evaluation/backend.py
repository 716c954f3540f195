"""The model behind lm-eval: HF (default, CPU or GPU; prompts truncated in the middle) or vLLM.

Both count the prompts they must cut to fit (prompt + generation budget over `evaluation.max_length`),
with one rule shared by both (`CountsTruncation`), so `truncated_prompts` in results.json means the same
under either backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from common.errors import ConfigError, UserError
from common.model_sources import resolve_model_path
from evaluation.truncation import truncate_middle

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")


def prompts_over_budget(prompt_lengths: Iterable[int], max_gen_toks: Iterable[int], max_length: int) -> int:
    """How many prompts a backend must cut: prompt tokens + generation budget > the model's window."""
    return sum(n + g > max_length for n, g in zip(prompt_lengths, max_gen_toks, strict=True))


class CountsTruncation:
    """Mixin for an lm-eval model (HFLM, VLLM): counts, per generate_until call, the prompts that do not
    fit with their generation budget, before the backend truncates them. Needs `tok_encode`,
    `max_length` and `max_gen_toks` (lm-eval's defaults for a request without its own budget)."""

    truncated_prompts = 0

    def generate_until(self, requests, disable_tqdm: bool = False):
        contexts = [req.args[0] for req in requests]
        budgets = [int(req.args[1].get("max_gen_toks", self.max_gen_toks)) for req in requests]
        lengths = [len(self.tok_encode(c)) for c in contexts]
        over = prompts_over_budget(lengths, budgets, int(self.max_length))
        if over:
            log.warning("evaluate: %d of %d prompt(s) longer than the window; truncated", over, len(lengths))
        self.truncated_prompts += over
        return super().generate_until(requests, disable_tqdm=disable_tqdm)


def middle_truncating_hflm():
    """HFLM whose over-long prompts lose their middle, not their start (LongBench's rule)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class MiddleTruncatingHFLM(CountsTruncation, HFLM):
        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            ids, mask = super().tok_batch_encode(strings, padding_side, None, truncation)
            if not left_truncate_len or ids.size(1) <= left_truncate_len:
                return ids, mask
            rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
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


def counting(base: type) -> type:
    """`base` (lm-eval's VLLM, which truncates in the middle itself) counting its truncated prompts."""
    return type(f"Counting{base.__name__}", (CountsTruncation, base), {})


def _vllm_class() -> Callable[..., Any]:
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as exc:
        raise UserError(
            "evaluation.backend=vllm needs vllm installed (pip install vllm); or use evaluation.backend=hf"
        ) from exc
    return counting(VLLM)


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
        return _vllm_class()(
            pretrained=path,
            max_length=max_length,
            tensor_parallel_size=tensor_parallel_size,
            truncation_side="middle",
            dtype=dtype,
        )
    raise ConfigError(f"evaluation.backend={backend}: choose one of {BACKENDS}")
