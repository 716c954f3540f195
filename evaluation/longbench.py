"""LongBench (Table 2) as the official repository runs it, inside lm-eval.

lm-eval's 21 LongBench YAMLs supply the datasets, splits and metric names; from THUDM/LongBench we take,
as data (evaluation/data/longbench_official/, source commit in its README):
- the prompts (`dataset2prompt.json`): lm-eval's differ for triviaqa and samsum ("\\n" instead of "\\n\\n"
  before the question), lcc and repobench-p (no "\\n" after "Next line of code:"), passage_count and
  passage_retrieval_en (no space after the final colon);
- the generation budgets (`dataset2maxlen.json`);
and the official scoring (its eval.py): generation is not stopped at "\\n" (lm-eval stops the few-shot
tasks there, so an answer after a leading newline is lost); instead the few-shot tasks' predictions are
cut as eval.py does (leading newlines stripped, then the first line), predictions are not otherwise
stripped, and a sample scores the best metric value over its answers. The per-pair metrics are
lm-eval's copies of the official ones, except code similarity, whose lm-eval copy skips blank lines
where the official one takes the first line after the leading newlines (`code_sim_score` below).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evaluation import columns
from evaluation.tasks import (
    DATA_DIR,
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

OFFICIAL_DIR = DATA_DIR / "longbench_official"
FEW_SHOT = ("trec", "triviaqa", "samsum", "lsht")  # eval.py: prediction.lstrip('\n').split('\n')[0]
# eval.py's dataset2metric, by the name lm-eval's metrics module gives each function
METRICS = {
    **dict.fromkeys(
        ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"],
        "qa_f1_score",
    ),
    "multifieldqa_zh": "qa_f1_zh_score",
    **dict.fromkeys(["dureader", "vcsum"], "rouge_zh_score"),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], "rouge_score"),
    **dict.fromkeys(["trec", "lsht"], "classification_score"),
    "passage_retrieval_en": "retrieval_score",
    "passage_retrieval_zh": "retrieval_zh_score",
    "passage_count": "count_score",
    **dict.fromkeys(["lcc", "repobench-p"], "code_sim_score"),
}


@functools.cache
def official(name: str) -> dict[str, Any]:
    """`dataset2prompt` or `dataset2maxlen` from the official repository."""
    return json.loads((OFFICIAL_DIR / f"{name}.json").read_text(encoding="utf-8"))


def official_prompt(task: str, doc: Mapping[str, Any]) -> str:
    """The official prompt of `task` for one sample (pred.py: `prompt_format.format(**json_obj)`). The
    official data names the question `input`; lm-eval's Hub mirror (Xnhyacinth/LongBench) `question`."""
    question = doc["input"] if "input" in doc else doc.get("question", "")
    return official("dataset2prompt")[task].format(context=doc["context"], input=question)


def official_prediction(task: str, generation: str) -> str:
    """What eval.py scores: few-shot tasks keep the first line after leading newlines; others all of it."""
    if task in FEW_SHOT:
        return generation.lstrip("\n").split("\n")[0]
    return generation


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Official code similarity: the first line (after leading newlines) that holds no '`', '#' or '//',
    blank lines included, compared by fuzzywuzzy's ratio."""
    from fuzzywuzzy import fuzz

    chosen = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            chosen = line
            break
    return fuzz.ratio(chosen, ground_truth) / 100


def metric_function(task: str):
    if METRICS[task] == "code_sim_score":
        return code_sim_score
    from lm_eval.tasks.longbench import metrics

    return getattr(metrics, METRICS[task])


def official_score(task: str, doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval process_results: eval.py's scorer for one sample, under `score` and the metric's name."""
    prediction = official_prediction(task, results[0])
    metric = metric_function(task)
    classes = doc.get("all_classes")
    value = max((metric(prediction, truth, all_classes=classes) for truth in doc["answers"]), default=0.0)
    return {"score": float(value), METRICS[task]: float(value)}


def official_task(task: str) -> dict[str, Any]:
    """lm-eval's LongBench task with the official prompt, generation budget and scoring."""
    config = builtin_task(f"longbench/{task}.yaml", resolve_functions=False)
    config["doc_to_text"] = functools.partial(official_prompt, task)
    config["process_results"] = functools.partial(official_score, task)
    config["generation_kwargs"] = {
        **config.get("generation_kwargs", {}),
        "max_gen_toks": int(official("dataset2maxlen")[task]),
        "until": [],  # pred.py generates up to max_gen (or EOS); eval.py cuts the few-shot answers
    }
    config["metric_list"] = [
        {"metric": name, "aggregation": "mean", "higher_is_better": True} for name in ("score", METRICS[task])
    ]
    return config


def longbench_tasks(ctx: SuiteContext) -> list[dict[str, Any]]:
    wanted = wanted_tasks(ctx, "longbench", columns.LONGBENCH_TASKS)
    data_dir = ctx.conf.get("data_dir")
    configs = []
    for task in wanted:
        config = official_task(task)
        if data_dir:
            local = local_file(Path(data_dir).expanduser(), task)
            if local is None:
                raise EvaluationDataError(
                    f"evaluation.longbench.data_dir={data_dir}: no {task}.parquet / .jsonl / .json (the "
                    "LongBench schema: context, input or question, answers, all_classes)"
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
    ctx: SuiteContext, results: Mapping[str, Any], samples: Mapping[str, list], configs: Mapping[str, Any]
) -> dict[str, Any]:
    scores = {}
    for task in columns.LONGBENCH_TASKS:
        value = score_of(results, f"longbench_{task}", "score")
        if value is not None:
            scores[task] = 100.0 * value  # percent, as the paper's tables
    return {"tasks": scores, "table2": columns.longbench_columns(scores)}


SUITES.register("longbench")(Suite(longbench_tasks, longbench_summary))
