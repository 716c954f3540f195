"""The model behind lm-eval: HF (default, CPU or GPU; prompts truncated in the middle) or vLLM.

Both count the prompts they must cut to fit (prompt + generation budget over `evaluation.max_length`),
with one rule shared by both (`CountsTruncation`), so `truncated_prompts` in results.json means the same
under either backend. Under a multi-process launch the HF model is lm-eval's data-parallel HFLM
(`evaluation.parallel`); vLLM parallelises inside its one process (`data_parallel_size` x
`tensor_parallel_size` GPUs).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.distributed import rank_info
from common.errors import ConfigError, UserError
from common.model_sources import resolve_model_path
from evaluation.truncation import truncate_middle

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
AUTO_BATCH = re.compile(r"auto(:\d+(\.\d+)?)?")


def parse_batch_size(value: Any) -> int | str:
    """`evaluation.batch_size` as lm-eval takes it: an integer >= 1, or 'auto' / 'auto:N' (HF: the largest
    batch that fits, found by trying; N = how many times it is looked for again over the requests)."""
    if isinstance(value, str) and AUTO_BATCH.fullmatch(value.strip()):
        return value.strip()
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or (isinstance(value, float) and value != size) or isinstance(value, bool):
        raise ConfigError(f"evaluation.batch_size={value}: an integer >= 1, 'auto' or 'auto:N'")
    return size


@dataclass(frozen=True)
class BackendConfig:
    """The `evaluation.*` keys that say how the model runs (none of them changes a score)."""

    backend: str = "hf"
    """hf | vllm."""
    max_length: int = 4096
    """The evaluation window: prompt + generation."""
    batch_size: int | str = 1
    """HF: an integer, 'auto' or 'auto:N' (lm-eval's). vLLM schedules its own batches."""
    device: str = "auto"
    """HF: auto | cpu | cuda | cuda:<i>; under several ranks each rank takes its own (cuda:<local rank>)."""
    dtype: str = "auto"
    """auto = bfloat16 on CUDA, float32 on CPU (HF); the checkpoint's dtype (vLLM)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs one model is split over."""
    data_parallel_size: int = 1
    """vLLM: model replicas (Ray workers, each on tensor_parallel_size GPUs), requests split over them."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"evaluation.backend={self.backend}: choose one of {BACKENDS}")
        object.__setattr__(self, "batch_size", parse_batch_size(self.batch_size))
        for key in ("tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"evaluation.{key}={value}: an integer >= 1")
            if value > 1 and self.backend != "vllm":
                raise ConfigError(
                    f"evaluation.{key}={value} applies to evaluation.backend=vllm only; the HF backend runs "
                    "one model per rank (evaluation.num_gpus, or the job's launch)"
                )

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> BackendConfig:
        return cls(
            backend=str(conf.get("backend", "hf")),
            max_length=int(conf["max_length"]),
            batch_size=conf.get("batch_size", 1),
            device=str(conf.get("device", "auto")),
            dtype=str(conf.get("dtype", "auto")),
            tensor_parallel_size=conf.get("tensor_parallel_size", 1),
            data_parallel_size=conf.get("data_parallel_size", 1),
        )


def prompts_over_budget(prompt_lengths: Iterable[int], max_gen_toks: Iterable[int], max_length: int) -> int:
    """How many prompts a backend must cut: prompt tokens + generation budget > the model's window."""
    return sum(n + g > max_length for n, g in zip(prompt_lengths, max_gen_toks, strict=True))


def first_copies(requests: Sequence[Any]) -> list[int]:
    """For each request, the index of the first request that is the same greedy Instance object.

    lm-eval pads a rank holding fewer requests than the others with copies of its last Instance (so
    that DDP forwards stay in step) and repeats an Instance `repeats` times; a greedy copy gets the same
    answer, so it is generated once. A sampled request (do_sample) is always its own."""
    first: dict[int, int] = {}
    out = []
    for i, req in enumerate(requests):
        sampled = bool(req.args[1].get("do_sample", False))
        out.append(i if sampled else first.setdefault(id(req), i))
    return out


class CountsTruncation:
    """Mixin for an lm-eval model (HFLM, VLLM): counts, per generate_until call, the prompts it generates
    and those that do not fit with their generation budget, before the backend truncates them; copies of
    one greedy request are generated once (`first_copies`). Needs `tok_encode`, `max_length` and
    `max_gen_toks` (lm-eval's defaults for a request without its own budget)."""

    truncated_prompts = 0
    generated_prompts = 0

    def generate_until(self, requests, disable_tqdm: bool = False):
        copies = first_copies(requests)
        distinct = sorted(set(copies))
        todo = [requests[i] for i in distinct]
        contexts = [req.args[0] for req in todo]
        budgets = [int(req.args[1].get("max_gen_toks", self.max_gen_toks)) for req in todo]
        lengths = [len(self.tok_encode(c)) for c in contexts]
        over = prompts_over_budget(lengths, budgets, int(self.max_length))
        if over:
            log.warning("evaluate: %d of %d prompt(s) longer than the window; truncated", over, len(lengths))
        self.truncated_prompts += over
        self.generated_prompts += len(todo)
        answers = dict(zip(distinct, super().generate_until(todo, disable_tqdm=disable_tqdm), strict=True))
        return [answers[i] for i in copies]


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

        def _detect_batch_size(self, requests=None, pos: int = 0):
            """batch_size=auto per rank: HFLM takes the minimum over ranks with a collective inside
            generate_until, which a rank whose requests all replay from its cache never calls (the others
            would wait forever on a resumed run). The batch size changes speed, not what is generated."""
            world, self._world_size = self._world_size, 1
            try:
                return super()._detect_batch_size(requests, pos)
            finally:
                self._world_size = world

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


def vllm_arguments(path: str, conf: BackendConfig) -> dict[str, Any]:
    """lm-eval's VLLM arguments: one engine on tensor_parallel_size GPUs, or data_parallel_size of them
    (lm-eval starts one Ray worker per replica and splits the requests over them; needs ray)."""
    return {
        "pretrained": path,
        "max_length": conf.max_length,
        "tensor_parallel_size": conf.tensor_parallel_size,
        "data_parallel_size": conf.data_parallel_size,
        "truncation_side": "middle",
        "dtype": conf.dtype,
    }


def _load_hf(path: str, conf: BackendConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation import parallel

    accelerator = parallel.accelerator(conf.device) if rank_info().world_size > 1 else None
    device = str(accelerator.device) if accelerator else conf.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = conf.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    lm.config.use_cache = True  # a checkpoint saved mid-training may have it off
    tokenizer = AutoTokenizer.from_pretrained(path)
    hflm = middle_truncating_hflm()(
        pretrained=lm,
        tokenizer=tokenizer,
        max_length=conf.max_length,
        batch_size=conf.batch_size,
        device=device,
    )
    if accelerator:
        parallel.make_data_parallel(hflm, accelerator)
    return hflm


def load_lm(model: str, cache_dir: Path, conf: BackendConfig) -> Any:
    path = resolve_model_path(model, cache_dir)
    if conf.backend == "hf":
        return _load_hf(path, conf)
    return _vllm_class()(**vllm_arguments(path, conf))
