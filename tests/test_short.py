"""Short suites (Table 3): shots per task, HumanEval's metric loaded up front (offline from the copy kept
in the repository), and the suite end to end on local files with a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.errors import ConfigError, UserError
from evaluation import short
from evaluation.stage import sample_rows
from evaluation.tasks import SUITES, EvaluationDataError, SuiteContext

HUMANEVAL = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def double(x: int) -> int:\n    """Return twice x."""\n',
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(4) == 8\n",
        "entry_point": "double",
    },
]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def mmlu_rows(n: int) -> list[dict]:
    return [
        {
            "question": f"Which organ pumps blood ({i})?",
            "subject": "anatomy",
            "choices": ["heart", "lung", "skin", "bone"],
            "answer": 0,
        }
        for i in range(n)
    ]


@pytest.fixture
def short_data(tmp_path) -> Path:
    data = tmp_path / "short"
    write(data / "mmlu" / "anatomy" / "test.jsonl", mmlu_rows(4))
    write(data / "mmlu" / "anatomy" / "dev.jsonl", mmlu_rows(5))
    write(
        data / "openbookqa" / "test.jsonl",
        [
            {
                "id": str(i),
                "question_stem": "The sun is",
                "choices": {"text": ["hot", "cold", "blue", "wet"], "label": ["A", "B", "C", "D"]},
                "answerKey": "A",
            }
            for i in range(2)
        ],
    )
    write(
        data / "hellaswag" / "validation.jsonl",
        [
            {
                "ind": i,
                "activity_label": "Cooking",
                "ctx_a": "A man slices bread.",
                "ctx_b": "he",
                "ctx": "A man slices bread. he",
                "endings": ["eats it.", "flies.", "sings.", "melts."],
                "source_id": "x",
                "split": "val",
                "split_type": "indomain",
                "label": "0",
            }
            for i in range(3)
        ],
    )
    write(data / "humaneval" / "test.jsonl", HUMANEVAL)
    return data


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """evaluate copies a loaded metric script into its module cache: a fresh one per test."""
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    return tmp_path / "modules"


def test_shots_are_set_per_task(short_data, tmp_path):
    tasks = {"mmlu": {"num_fewshot": 5}, "openbookqa": {"num_fewshot": None}}
    ctx = SuiteContext({"tasks": tasks, "data_dir": str(short_data)}, None, "m", tmp_path, 0)
    configs = {c["task"]: c for c in SUITES.get("short").tasks(ctx)}
    assert set(configs) == {"mmlu_anatomy", "openbookqa"}
    assert configs["mmlu_anatomy"]["num_fewshot"] == 5 and configs["mmlu_anatomy"]["fewshot_split"] == "dev"
    assert "num_fewshot" not in configs["openbookqa"]  # lm-eval's default for the task (0)
    (short_data / "mmlu" / "anatomy" / "dev.jsonl").unlink()  # nowhere to draw 5 shots from
    with pytest.raises(EvaluationDataError, match=r"evaluation.short.tasks.mmlu.num_fewshot=5.*dev.jsonl"):
        SUITES.get("short").tasks(ctx)
    with pytest.raises(EvaluationDataError, match=r"no .*openbookqa/test.jsonl .*task openbookqa"):
        SUITES.get("short").tasks(
            SuiteContext({"tasks": ["openbookqa"], "data_dir": str(tmp_path)}, None, "m", tmp_path, 0)
        )
    bad = SuiteContext(
        {"tasks": {"openbookqa": {"num_fewshot": -1}}, "data_dir": str(short_data)}, None, "m", tmp_path, 0
    )
    with pytest.raises(ConfigError, match="num_fewshot=-1"):
        SUITES.get("short").tasks(bad)


def test_the_hub_mmlu_is_its_57_subjects_each_with_the_asked_shots(tmp_path):
    configs = short.mmlu_subjects(None)
    assert len(configs) == 57 and all(c["dataset_path"] == "cais/mmlu" for c in configs)
    shot = short._with_shots(configs[0], 5, "k")
    assert shot["num_fewshot"] == 5 and "num_fewshot" not in configs[0]


def test_code_eval_metric_loads_up_front_and_scores_real_code(
    short_data, tmp_path, modules_cache, monkeypatch
):
    """HumanEval: refused without allow_code_eval; with it, HF_ALLOW_CODE_EVAL is set and the metric is
    loaded while the task configs are built (offline: the bundled copy), then scores real programs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    conf = {"tasks": {"humaneval": {"num_fewshot": 0}}, "data_dir": str(short_data)}
    with pytest.raises(EvaluationDataError, match="allow_code_eval=true"):
        SUITES.get("short").tasks(SuiteContext(conf, None, "m", tmp_path, 0))
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
    with pytest.raises(UserError, match=r"code_eval=hub.*run once online.*code_eval=bundled"):
        SUITES.get("short").tasks(SuiteContext({**conf, "allow_code_eval": True}, None, "m", tmp_path, 0))
    assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"  # set before any task was built
    [config] = SUITES.get("short").tasks(
        SuiteContext({**conf, "allow_code_eval": True, "code_eval": "bundled"}, None, "m", tmp_path, 0)
    )
    assert config["task"] == "humaneval" and config["num_fewshot"] == 0
    pass_at_k = config["metric_list"][0]["metric"]
    assert pass_at_k.__name__ == "pass_at_k" and config["metric_list"][0]["k"] == [1]
    [[right], [wrong]] = short.build_predictions(
        [["    return a + b\n"], ["    return a - b\n"]], [HUMANEVAL[0], HUMANEVAL[0]]
    )
    reference = HUMANEVAL[0]["test"] + "check(add)"
    assert pass_at_k(references=[reference], predictions=[[right]], k=[1]) == {"pass@1": 1.0}
    assert pass_at_k(references=[reference], predictions=[[wrong]], k=[1]) == {"pass@1": 0.0}


