"""Evaluation suites as lm-eval task configs, and their paper-column summaries.

Built-in lm-eval tasks (RULER, LongBench, the short suites) are loaded from lm-eval's own YAMLs and only
re-pointed (lengths, local data); NIAH is our own task (evaluation/niah.py) run through lm-eval too.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from common.errors import ConfigError
from common.model_sources import default_cache_dir
from common.registry import Registry
from evaluation import columns, niah, punkt_data

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"

# RULER tasks whose data comes from the web or the Hub: the Paul Graham essay haystack, SQuAD, HotpotQA.
# The others (single_1, multikey_2/3, VT, CWE, FWE) are synthetic.
RULER_DOWNLOADING = {
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multivalue",
    "niah_multiquery",
    "ruler_qa_squad",
    "ruler_qa_hotpot",
}
RULER_FILES = {
    **{t: f"{t}.yaml" for t in columns.RULER_NIAH.values()},
    "ruler_vt": "vt.yaml",
    "ruler_cwe": "cwe.yaml",
    "ruler_fwe": "fwe.yaml",
    "ruler_qa_squad": "qa_squad.yaml",
    "ruler_qa_hotpot": "qa_hotpot.yaml",
}


class EvaluationDataError(RuntimeError):
    """A suite's data is not reachable; the message names the dataset and the config key to change."""


def offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def require_hub_dataset(path: str, name: str | None, suite: str, key: str) -> None:
    """Offline, fail at once with the dataset and the config key, instead of lm-eval retrying the Hub."""
    if not offline():
        return
    import datasets

    try:
        datasets.load_dataset_builder(path, name)
    except Exception as exc:  # noqa: BLE001 - any failure means "not in the local cache"
        raise EvaluationDataError(
            f"evaluation suite '{suite}': dataset {path}{'/' + name if name else ''} is not available offline "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set and not in the datasets cache: {type(exc).__name__}). "
            f"Point {key} at local files, run once online to fill the cache, or drop '{suite}' from "
            "evaluation.suites."
        ) from exc


def builtin_task(relative: str) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = dict(load_yaml(LM_EVAL_TASKS / relative))
    for key in ("tag", "group"):
        config.pop(key, None)
    return config


def point_at_files(config: dict[str, Any], files: Mapping[str, Path]) -> dict[str, Any]:
    """Make an lm-eval task read local files ({split: file}, all .jsonl/.json or all .parquet)."""
    config["dataset_path"] = "parquet" if {Path(f).suffix for f in files.values()} == {".parquet"} else "json"
    config["dataset_kwargs"] = {"data_files": {split: str(f) for split, f in files.items()}}
    config.pop("dataset_name", None)
    return config


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
    summarize: Callable[[SuiteContext, Mapping[str, Any], Mapping[str, list]], dict[str, Any]]
    limit: Callable[[SuiteContext], int | None] = lambda ctx: ctx.conf.get("samples")


SUITES: Registry[Suite] = Registry("evaluation suite")


def wanted_tasks(ctx: SuiteContext, suite: str, known: list[str]) -> list[str]:
    """`evaluation.<suite>.tasks`, or all of them when null; unknown names fail listing the known ones."""
    wanted = list(ctx.conf.get("tasks") or known)
    if unknown := [t for t in wanted if t not in known]:
        raise ConfigError(f"evaluation.{suite}.tasks: unknown {unknown}; known: {known}")
    return wanted


def _score(results: Mapping[str, Any], task: str, metric: str) -> float | None:
    """lm-eval keys results '<metric>,<filter>' ('acc,none', 'pass@1,create_test')."""
    for key, value in results.get(task, {}).items():
        if key.split(",")[0] == metric and isinstance(value, (int, float)):
            return float(value)
    return None


# ---- NIAH -------------------------------------------------------------------------------------------


