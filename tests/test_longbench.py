"""LongBench as the official repository runs it: its prompts and generation budgets (kept as data), built
into lm-eval tasks on local fixtures, and eval.py's post-processing and metrics, per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation import columns, longbench
from evaluation.tasks import SUITES, SuiteContext, task_manager

# One sample per task whose official prompt differs from lm-eval's, in the official schema ("input").
FIXTURES = {
    "triviaqa": {
        "context": "Question: Who wrote Hamlet?\nAnswer: Shakespeare",
        "input": "Passage: Paris is the capital of France.\nQuestion: What is the capital of France?\nAnswer:",
        "answers": ["Paris"],
        "all_classes": None,
    },
    "samsum": {
        "context": "Dialogue: A: hi B: hello\nSummary: They greet.",
        "input": "Dialogue: Ann: lunch? Bob: yes at noon\nSummary:",
        "answers": ["Ann and Bob will have lunch at noon."],
        "all_classes": None,
    },
    "lcc": {
        "context": "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
        "input": "",
        "answers": ["    return a - b"],
        "all_classes": None,
    },
    "repobench-p": {
        "context": "# repo/util.py\ndef twice(x):\n    return 2 * x\n",
        "input": "# main.py\nfrom util import twice\nvalue = ",
        "answers": ["twice(21)"],
        "all_classes": None,
    },
    "passage_count": {
        "context": "Paragraph 1: Cats purr.\n\nParagraph 2: Dogs bark.\n\nParagraph 3: Cats purr.",
        "input": "",
        "answers": ["2"],
        "all_classes": None,
    },
    "passage_retrieval_en": {
        "context": "Paragraph 1: The Nile is long.\n\nParagraph 2: Mount Everest is high.",
        "input": "The highest mountain on Earth.",
        "answers": ["Paragraph 2"],
        "all_classes": None,
    },
}
# the official prompt of each fixture, written out by hand from dataset2prompt.json
EXPECTED_PROMPTS = {
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any "
    "other words. The following are some examples.\n\nQuestion: Who wrote Hamlet?\nAnswer: Shakespeare\n\n"
    "Passage: Paris is the capital of France.\nQuestion: What is the capital of France?\nAnswer:",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
    "Dialogue: A: hi B: hello\nSummary: They greet.\n\nDialogue: Ann: lunch? Bob: yes at noon\nSummary:",
    "lcc": "Please complete the code given below. \ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
    "Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n# repo/util.py\ndef twice(x):\n    return 2 * x\n"
    "# main.py\nfrom util import twice\nvalue = Next line of code:\n",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
    "Please carefully read these paragraphs and determine how many unique paragraphs there are after removing "
    "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
    "Paragraph 1: Cats purr.\n\nParagraph 2: Dogs bark.\n\nParagraph 3: Cats purr.\n\n"
    "Please enter the final count of unique paragraphs after removing duplicates. The output format should "
    "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
    "which paragraph the abstract is from.\n\nParagraph 1: The Nile is long.\n\nParagraph 2: Mount Everest is "
    "high.\n\nThe following is an abstract.\n\nThe highest mountain on Earth.\n\nPlease enter the number of "
    'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
    "etc.\n\nThe answer is: ",
}
EXPECTED_MAX_GEN = {
    "triviaqa": 32,
    "samsum": 128,
    "lcc": 64,
    "repobench-p": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
}


def test_official_data_covers_every_task_with_its_budget():
    prompts, budgets = longbench.official("dataset2prompt"), longbench.official("dataset2maxlen")
    assert set(prompts) == set(budgets) == set(columns.LONGBENCH_TASKS) == set(longbench.METRICS)
    assert {t: budgets[t] for t in EXPECTED_MAX_GEN} == EXPECTED_MAX_GEN
    assert budgets["gov_report"] == 512 and budgets["hotpotqa"] == 32
    readme = (longbench.OFFICIAL_DIR / "README.md").read_text()
    assert "THUDM/LongBench" in readme and "2e00731f8d0bff23dc4325161044d0ed8af94c1e" in readme


def test_lm_eval_builds_the_official_prompts_from_local_files(tmp_path):
    """Our task configs through lm-eval's own task machinery: the prompt it would send is the official
    one (lm-eval's YAMLs differ for these six), the budget the official max_gen, no stop at newline."""
    from lm_eval.tasks import get_task_dict

    for task, row in FIXTURES.items():
        (tmp_path / f"{task}.jsonl").write_text(json.dumps(row) + "\n")
    ctx = SuiteContext({"tasks": list(FIXTURES), "data_dir": str(tmp_path)}, None, "m", tmp_path, 0)
    configs = SUITES.get("longbench").tasks(ctx)
    tasks = get_task_dict(configs, task_manager())
    for task, expected in EXPECTED_PROMPTS.items():
        lm_task = tasks[f"longbench_{task}"]
        lm_task.build_all_requests(limit=None, rank=0, world_size=1)
        [instance] = lm_task.instances
        context, gen_kwargs = instance.args
        assert context == expected, task
        assert gen_kwargs["max_gen_toks"] == EXPECTED_MAX_GEN[task] and gen_kwargs["until"] == []


def test_lm_eval_hub_schema_names_the_question_field_question():
    doc = {"context": "C", "question": "Q?", "answers": ["a"]}
    assert longbench.official_prompt("triviaqa", doc).endswith("C\n\nQ?")


@pytest.mark.parametrize(
    ("task", "generation", "score"),
    [
        # few-shot: eval.py strips leading newlines, then keeps the first line (lm-eval stopped at the first
        # "\n", so this answer scored 0 there)
        ("triviaqa", "\nParis\nQuestion: What is the capital of Spain?", 1.0),
        ("triviaqa", "Paris is the answer", 0.5),  # QA-F1 over [paris, is, answer]: P 1/3, R 1
        ("samsum", "\n\nAnn and Bob will have lunch at noon.\nDialogue: x", 1.0),
        # code: the first line (after leading newlines) without `, # or //, blank lines included
        ("lcc", "\n    return a - b\n# done", 1.0),
        ("lcc", "# a comment\n    return a - b", 1.0),
        (
            "lcc",
            "\t\n    return a - b",
            0.0,
        ),  # a blank-looking first line is the prediction (lm-eval skips it)
        ("repobench-p", "twice(21)", 1.0),
        ("passage_count", " 2", 1.0),
        ("passage_count", "2 or 3", 0.5),
        ("passage_retrieval_en", "Paragraph 2", 1.0),
        ("passage_retrieval_en", "Paragraph 1", 0.0),
    ],
)
def test_official_post_processing_and_metrics(task, generation, score):
    out = longbench.official_score(task, FIXTURES[task], [generation])
    assert out["score"] == pytest.approx(score) and out[longbench.METRICS[task]] == out["score"]


def test_few_shot_cut_and_classification_use_all_classes():
    assert longbench.official_prediction("trec", "\n\nLocation\nType: x") == "Location"
    assert longbench.official_prediction("hotpotqa", "\nParis\nmore") == "\nParis\nmore"  # not few-shot
    doc = {"answers": ["Location"], "all_classes": ["Location", "Person", "Number"]}
    assert longbench.official_score("trec", doc, ["\nLocation\n"])["score"] == 1.0
    assert longbench.official_score("trec", doc, ["Person"])["score"] == 0.0


def test_code_similarity_differs_from_lm_eval_copy_only_where_official_takes_a_blank_line():
    from lm_eval.tasks.longbench import metrics

    assert (
        longbench.code_sim_score("\nx = 1\ny", "x = 1")
        == metrics.code_sim_score("\nx = 1\ny", "x = 1")
        == 1.0
    )
    assert (
        longbench.code_sim_score("\t\nx = 1", "x = 1") == 0.0
        and metrics.code_sim_score("\t\nx = 1", "x = 1") == 1.0
    )


def test_a_missing_local_file_names_the_schema(tmp_path):
    from evaluation.tasks import EvaluationDataError

    ctx = SuiteContext({"tasks": ["lcc"], "data_dir": str(tmp_path)}, None, "m", tmp_path, 0)
    with pytest.raises(EvaluationDataError, match=r"no lcc\.parquet / \.jsonl / \.json"):
        SUITES.get("longbench").tasks(ctx)


def test_fixture_prompts_come_from_the_data_file():
    """The hand-written expectations above are what the kept dataset2prompt.json renders."""
    for task, expected in EXPECTED_PROMPTS.items():
        assert longbench.official_prompt(task, FIXTURES[task]) == expected
    assert Path(longbench.OFFICIAL_DIR / "dataset2prompt.json").is_file()
