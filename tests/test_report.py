"""Report: labels, paper tables against hand-written Markdown, and every experiment config end to end
in one tiny sweep (cache reuse across members, the sweep report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from omegaconf import open_dict

from experiments.paper_tables import (
    RunResult,
    base_model_label,
    describe,
    load_notes,
    load_published,
    markdown,
    method_label,
    niah_rows,
    notes_for,
    run_protocol,
    run_tables,
    table_rows,
    tokens_label,
    unpublished_methods,
)

REPO = Path(__file__).resolve().parent.parent
# every experiment that trains; released_longattn_8b evaluates a Hub model (its own test below)
EXPERIMENTS = sorted(
    p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if p.stem != "released_longattn_8b"
)


def test_labels_follow_the_paper():
    scorer8 = {"name_or_path": "meta-llama/Llama-3.1-8B"}
    assert method_label({"method": "longattn", "scorer_model": scorer8, "alpha": 0.5}) == "LongAttn-8"
    assert (
        method_label({"method": "longattn", "scorer_model": {"name_or_path": "meta-llama/Llama-3.1-70B"}})
        == "LongAttn-70"
    )
    assert method_label({"method": "longattn", "scorer_model": scorer8, "alpha": 1.0}) == "LongAttn-8 alpha=1"
    assert (
        method_label({"method": "longattn", "scorer_model": scorer8, "use_uniformity": False})
        == "LongAttn-8 w/o DU_T"
    )
    causal = {"method": "longattn", "scorer_model": scorer8, "scoring": {"causal": True}}
    assert method_label(causal) == "LongAttn-8 causal"
    assert method_label({"method": "random"}) == "Random" and method_label({"method": "prolong"}) == "ProLong"
    # the released LongABC-32K (selection=all) sits beside the paper's LongAttn-70 rows by its label
    assert method_label({"method": "all", "label": "LongAttn-70"}) == "LongAttn-70"
    assert method_label({"method": "all", "label": None}) == "all"
    assert base_model_label("meta-llama/Meta-Llama-3-8B") == "LLaMA-3-Base"
    assert tokens_label(5e9) == "5B" and tokens_label(8192) == "8,192" and tokens_label(None) == "0"


def test_table1_beside_the_published_row_matches_hand_written_markdown():
    published = load_published()
    ours = {
        "S1": 100.0,
        "S2": 99.0,
        "S3": 80.0,
        "MK1": 90.0,
        "MK2": 60.0,
        "MK3": 40.0,
        "MV": 85.0,
        "MQ": 95.0,
    }
    ours["Avg"] = sum(ours.values()) / 8  # 81.125
    at_32k = {"table1": {"length": 32768, "samples": "500", "truncated": 0}}
    runs = [
        RunResult("LongAttn-8", "LongAttn-8", "5B", {"table1": ours}, 32768, at_32k),
        RunResult(
            "LADM",
            "LADM",
            "5B",
            {"table1": {"S1": 50.0}},
            4096,
            {"table1": {"length": 4096, "samples": "2-3", "truncated": 7}},
        ),
        RunResult(
            "Random",
            "Random",
            "5B",
            {"table1": {"S1": 90.0}},
            2048,
            {"table1": {"length": 2048, "samples": "2", "truncated": 0}},
        ),
    ]
    expected = """| tokens | method | source | length | samples/task | truncated | S1 | S2 | S3 | MK1 | MK2 | MK3 | MV | MQ | Avg |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 5B | LongAttn-8 | ours | 32,768 | 500 | 0 | 100.0 | 99.0 | 80.0 | 90.0 | 60.0 | 40.0 | 85.0 | 95.0 | 81.1 |
