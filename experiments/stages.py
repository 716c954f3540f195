"""The stage graph: what each stage reads, which config decides its result, and where its code lives."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.artifacts import fingerprint
from common.errors import ConfigError
from common.stage import StageContext, StageNotImplementedError

# Keys that change how fast a stage runs, never what it writes: left out of every fingerprint.
NON_RESULT_KEYS = (
    "num_proc",
    "num_workers",
    "shard_rows",
    "part_records",
    "flush_every",
    "progress",
    "log_every",
)

# How and where the evaluation runs, never what it scores (1 or N ranks give the same results).
EVALUATION_SPEED_KEYS = (
    "batch_size",
    "device",
    "backend",
    "tensor_parallel_size",
    "data_parallel_size",
    "num_gpus",
)


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]
    """Upstream stages whose artifacts this one reads."""
    config_keys: tuple[str, ...]
    """Dotted config paths that decide the result (hashed into the fingerprint)."""
    runner: str | None
    """"module:function" taking (cfg, StageContext) and returning the manifest; None = not implemented."""
    extras: str | None = None
    """"module:function" (cfg) -> extra fingerprint material (e.g. input file signatures)."""
    pending: str = ""
    """Said when a not-yet-implemented stage is asked for."""
    version: int = 1
    """Bump when the stage's output format or maths changes, to invalidate old artifacts."""
    distributed: bool = False
    """Every rank runs it (and rank 0 writes the manifest); otherwise rank 0 runs it and the others wait."""
    ignored: tuple[str, ...] = ()
    """Extra keys of this stage that do not change results."""
    inputs_for: str | None = None
    """"module:function" (cfg) -> the inputs actually needed, when they depend on the config."""
    check: str | None = None
    """"module:function" (cfg) -> None, raising a ConfigError on a bad value. The pipeline checks every
    requested stage before the first one runs, so a typo in `selection` does not surface after hours of
    prepare and score."""
    skip_if: str | None = None
    """"module:function" (cfg) -> why this stage has nothing to do for the config (None: it runs)."""

    def _load(self, ref: str) -> Callable[..., Any]:
        module, func = ref.split(":")
        return getattr(importlib.import_module(module), func)

    def input_names(self, cfg: DictConfig) -> tuple[str, ...]:
        return tuple(self._load(self.inputs_for)(cfg)) if self.inputs_for else self.inputs

    def skip_reason(self, cfg: DictConfig) -> str | None:
        return self._load(self.skip_if)(cfg) if self.skip_if else None

    def check_implemented(self) -> None:
        if self.runner is None:
            raise StageNotImplementedError(self.name, self.pending)

    def check_config(self, cfg: DictConfig) -> None:
        if self.check and not self.skip_reason(cfg):
            self._load(self.check)(cfg)

    def run(self, cfg: DictConfig, ctx: StageContext) -> dict[str, Any] | None:
        self.check_implemented()
        return self._load(self.runner)(cfg, ctx)

    def resolved_config(self, cfg: DictConfig) -> dict[str, Any]:
        """The stage's result-deciding config keys, resolved to plain values."""
        out: dict[str, Any] = {}
        for key in self.config_keys:
            node = OmegaConf.select(cfg, key, default=None)
            out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        return out

    def fingerprint(self, cfg: DictConfig, input_fps: dict[str, str]) -> str:
        material: dict[str, Any] = {"version": self.version, **self.resolved_config(cfg)}
        if self.extras:
            material["extras"] = self._load(self.extras)(cfg)
        return fingerprint(self.name, material, input_fps, ignored=NON_RESULT_KEYS + self.ignored)


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "prepare",
            (),
            ("data", "model.name_or_path"),
            "selection.prepare:run",
            extras="selection.prepare:fingerprint_extras",
            check="selection.prepare:check_config",
        ),
        StageSpec(
            "score",
            ("prepare",),
            (
                "selection.method",
                "selection.scoring",
                "selection.scorer_model.name_or_path",
                "selection.scorer_model.dtype",
            ),
            "selection.score:run",
            check="selection.score:check_config",
            # 2: ProLong re-tokenizes without BOS; scoring.dtype auto follows scorer_model.dtype on CUDA
            version=2,
            distributed=True,
            ignored=("batch_size", "device", "wait_timeout_s"),
            skip_if="selection.score:skip_reason",  # selection=all
        ),
        StageSpec(
            "select",
            ("prepare", "score"),
            ("selection", "model.name_or_path"),
            "selection.select:run",
            check="selection.select:check_config",
            # the scorer and its run-time knobs are already in the score fingerprint; the label names rows
            ignored=("scorer_model", "batch_size", "device", "wait_timeout_s", "label"),
            inputs_for="selection.select:stage_inputs",  # selection=all reads no scores
        ),
        StageSpec(
            "train",
            ("prepare", "select"),
            ("model", "training", "seed"),
            "training.train:run",
            extras="training.train:fingerprint_extras",
            distributed=True,
            # where and how it runs, resumes and checkpoints, not what it learns
            ignored=(
                "resume",
                "save_every",
                "checkpoint_at_end",
                "keep_checkpoints",
                "num_gpus",
                "num_nodes",
                "launcher",
                "hostfile",
                "device",
                "peak_flops",
            ),
        ),
        StageSpec(
            "evaluate",
            ("train",),
            ("evaluation",),
            "evaluation.stage:run",
            check="evaluation.stage:check_config",
            extras="evaluation.stage:fingerprint_extras",
            # evaluation.model set: any HF dir / Hub id, no train artifact needed
            inputs_for="evaluation.stage:stage_inputs",
            ignored=EVALUATION_SPEED_KEYS,
            version=2,  # results.json: protocol per suite; official LongBench prompts and scoring
            distributed=True,  # HF: lm-eval shards the requests over the ranks, rank 0 writes
        ),
        StageSpec(
            "evaluate_base",
            (),
            ("evaluation", "model.name_or_path"),
            "evaluation.stage:run_base",
            check="evaluation.stage:check_config",
            # the same evaluation on the untrained model.name_or_path (evaluation.model does not apply)
            ignored=(*EVALUATION_SPEED_KEYS, "model"),
            distributed=True,
        ),
        StageSpec(
            "report",
            ("evaluate",),
            ("report",),
            "experiments.report:run",
            extras="experiments.report:fingerprint_extras",
            inputs_for="experiments.report:stage_inputs",
            version=2,  # rows say what they measured; references; base-model rows
        ),
    )
}
STAGE_ORDER = tuple(STAGES)


def validate_stages(requested: list[str]) -> list[str]:
    """Known names, no repeats, in pipeline order (a prefix or any ordered subset)."""
    for name in requested:
        if name not in STAGES:
            raise ConfigError(f"stages: unknown stage '{name}'. Stages, in order: {', '.join(STAGE_ORDER)}")
    if len(set(requested)) != len(requested):
        raise ConfigError(f"stages={requested}: a stage is listed twice")
    ordered = sorted(requested, key=STAGE_ORDER.index)
    if ordered != list(requested):
        raise ConfigError(f"stages={requested}: give them in pipeline order ({', '.join(STAGE_ORDER)})")
    return ordered
