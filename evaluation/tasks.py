"""What every evaluation suite shares: the suite registry, the context a suite builds its lm-eval task
configs from, lm-eval's own task YAMLs, local-file re-pointing and the offline data checks."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, MissingInputError
from common.registry import Registry

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
DATA_DIR = Path(__file__).resolve().parent / "data"
"""Data kept in the repository (official prompts, a metric script), each folder naming its source."""


class EvaluationDataError(MissingInputError):
    """A suite's data is not reachable; the message names the dataset and the config key to change."""


def offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_dataset_cached(path: str, name: str | None = None) -> bool:
    """Whether `datasets` can build `path` (online: always tried later by lm-eval; offline: from its cache)."""
    import datasets

    try:
        datasets.load_dataset_builder(path, name)
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return False
    return True


def require_hub_dataset(path: str, name: str | None, suite: str, key: str) -> None:
    """Offline, fail at once with the dataset and the config key, instead of lm-eval retrying the Hub."""
    if offline() and not hub_dataset_cached(path, name):
        raise EvaluationDataError(
            f"evaluation suite '{suite}': dataset {path}{'/' + name if name else ''} is not available offline "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set and not in the datasets cache). "
            f"Point {key} at local files, run once online to fill the cache, or drop '{suite}' from "
            "evaluation.suites."
        )


def builtin_task(relative: str, resolve_functions: bool = True) -> dict[str, Any]:
    """lm-eval's own task YAML as a dict (its `!function`s imported unless `resolve_functions` is off,
    when they stay file paths for the caller to replace)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = dict(load_yaml(LM_EVAL_TASKS / relative, resolve_func=resolve_functions))
    for key in ("tag", "group"):
        config.pop(key, None)
    return config


def point_at_files(config: dict[str, Any], files: Mapping[str, Path]) -> dict[str, Any]:
    """Make an lm-eval task read local files ({split: file}, all .jsonl/.json or all .parquet)."""
    config["dataset_path"] = "parquet" if {Path(f).suffix for f in files.values()} == {".parquet"} else "json"
    config["dataset_kwargs"] = {"data_files": {split: str(f) for split, f in files.items()}}
    config.pop("dataset_name", None)
    return config


def local_file(
    data_dir: Path, stem: str, suffixes: tuple[str, ...] = (".parquet", ".jsonl", ".json")
) -> Path | None:
    for suffix in suffixes:
        if (data_dir / f"{stem}{suffix}").is_file():
            return data_dir / f"{stem}{suffix}"
    return None


@dataclass
class SuiteContext:
    conf: Mapping[str, Any]
    """This suite's config (evaluation.<suite>)."""
    tokenizer: Any
    model_path: str
    out_dir: Path
    seed: int
    cache_dir: Path | None = None
    """Downloads and derived data shared by runs (paths.cache_dir); None = the default cache."""


@dataclass
class Suite:
    tasks: Callable[[SuiteContext], list[dict[str, Any]]]
    summarize: Callable[
        [SuiteContext, Mapping[str, Any], Mapping[str, list], Mapping[str, Any]], dict[str, Any]
    ]
    """(context, lm-eval results, logged samples, task configs lm-eval ran) -> the suite's summary."""
    limit: Callable[[SuiteContext], int | None] = lambda ctx: ctx.conf.get("samples")
    lengths: Callable[[Mapping[str, Any]], list[int]] = lambda conf: []
    """The prompt + generation lengths the suite builds (checked against evaluation.max_length)."""
    length_key: str = ""
    """The config key of those lengths, for the error message."""


SUITES: Registry[Suite] = Registry("evaluation suite")


def wanted_tasks(ctx: SuiteContext, suite: str, known: list[str]) -> list[str]:
    """`evaluation.<suite>.tasks` (a list, or a mapping task -> settings), or all of them when null;
    unknown names fail listing the known ones."""
    wanted = list(ctx.conf.get("tasks") or known)
    if unknown := [t for t in wanted if t not in known]:
        raise ConfigError(f"evaluation.{suite}.tasks: unknown {unknown}; known: {known}")
    return wanted


def score_of(results: Mapping[str, Any], task: str, metric: str) -> float | None:
    """lm-eval keys results '<metric>,<filter>' ('acc,none', 'pass@1,create_test')."""
    for key, value in results.get(task, {}).items():
        if key.split(",")[0] == metric and isinstance(value, (int, float)):
            return float(value)
    return None


@functools.cache
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()