| 5B | LongAttn-8 | paper | 32,768 | - | - | 100.0 | 99.8 | 81.6 | 92.4 | 62.6 | 37.2 | 87.6 | 97.3 | 82.3 |
| 5B | LongAttn-8 | ours - paper |  |  |  | +0.0 | -0.8 | -1.6 | -2.4 | -2.6 | +2.8 | -2.6 | -2.3 | -1.2 |
| 5B | LADM | ours | 4,096 | 2-3 | 7 | 50.0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |
| 5B | Random | ours | 2,048 | 2 | 0 | 90.0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |
| 5B | Random | paper | 32,768 | - | - | 100.0 | 99.8 | 81.8 | 94.8 | 56.4 | 11.8 | 84.4 | 96.5 | 78.2 |
| 5B | Random | ours - paper (at 2,048, not 32,768 tokens) |  |  |  | -10.0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |
"""
    assert markdown(table_rows("table1", runs, published)) == expected
    # Table 4 is LongAttn's ablation table: other methods are left out
    assert (
        len(table_rows("table4", [RunResult("R", "Random", "5B", {"table4": {"Avg": 1.0}})], published)) == 1
    )


def test_a_run_the_paper_has_no_row_for_gets_the_same_methods_row_as_a_labelled_reference():
    """The demo: LongAttn scored by SmolLM2 at 8,192 training tokens, and its untrained base model. The
    paper's LongAttn-8 row (smallest budget) and LLaMA-3-Base row are shown as references, no difference."""
    published = load_published()
    demo = RunResult(
        "LongAttn (smollm2_135m)",
        "LongAttn (smollm2_135m)",
        "8,192",
        {"table1": {"S1": 50.0}, "table3": {"MMLU": 30.0}},
    )
    base = RunResult(
        "smollm2_135m (untrained)", "smollm2_135m", "0", {"table1": {"S1": 40.0}, "table3": {"MMLU": 25.0}}
    )
    rows = table_rows("table1", [demo, base], published)
    assert [r[:3] for r in rows[1:]] == [
        ["8,192", "LongAttn (smollm2_135m)", "ours"],
        ["1B", "LongAttn-8", "paper (reference, not this run's row)"],
        ["0", "smollm2_135m (untrained)", "ours"],  # Table 1 has no base-model row
    ]
    assert rows[2][3:6] == ["32,768", "-", "-"]
    assert rows[2][6:] == [
        "100.0",
        "100.0",
        "91.4",
        "88.6",
        "16.2",
        "19.2",
        "90.3",
        "93.4",
        "74.9",
    ]  # 1B LongAttn-8
    rows = table_rows("table3", [demo, base], published)
    assert [r[:3] for r in rows[1:]] == [
        ["8,192", "LongAttn (smollm2_135m)", "ours"],
        ["5B", "LongAttn-8", "paper (reference, not this run's row)"],
        ["0", "smollm2_135m (untrained)", "ours"],
        ["0", "LLaMA-3-Base", "paper (reference, not this run's row)"],
    ]
    assert rows[4][6] == "65.9" and rows[4][3] == "-"  # Table 3 has no evaluation length


def test_methods_beyond_the_paper_get_their_rows_and_are_named_unpublished():
    """LongPPL, LongFilter, PPL gain and Compression rows stand beside the paper's methods, with no paper
    row or difference, and the report names them as methods without published numbers."""
    published = load_published()
    labels = [
        method_label({"method": m}) for m in ("longppl", "longfilter", "ppl_gain", "compression", "ladm")
    ]
    assert labels == ["LongPPL", "LongFilter", "PPL gain", "Compression", "LADM"]
    runs = [RunResult(label, label, "5B", {"table1": {"Avg": 70.0}}) for label in labels]
    runs.append(RunResult("Random", "Random", "5B", {"table1": {"Avg": 78.0}}))
    rows = table_rows("table1", runs, published)
    assert [r[:3] for r in rows[1:]] == [
        *[["5B", label, "ours"] for label in labels],
        ["5B", "Random", "ours"],
        ["5B", "Random", "paper"],
        ["5B", "Random", "ours - paper"],
    ]
    assert rows[-1][-1] == "-0.2"  # 78.0 - 78.2
    assert unpublished_methods(runs, published) == sorted(labels)


def test_published_table11_qa_is_the_mean_of_qa1_and_qa2_except_the_flagged_row():
    """Every published QA is mean(QA1, QA2) to rounding but 20B Random's (46.4 vs 53.95): flagged in
    notes.csv, and the report prints the note wherever that row is shown."""
    published = load_published()["table11"]
    off = {key for key, row in published.items() if abs(row["QA"] - (row["QA1"] + row["QA2"]) / 2) > 0.051}
    assert off == {("20B", "Random")}
    notes = load_notes()
    assert {(n["table"], n["tokens"], n["method"], n["column"]) for n in notes} == {
        ("table11", "20B", "Random", "QA")
    }
    shown = table_rows(
        "table11", [RunResult("Random", "Random", "20B", {"table11": {"QA": 50.0}})], load_published()
    )
    [note] = notes_for("table11", shown, notes)
    assert "53.95" in note and "46.4" in note
    other = table_rows(
        "table11", [RunResult("Random", "Random", "5B", {"table11": {"QA": 50.0}})], load_published()
    )
    assert notes_for("table11", other, notes) == []


def test_niah_summary_rows_average_depths_per_length():
    grid = {"512@0": 1.0, "512@100": 0.0, "1024@0": 1.0, "1024@100": 1.0}
    runs = [RunResult("before", "m", "0", {}, niah_grid=grid), RunResult("no niah", "m", "0", {})]
    assert niah_rows(runs) == [["model", "512", "1,024", "mean"], ["before", "50", "100", "75"]]


