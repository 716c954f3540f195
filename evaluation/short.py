"""The short-context suites of Table 3 (MMLU, HellaSwag, HumanEval, OpenBookQA) through lm-eval's own task
YAMLs, from the Hub or local files, each with its own number of shots.

`evaluation.short.tasks` maps each task to its settings: `num_fewshot` (null = the task's lm-eval default:
0 for all four; the paper config runs MMLU 5-shot, the others at their default). MMLU runs as its 57
subject tasks (or the subjects found locally) and scores their size-weighted mean, as lm-eval's group.

HumanEval's metric is `evaluate`'s `code_eval`, which lm-eval's humaneval utils.py loads by name when it
is imported (from the Hub, or its module cache offline) and which refuses to run unless
HF_ALLOW_CODE_EVAL=1 is set first. Here the variable is set and the metric loaded before any task is
built (`evaluation.short.code_eval`: `hub` = lm-eval's source, `bundled` = the same metric kept in
evaluation/data/code_eval, or a metric directory), and lm-eval's humaneval task gets that metric object.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigError, UserError
from evaluation import columns
from evaluation.tasks import (
    DATA_DIR,
    LM_EVAL_TASKS,
    SUITES,
    EvaluationDataError,
    Suite,
    SuiteContext,
    builtin_task,
    local_file,
    point_at_files,
    require_hub_dataset,
    score_of,
    wanted_tasks,
)

log = logging.getLogger(__name__)

SHORT_DATASETS = {
    "mmlu": ("cais/mmlu", "abstract_algebra"),
    "hellaswag": ("Rowan/hellaswag", None),
    "openbookqa": ("allenai/openbookqa", "main"),
    "humaneval": ("openai/openai_humaneval", None),
}
SHORT_YAMLS = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "humaneval": "humaneval/humaneval.yaml",
}
SHORT_METRICS = {"mmlu": "acc", "hellaswag": "acc_norm", "openbookqa": "acc_norm", "humaneval": "pass@1"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
CODE_EVAL_BUNDLED = DATA_DIR / "code_eval"


def num_fewshot(ctx: SuiteContext, task: str) -> int | None:
    """`evaluation.short.tasks.<task>.num_fewshot`; None = lm-eval's default for the task."""
    tasks = ctx.conf.get("tasks")
    settings = (tasks.get(task) or {}) if isinstance(tasks, Mapping) else {}
    value = settings.get("num_fewshot")
    if value is not None and int(value) < 0:
        raise ConfigError(f"evaluation.short.tasks.{task}.num_fewshot={value}: give 0 or more, or null")
    return None if value is None else int(value)


def repoint_splits(config: dict[str, Any], directory: Path, key: str) -> dict[str, Any]:
    """Point an lm-eval task at local files `<directory>/<split>.jsonl|.parquet` (the Hub schema).

    Splits without a file are dropped (few-shot / training splits are optional); the split the task
    evaluates on must exist."""
    evaluated = config.get("test_split") or config.get("validation_split")
    files: dict[str, Path] = {}
    for split_key in SPLIT_KEYS:
        split = config.get(split_key)
        if not split:
            continue
        local = local_file(directory, split, (".jsonl", ".parquet"))
        if local is not None:
            files[split] = local
        elif split == evaluated:
            raise EvaluationDataError(
                f"{key}: no {directory / split}.jsonl (or .parquet) for task {config['task']}"
            )
        else:
            config[split_key] = None
    return point_at_files(config, files)


def mmlu_subjects(directory: Path | None) -> list[dict[str, Any]]:
    """One lm-eval MMLU subject task per subject: all 57 from the Hub, or those under `<directory>/mmlu/`
    (test.jsonl, and dev.jsonl for the shots)."""
    if directory is None:
        return [
            builtin_task(f"mmlu/default/{p.name}")
            for p in sorted((LM_EVAL_TASKS / "mmlu/default").glob("mmlu_*.yaml"))
        ]
    configs = []
    for subject_dir in sorted(p for p in (directory / "mmlu").glob("*") if p.is_dir()):
        yaml = LM_EVAL_TASKS / "mmlu" / "default" / f"mmlu_{subject_dir.name}.yaml"
        if not yaml.is_file():
            raise EvaluationDataError(f"evaluation.short.data_dir: {subject_dir.name} is not an MMLU subject")
        configs.append(
            repoint_splits(
                builtin_task(f"mmlu/default/{yaml.name}"), subject_dir, "evaluation.short.data_dir"
            )
        )
    if not configs:
        raise EvaluationDataError(f"evaluation.short.data_dir={directory}: no mmlu/<subject>/ directory")
    return configs


def load_code_eval(source: str) -> Any:
    """`evaluate`'s code_eval metric from `source` (hub | bundled | a metric directory), loaded now so a
    missing metric fails before the model loads. Needs HF_ALLOW_CODE_EVAL=1 to compute (set by the caller)."""
    import evaluate

    path = str(CODE_EVAL_BUNDLED) if source == "bundled" else "code_eval" if source == "hub" else source
    try:
        return evaluate.load(path)
    except Exception as exc:  # noqa: BLE001 - any failure means "not loadable here"
        raise UserError(
            f"evaluation.short.code_eval={source}: HumanEval's metric (evaluate's code_eval) cannot be loaded "
            f"({type(exc).__name__}: {str(exc)[:200]}). Offline, `hub` needs it in evaluate's module cache "
            "(run once online: python -c \"import evaluate; evaluate.load('code_eval')\"); or set "
            "evaluation.short.code_eval=bundled (the same metric, kept in evaluation/data/code_eval), or a "
            "directory holding code_eval.py and execute.py."
        ) from exc


