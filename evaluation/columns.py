"""Paper-column summaries of lm-eval results (pure functions; scores in percent).

RULER (Tables 1 and 11): lm-eval's `ruler` group averages only its 4096 column, so per length we average
the task scores ourselves. Table 11's overall average is the mean of all 13 tasks (checked against the
published rows: 5B Random gives 66.4). LongBench (Table 2): category means, and Avg = the mean over the
21 tasks (the published Avg is task-weighted: 5B Random gives 24.46). Short (Table 3): Avg = mean of 4.
"""

from __future__ import annotations

from collections.abc import Mapping

RULER_NIAH = {
    "S1": "niah_single_1",
    "S2": "niah_single_2",
    "S3": "niah_single_3",
    "MK1": "niah_multikey_1",
    "MK2": "niah_multikey_2",
    "MK3": "niah_multikey_3",
    "MV": "niah_multivalue",
    "MQ": "niah_multiquery",
}
RULER_OTHER = {
    "VT": "ruler_vt",
    "CWE": "ruler_cwe",
    "FWE": "ruler_fwe",
    "QA1": "ruler_qa_squad",
    "QA2": "ruler_qa_hotpot",
}
RULER_TASKS = [*RULER_NIAH.values(), *RULER_OTHER.values()]

LONGBENCH_CATEGORIES = {
    "SDQA": ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
    "MDQA": ["hotpotqa", "2wikimqa", "musique", "dureader"],
    "Summ": ["gov_report", "qmsum", "multi_news", "vcsum"],
    "FewShot": ["trec", "triviaqa", "samsum", "lsht"],
    "Synth": ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
    "Code": ["lcc", "repobench-p"],
}
LONGBENCH_TASKS = [t for tasks in LONGBENCH_CATEGORIES.values() for t in tasks]

SHORT_COLUMNS = {"MMLU": "mmlu", "HellaSwag": "hellaswag", "HumanEval": "humaneval", "OBQA": "openbookqa"}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ruler_task_scores(results: Mapping[str, Mapping[str, float]], length: int) -> dict[str, float]:
    """{task: percent} at one length from lm-eval's results (metric key '<length>,none'; -1 = no samples)."""
    out = {}
    for task in RULER_TASKS:
        value = results.get(task, {}).get(f"{length},none")
        if value is not None and value != -1:
            out[task] = 100.0 * float(value)
    return out


def ruler_columns(scores: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
    """Table 1 (the NIAH columns and their mean) and Table 11 (category and overall means)."""
    niah = {col: scores.get(task) for col, task in RULER_NIAH.items()}
    other = {col: scores.get(task) for col, task in RULER_OTHER.items()}
    present = [v for v in niah.values() if v is not None]
    table1 = {**niah, "Avg": _mean(present) if len(present) == len(niah) else None}
    aggr = [other["CWE"], other["FWE"]]
    qa = [other["QA1"], other["QA2"]]
    everything = [scores.get(t) for t in RULER_TASKS]
    table11 = {
        "Retr": table1["Avg"],
        "VT": other["VT"],
        "CWE": other["CWE"],
        "FWE": other["FWE"],
        "Aggr": _mean(aggr) if None not in aggr else None,
        "QA1": other["QA1"],
        "QA2": other["QA2"],
        "QA": _mean(qa) if None not in qa else None,
        "Avg": _mean(everything) if None not in everything else None,
    }
    return {"table1": table1, "table11": table11}


def longbench_columns(scores: Mapping[str, float]) -> dict[str, float | None]:
    """Category means over the tasks present, and Avg over all 21 tasks (None unless all are present)."""
    out: dict[str, float | None] = {}
    for category, tasks in LONGBENCH_CATEGORIES.items():
        out[category] = _mean([scores[t] for t in tasks if t in scores])
    everything = [scores.get(t) for t in LONGBENCH_TASKS]
    out["Avg"] = _mean(everything) if None not in everything else None
    return out


def short_columns(scores: Mapping[str, float]) -> dict[str, float | None]:
    out = {col: scores.get(task) for col, task in SHORT_COLUMNS.items()}
    values = list(out.values())
    out["Avg"] = _mean(values) if None not in values else None
    return out