def test_protocol_and_description_come_from_results_json():
    results = {
        "model": "m",
        "max_length": 4096,
        "truncated_prompts": 3,
        "suites": {
            "niah": {"grid": {"512@0": 1.0, "1024@50": 0.0}, "haystack": "python_docs"},
            "ruler": {"2048": {"table1": {}, "table11": {}, "samples": {"niah_single_1": 2, "ruler_vt": 2}}},
            "longbench": {"table2": {}},
            "short": {
                "table3": {},
                "protocol": {"mmlu": {"metric": "acc", "num_fewshot": 5, "samples": 14042}},
            },
        },
        "protocol": {
            "ruler": {"samples": {"niah_single_1": 2, "ruler_vt": 2}, "truncated_prompts": 0},
            "longbench": {"samples": {"hotpotqa": 200, "lcc": 500}, "truncated_prompts": 3},
            "short": {"samples": {"mmlu_anatomy": 135}, "truncated_prompts": 0},
        },
    }
    protocol = run_protocol(results, 2048)
    assert protocol["table1"] == protocol["table11"] == {"length": 2048, "samples": "2", "truncated": 0}
    assert protocol["table2"] == {"length": 4096, "samples": "200-500", "truncated": 3}
    assert protocol["table3"] == {"length": None, "samples": "14,042", "truncated": 0}
    text = describe(results)
    for part in (
        "model `m`",
        "window 4096",
        "NIAH 2 cells at 512, 1,024 tokens, haystack `python_docs`",
        "RULER 2 task(s) at 2,048 tokens, 2 sample(s) each",
        "LongBench 2 task(s), 200-500",
        "mmlu 5-shot acc (n=14,042)",
        "3 prompt(s) truncated",
    ):
        assert part in text, part


def test_run_tables_read_the_longest_ruler_length():
    results = {
        "suites": {
            "ruler": {
                "4096": {"table1": {"S1": 1.0}, "table11": {"VT": 1.0}},
                "32768": {"table1": {"S1": 2.0, "Avg": None}, "table11": {"VT": 3.0}},
            },
            "short": {"table3": {"MMLU": 60.0}},
        }
    }
    tables, length = run_tables(results)
    assert length == 32768 and tables["table1"]["S1"] == 2.0 and tables["table11"]["VT"] == 3.0
    assert tables["table3"] == {"MMLU": 60.0} and "table2" not in tables


def test_released_model_experiment_composes_the_paper_protocol(make_cfg):
    cfg = make_cfg("experiment=released_longattn_8b")
    assert list(cfg.stages) == ["evaluate", "report"] and cfg.evaluation.model == "Lyun0912/LongAttn"
    assert cfg.evaluation.max_length == 32768 and list(cfg.evaluation.ruler.lengths) == [32768]
    assert cfg.evaluation.ruler.tasks is None and cfg.evaluation.ruler.samples == 500
    assert cfg.evaluation.niah.haystack == "paul_graham" and cfg.evaluation.short.tasks.mmlu.num_fewshot == 5
    assert set(cfg.evaluation.short.tasks) == {"mmlu", "hellaswag", "openbookqa", "humaneval"}
    assert dict(cfg.report.published_as) == {
        "label": "released LongAttn-8B (Lyun0912/LongAttn)",
        "method": "LongAttn-70",
        "tokens": "5B",
    }


@pytest.mark.slow
def test_released_model_is_reported_beside_the_papers_longattn70_5b_rows(make_cfg, tmp_path):
    """Wiring, offline: a local stand-in directory (tiny_llama saved to disk) instead of the Hub model,
    RULER's first NIAH task at 1,024 tokens; the report puts it beside LongAttn-70 5B, labelled."""
    import shutil

    from common.model_sources import resolve_model_path
    from experiments.pipeline import run_pipeline

    stand_in = tmp_path / "LongAttn"
    shutil.copytree(resolve_model_path("tiny_llama"), stand_in)
    cfg = make_cfg(
        "experiment=released_longattn_8b",
        f"evaluation.model={stand_in}",
        "evaluation.max_length=1024",
        "evaluation.suites=[ruler]",
        "evaluation.ruler.tasks=[niah_single_1]",
        "evaluation.ruler.lengths=[1024]",
        "evaluation.ruler.samples=1",
    )
    run_pipeline(cfg)
    index = json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text())
    assert set(index) == {"evaluate", "report"}
    report = (Path(index["report"]) / "report.md").read_text()
    table1 = (Path(index["report"]) / "table1.csv").read_text().splitlines()
    assert table1[1].startswith('5B,released LongAttn-8B (Lyun0912/LongAttn),ours,"1,024",1,0,')
    assert table1[2].startswith(
        '5B,LongAttn-70,paper,"32,768",-,-,100.0,100.0,83.8,92.8,84.8,46.8,78.8,95.2,85.2'
    )
    assert table1[3].startswith('5B,LongAttn-70,"ours - paper (at 1,024, not 32,768 tokens)",,,,')
    assert f"model `{stand_in}`" in report and "Table 11" in report
    # `stages=[report]` alone, into a fresh run directory, rebuilds the report from the evaluate artifact
    shutil.rmtree(index["report"])
    with open_dict(cfg):
        cfg.stages = ["report"]
        cfg.paths.output_dir = str(tmp_path / "report_only")
    run_pipeline(cfg)
    again = json.loads((tmp_path / "report_only" / "artifacts.json").read_text())
    assert again == index
    assert (Path(again["report"]) / "report.md").read_text() == report