def niah_tasks(ctx: SuiteContext) -> list[dict[str, Any]]:
    samples = niah.make_samples(
        ctx.tokenizer,
        ctx.conf["lengths"],
        ctx.conf["depths"],
        int(ctx.conf.get("samples_per_cell", 1)),
        int(ctx.conf.get("max_gen_toks", 16)),
        ctx.conf.get("haystack_path"),
        ctx.seed,
    )
    path = ctx.out_dir / "niah_samples.jsonl"
    atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in samples))
    return [
        {
            "task": "niah_grid",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{input}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": " ",
            "generation_kwargs": {
                "until": ["\n"],
                "max_gen_toks": int(ctx.conf.get("max_gen_toks", 16)),
                "do_sample": False,
            },
            "process_results": niah.needle_retrieved,
            "metric_list": [{"metric": "retrieval", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
    ]


def niah_summary(
    ctx: SuiteContext, results: Mapping[str, Any], samples: Mapping[str, list]
) -> dict[str, Any]:
    grid = niah.grid_scores(samples.get("niah_grid", []))
    niah.write_grid_csv(ctx.out_dir / "niah_grid.csv", grid)
    niah.write_heatmap(ctx.out_dir / "niah_heatmap.png", grid, "Needle in a haystack: retrieval")
    return {
        "retrieval": _score(results, "niah_grid", "retrieval"),
        "grid": {f"{length}@{depth:g}": score for (length, depth), score in grid.items()},
        "files": ["niah_grid.csv", "niah_heatmap.png"],
    }


SUITES.register("niah")(Suite(niah_tasks, niah_summary, limit=lambda ctx: None))


# ---- RULER ------------------------------------------------------------------------------------------


# lm-eval's niah_utils settings for the tasks that use the essay haystack (RULER's own parameters).
ESSAY_NEEDLES = {
    "niah_single_2": {"type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_single_3": {"type_needle_k": "words", "type_needle_v": "uuids"},
    "niah_multikey_1": {"type_needle_k": "words", "type_needle_v": "numbers", "num_needle_k": 4},
    "niah_multivalue": {"type_needle_k": "words", "type_needle_v": "numbers", "num_needle_v": 4},
    "niah_multiquery": {"type_needle_k": "words", "type_needle_v": "numbers", "num_needle_q": 4},
}


def essay_dataset_from_file(
    task: str, haystack_path: str, samples: int | None, **kwargs: Any
) -> dict[str, Any]:
    """lm-eval's RULER generator with its template and this task's needle settings, over a local text
    instead of the downloaded Paul Graham essays (the file needs at least as many words as the longest
    length has tokens)."""
    import re

    from lm_eval.tasks.ruler import niah_utils
    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name
    from lm_eval.tasks.ruler.prepare_niah import generate_samples

    lengths = kwargs.pop("max_seq_lengths", DEFAULT_SEQ_LENGTHS)
    tokenizer = get_tokenizer(resolve_tokenizer_name(kwargs))
    words = re.sub(r"\s+", " ", Path(haystack_path).expanduser().read_text(encoding="utf-8")).split(" ")
    return niah_utils.download_dataset(
        generate_samples(
            words,
            max_seq_length=length,
            template=niah_utils.TEMPLATE,
            type_haystack="essay",
            num_samples=samples or 500,
            TOKENIZER=tokenizer,
            **ESSAY_NEEDLES[task],
        )
        for length in lengths
    )


def first_per_length(make: Callable[..., dict], samples: int | None, **kwargs: Any) -> dict[str, Any]:
    """RULER's generator, keeping the first `samples` of each length (lm-eval's `limit` would take the
    first rows overall, i.e. all from the first length)."""
    data = make(**kwargs)
    if samples is None:
        return data
    test, seen, keep = data["test"], {}, []
    for i, length in enumerate(test["max_length"]):
        if seen.get(length, 0) < samples:
            keep.append(i)
            seen[length] = seen.get(length, 0) + 1
    return {"test": test.select(keep)}


def ruler_tasks(ctx: SuiteContext) -> list[dict[str, Any]]:
    wanted = wanted_tasks(ctx, "ruler", columns.RULER_TASKS)
    haystack = ctx.conf.get("haystack_path")
    if haystack and not Path(haystack).expanduser().is_file():
        raise EvaluationDataError(f"evaluation.ruler.haystack_path={haystack}: no such file")
    local_essays = set(ESSAY_NEEDLES) & set(wanted) if haystack else set()
    # every RULER task imports lm-eval's prepare_niah, which downloads punkt_tab unless NLTK finds it
    punkt_data.ensure_punkt_tab(ctx.cache_dir or default_cache_dir())
    needs_web = sorted(set(wanted) & RULER_DOWNLOADING - local_essays)
    if offline() and needs_web:
        raise EvaluationDataError(
            f"evaluation suite 'ruler': tasks {needs_web} download their haystack or QA data (essays, SQuAD, "
            "HotpotQA), which is impossible offline. Give the essay tasks a local text "
            "(evaluation.ruler.haystack_path), set evaluation.ruler.tasks to the synthetic ones "
            "([niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_cwe, ruler_fwe]) or run online."
        )
    lengths = [int(n) for n in ctx.conf["lengths"]]
    configs = []
    for task in wanted:
        config = builtin_task(f"ruler/{RULER_FILES[task]}")
        config["metadata"] = {
            **config.get("metadata", {}),
            "max_seq_lengths": lengths,
            "tokenizer": ctx.model_path,
        }
        make = config["custom_dataset"]
        if task in local_essays:
            make = functools.partial(essay_dataset_from_file, task, haystack, ctx.conf.get("samples"))
        config["custom_dataset"] = functools.partial(first_per_length, make, ctx.conf.get("samples"))
        config["metric_list"] = [m for m in config["metric_list"] if int(m["metric"]) in lengths] or [
            {
                "metric": str(n),
                "aggregation": config["metric_list"][0]["aggregation"],
                "higher_is_better": True,
            }
            for n in lengths
        ]
        configs.append(config)
    return configs


def ruler_summary(
    ctx: SuiteContext, results: Mapping[str, Any], samples: Mapping[str, list]
) -> dict[str, Any]:
    out = {}
    for length in ctx.conf["lengths"]:
        scores = columns.ruler_task_scores(results, int(length))
        out[str(length)] = {"tasks": scores, **columns.ruler_columns(scores)}
    return out


SUITES.register("ruler")(Suite(ruler_tasks, ruler_summary, limit=lambda ctx: None))


# ---- LongBench --------------------------------------------------------------------------------------


def _local_file(
    data_dir: Path, stem: str, suffixes: tuple[str, ...] = (".parquet", ".jsonl", ".json")
) -> Path | None:
    for suffix in suffixes:
        if (data_dir / f"{stem}{suffix}").is_file():
            return data_dir / f"{stem}{suffix}"
    return None


def longbench_tasks(ctx: SuiteContext) -> list[dict[str, Any]]:
    wanted = wanted_tasks(ctx, "longbench", columns.LONGBENCH_TASKS)
    data_dir = ctx.conf.get("data_dir")
    configs = []
    for task in wanted:
        config = builtin_task(f"longbench/{task}.yaml")
        if data_dir:
            local = _local_file(Path(data_dir).expanduser(), task)
            if local is None:
                raise EvaluationDataError(
                    f"evaluation.longbench.data_dir={data_dir}: no {task}.parquet / .jsonl / .json (the "
                    "Xnhyacinth/LongBench schema: context, question, answers, ...)"
                )
            point_at_files(config, {"test": local})
        else:
            require_hub_dataset(
                config["dataset_path"],
                config.get("dataset_name"),
                "longbench",
                "evaluation.longbench.data_dir",
            )
        configs.append(config)
    return configs


def longbench_summary(
    ctx: SuiteContext, results: Mapping[str, Any], samples: Mapping[str, list]
) -> dict[str, Any]:
    scores = {}
    for task in columns.LONGBENCH_TASKS:
        value = _score(results, f"longbench_{task}", "score")
        if value is not None:
            scores[task] = 100.0 * value  # percent, as the paper's tables
    return {"tasks": scores, "table2": columns.longbench_columns(scores)}


SUITES.register("longbench")(Suite(longbench_tasks, longbench_summary))


# ---- short ------------------------------------------------------------------------------------------

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
        local = _local_file(directory, split, (".jsonl", ".parquet"))
        if local is not None:
            files[split] = local
        elif split == evaluated:
            raise EvaluationDataError(
                f"{key}: no {directory / split}.jsonl (or .parquet) for task {config['task']}"
            )
        else:
            config[split_key] = None
    return point_at_files(config, files)


def mmlu_local_tasks(directory: Path) -> list[dict[str, Any]]:
    """One lm-eval MMLU subject task per `<directory>/mmlu/<subject>/` present (test.jsonl, dev.jsonl)."""
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


def short_tasks(ctx: SuiteContext) -> list[str | dict[str, Any]]:
    wanted = wanted_tasks(ctx, "short", sorted(SHORT_DATASETS))
    if "humaneval" in wanted and not ctx.conf.get("allow_code_eval", False):
        raise EvaluationDataError(
            "evaluation.short.tasks includes humaneval, which executes model-written code: set "
            "evaluation.short.allow_code_eval=true to allow it (sets HF_ALLOW_CODE_EVAL=1 and confirms "
            "lm-eval's unsafe-code run), or drop humaneval"
        )
    data_dir = ctx.conf.get("data_dir")
    if not data_dir:
        for task in wanted:
            path, name = SHORT_DATASETS[task]
            require_hub_dataset(path, name, "short", "evaluation.short.data_dir")
        return wanted  # lm-eval's registered tasks (the mmlu group aggregates its 57 subjects)
    directory = Path(data_dir).expanduser()
    tasks: list[str | dict[str, Any]] = []
    for task in wanted:
        if task == "mmlu":
            tasks += mmlu_local_tasks(directory)
        else:
            tasks.append(
                repoint_splits(builtin_task(SHORT_YAMLS[task]), directory / task, "evaluation.short.data_dir")
            )
    return tasks


def mmlu_from_subjects(results: Mapping[str, Any], samples: Mapping[str, list]) -> float | None:
    """MMLU accuracy over local subject tasks, weighted by their sizes (as lm-eval's mmlu group)."""
    parts = [
        (_score(results, task, "acc"), len(samples.get(task, [])))
        for task in results
        if task.startswith("mmlu_")
    ]
    parts = [(acc, n) for acc, n in parts if acc is not None and n]
    total = sum(n for _, n in parts)
    return sum(acc * n for acc, n in parts) / total if total else None


def short_summary(
    ctx: SuiteContext, results: Mapping[str, Any], samples: Mapping[str, list]
) -> dict[str, Any]:
    scores = {}
    for task, metric in SHORT_METRICS.items():
        value = _score(results, task, metric)
        if value is None and task == "mmlu":
            value = mmlu_from_subjects(results, samples)
        if value is not None:
            scores[task] = 100.0 * value
    return {"tasks": scores, "table3": columns.short_columns(scores)}


SUITES.register("short")(Suite(short_tasks, short_summary))


@functools.cache
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()