def pass_at_k_with(metric: Any):
    """lm-eval's humaneval metric function (utils.pass_at_k) over a metric loaded by `load_code_eval`."""

    def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None):
        ks = [k] if isinstance(k, int) else list(k or [1])
        return metric.compute(references=references, predictions=predictions, k=ks)[0]

    return pass_at_k


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's humaneval filter (utils.build_predictions): the prompt followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_task(source: str) -> dict[str, Any]:
    """lm-eval's humaneval YAML, its metric and filter functions given the metric loaded here (its own
    utils.py would load code_eval by name on import, offline only from the Hub's module cache)."""
    config = builtin_task(SHORT_YAMLS["humaneval"], resolve_functions=False)
    metric = pass_at_k_with(load_code_eval(source))
    config["metric_list"] = [{**m, "metric": metric} for m in config["metric_list"]]
    for flt in config.get("filter_list", []):
        for step in flt["filter"]:
            if step.get("function") == "custom":
                step["filter_fn"] = build_predictions
    return config


def _allow_code_eval(ctx: SuiteContext) -> str:
    if not ctx.conf.get("allow_code_eval", False):
        raise EvaluationDataError(
            "evaluation.short.tasks includes humaneval, which executes model-written code: set "
            "evaluation.short.allow_code_eval=true to allow it (sets HF_ALLOW_CODE_EVAL=1 and confirms "
            "lm-eval's unsafe-code run), or drop humaneval"
        )
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # before any task is built: code_eval checks it when computing
    log.warning(
        "evaluate: HumanEval executes model-generated code on this machine, unsandboxed "
        "(evaluation.short.allow_code_eval=true); run it in a container or VM you can throw away"
    )
    return str(ctx.conf.get("code_eval") or "hub")


def _with_shots(config: dict[str, Any], shots: int | None, key: str) -> dict[str, Any]:
    if shots is None:
        return config
    if shots > 0 and not (config.get("fewshot_split") or config.get("training_split")):
        raise EvaluationDataError(
            f"{key}={shots}: task {config['task']} has no split to draw its shots from (locally: "
            "MMLU needs mmlu/<subject>/dev.jsonl, the others their train.jsonl)"
        )
    return {**config, "num_fewshot": shots}


def short_tasks(ctx: SuiteContext) -> list[dict[str, Any]]:
    wanted = wanted_tasks(ctx, "short", sorted(SHORT_DATASETS))
    code_eval = _allow_code_eval(ctx) if "humaneval" in wanted else None
    data_dir = ctx.conf.get("data_dir")
    directory = Path(data_dir).expanduser() if data_dir else None
    tasks: list[dict[str, Any]] = []
    for task in wanted:
        if directory is None:
            require_hub_dataset(*SHORT_DATASETS[task], "short", "evaluation.short.data_dir")
        if task == "mmlu":
            configs = mmlu_subjects(directory)
        else:
            config = humaneval_task(code_eval) if task == "humaneval" else builtin_task(SHORT_YAMLS[task])
            if directory is not None:
                config = repoint_splits(config, directory / task, "evaluation.short.data_dir")
            configs = [config]
        key = f"evaluation.short.tasks.{task}.num_fewshot"
        tasks += [_with_shots(c, num_fewshot(ctx, task), key) for c in configs]
    return tasks


def mmlu_from_subjects(results: Mapping[str, Any], samples: Mapping[str, list]) -> float | None:
    """MMLU accuracy over the subject tasks, weighted by their sizes (as lm-eval's mmlu group)."""
    parts = [
        (score_of(results, task, "acc"), len(samples.get(task, [])))
        for task in results
        if task.startswith("mmlu_")
    ]
    parts = [(acc, n) for acc, n in parts if acc is not None and n]
    total = sum(n for _, n in parts)
    return sum(acc * n for acc, n in parts) / total if total else None


def short_summary(
    ctx: SuiteContext, results: Mapping[str, Any], samples: Mapping[str, list], configs: Mapping[str, Any]
) -> dict[str, Any]:
    """Table 3 columns, and per task what was measured: its metric, shots and number of samples."""
    scores, protocol = {}, {}
    for task, metric in SHORT_METRICS.items():
        members = [t for t in configs if t == task or (task == "mmlu" and t.startswith("mmlu_"))]
        if not members:
            continue
        value = score_of(results, task, metric)
        if value is None and task == "mmlu":
            value = mmlu_from_subjects(results, samples)
        if value is not None:
            scores[task] = 100.0 * value
        shots = sorted({int(configs[t].get("num_fewshot") or 0) for t in members})
        protocol[task] = {
            "metric": metric,
            "num_fewshot": shots[0] if len(shots) == 1 else shots,
            "samples": sum(len(samples.get(t, [])) for t in members),
        }
    return {"tasks": scores, "table3": columns.short_columns(scores), "protocol": protocol}


SUITES.register("short")(Suite(short_tasks, short_summary))