@pytest.mark.slow
def test_every_experiment_runs_end_to_end_in_one_tiny_sweep(tmp_path):
    """`-m experiment=glob(*)` with debug=tiny: every config composes and runs prepare..report; members
    that share a scorer reuse one score artifact; a sweep report collects them all."""
    sweep = tmp_path / "sweep"
    done = run_cli(
        "-m",
        "experiment=glob(*,exclude=released_longattn_8b)",  # it needs the Hub
        "debug=tiny",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        timeout=1500,
    )
    members = sorted(
        (p.parent for p in sweep.glob("*/artifacts.json")), key=lambda p: int(p.name)
    )  # job order
    assert len(members) == len(EXPERIMENTS)
    unscored = members[EXPERIMENTS.index("released_data_32k")]  # selection=all: no score stage
    for member in members:
        index = json.loads((member / "artifacts.json").read_text())
        stages = {"prepare", "score", "select", "train", "evaluate", "report"}
        if member == members[EXPERIMENTS.index("demo")]:
            stages.add("evaluate_base")  # the demo's before/after
        if member == unscored:
            stages.remove("score")
        assert set(index) == stages, member
        assert (Path(index["report"]) / "report.md").is_file()
    # scoring runs once per distinct scorer config, not once per experiment
    scores = {json.loads((m / "artifacts.json").read_text()).get("score") for m in members} - {None}
    selects = {json.loads((m / "artifacts.json").read_text())["select"] for m in members}
    # demo LongAttn, LongAttn (theta 2.5e6, authors' sequence: 8B/70B/ablations on tiny), the same causal,
    # Random, ProLong, LADM, LongPPL, LongFilter, PPL gain, Compression
    assert len(scores) == 10
    # alpha=1 and w/o DU_T select differently from the same scores; select-all
    assert len(selects) == 13
    assert "score: reused artifact" in done.stdout + done.stderr
    # the demo's report: the trained and the untrained model, the paper's LongAttn-8 rows as references
    demo = members[EXPERIMENTS.index("demo")]
    demo_report = (
        Path(json.loads((demo / "artifacts.json").read_text())["report"]) / "report.md"
    ).read_text()
    assert "| 8,192 | LongAttn (tiny_llama) | ours | 1,024 |" in demo_report
    assert "| 0 | tiny_llama (untrained) | ours | 1,024 |" in demo_report
    assert "| 1B | LongAttn-8 | paper (reference, not this run's row) | 32,768 |" in demo_report
    # one report over the whole sweep
    run_cli(
        "debug=tiny",
        "stages=[report]",
        f"report.sweep_dir={sweep}",
        f"paths.root_dir={tmp_path}",
        env={"LONGATTN_RUN_DIR": str(tmp_path / "report_run")},
    )
    index = json.loads((tmp_path / "report_run" / "artifacts.json").read_text())
    text = (Path(index["report"]) / "report.md").read_text()
    for label in ("Random", "ProLong", "LADM", "w/o DU_T", "alpha=1", "causal", "LongPPL", "LongFilter"):
        assert label in text
    assert "Not in the LongAttn paper: Compression, LADM, LongFilter, LongPPL, PPL gain." in text
    # at debug=tiny's 8,192 training tokens no run has its own published row: each trained model gets its
    # row and its method's reference row, but the five methods not in the paper (LADM, LongPPL,
    # LongFilter, PPL gain, Compression) and the demo's base model only theirs
    rows = (Path(index["report"]) / "table1.csv").read_text().count("\n")
    assert rows == 1 + 2 * len(EXPERIMENTS) - 5 + 1