@pytest.mark.slow
def test_short_suites_end_to_end_with_shots_metrics_and_humaneval(make_cfg, short_data, modules_cache):
    """MMLU 5-shot (one subject), OpenBookQA 0-shot and HumanEval (bundled code_eval) from local files
    through lm-eval's own task YAMLs with a tiny model; results say the shots and metric of each task."""
    from experiments.pipeline import run_pipeline

    cfg = make_cfg(
        "debug=tiny",
        "stages=[evaluate]",
        "evaluation.model=tiny_llama",
        "evaluation.suites=[short]",
        "evaluation.max_length=2048",  # HumanEval generates up to 1,024 tokens
        "+evaluation.short.tasks.humaneval.num_fewshot=0",
        "evaluation.short.allow_code_eval=true",
        "evaluation.short.code_eval=bundled",
        f"evaluation.short.data_dir={short_data}",
    )
    manifest = run_pipeline(cfg)["evaluate"]
    summary = manifest["suites"]["short"]
    assert summary["protocol"] == {
        "mmlu": {"metric": "acc", "num_fewshot": 5, "samples": 4},
        "hellaswag": {"metric": "acc_norm", "num_fewshot": 0, "samples": 3},
        "openbookqa": {"metric": "acc_norm", "num_fewshot": 0, "samples": 2},
        "humaneval": {"metric": "pass@1", "num_fewshot": 0, "samples": 2},
    }
    table3 = summary["table3"]
    assert 0.0 <= table3["MMLU"] <= 100.0 and 0.0 <= table3["OBQA"] <= 100.0
    assert table3["HumanEval"] == 0.0  # a random 2-layer model's code fails the tests
    assert table3["Avg"] == pytest.approx((table3["MMLU"] + table3["HellaSwag"] + table3["OBQA"]) / 4)
    assert manifest["protocol"]["short"]["num_fewshot"]["mmlu_anatomy"] == 5
    out = Path(json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text())["evaluate"])
    [first, *_] = sample_rows(out, "mmlu_anatomy")
    prompt = first["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("Answer:") == 6  # five solved examples from dev.jsonl, then the question
    assert all("pass@1" in row for row in sample_rows(out, "humaneval"))
