"""Report: labels, paper tables against hand-written Markdown, and every experiment config end to end
in one tiny sweep (cache reuse across members, the sweep report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from experiments.paper_tables import (
    RunResult,
    base_model_label,
    load_published,
    markdown,
    method_label,
    run_tables,
    table_rows,
    tokens_label,
)

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


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
    runs = [
        RunResult("LongAttn-8", "LongAttn-8", "5B", {"table1": ours}),
        RunResult("LADM", "LADM", "5B", {"table1": {"S1": 50.0}}),
    ]
    expected = """| tokens | method | source | S1 | S2 | S3 | MK1 | MK2 | MK3 | MV | MQ | Avg |
|---|---|---|---|---|---|---|---|---|---|---|---|
| 5B | LongAttn-8 | ours | 100.0 | 99.0 | 80.0 | 90.0 | 60.0 | 40.0 | 85.0 | 95.0 | 81.1 |
| 5B | LongAttn-8 | paper | 100.0 | 99.8 | 81.6 | 92.4 | 62.6 | 37.2 | 87.6 | 97.3 | 82.3 |
| 5B | LongAttn-8 | ours - paper | +0.0 | -0.8 | -1.6 | -2.4 | -2.6 | +2.8 | -2.6 | -2.3 | -1.2 |
| 5B | LADM | ours | 50.0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |
| 5B | LADM | paper | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |
| 5B | LADM | ours - paper | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |
"""
    assert markdown(table_rows("table1", runs, published)) == expected
    # Table 4 is LongAttn's ablation table: other methods are left out
    assert (
        len(table_rows("table4", [RunResult("R", "Random", "5B", {"table4": {"Avg": 1.0}})], published)) == 1
    )


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


@pytest.mark.slow
def test_every_experiment_runs_end_to_end_in_one_tiny_sweep(tmp_path):
    """`-m experiment=glob(*)` with debug=tiny: every config composes and runs prepare..report; members
    that share a scorer reuse one score artifact; a sweep report collects them all."""
    sweep = tmp_path / "sweep"
    done = run_cli(
        "-m",
        "experiment=glob(*)",
        "debug=tiny",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        timeout=1500,
    )
    members = sorted(p.parent for p in sweep.glob("*/artifacts.json"))
    assert len(members) == len(EXPERIMENTS)
    unscored = members[EXPERIMENTS.index("released_data_32k")]  # selection=all: no score stage
    for member in members:
        index = json.loads((member / "artifacts.json").read_text())
        stages = {"prepare", "score", "select", "train", "evaluate", "report"} - (
            {"score"} if member == unscored else set()
        )
        assert set(index) == stages, member
        assert (Path(index["report"]) / "report.md").is_file()
    # scoring runs once per distinct scorer config, not once per experiment
    scores = {json.loads((m / "artifacts.json").read_text()).get("score") for m in members} - {None}
    selects = {json.loads((m / "artifacts.json").read_text())["select"] for m in members}
    assert (
        len(scores) == 5
    )  # demo LongAttn, LongAttn (theta 2.5e6: 8B/70B/ablations on tiny), Random, ProLong, LADM
    assert len(selects) == 8  # alpha=1 and w/o DU_T select differently from the same scores; select-all
    assert "score: reused artifact" in done.stdout + done.stderr
    # the demo's report: its own numbers, n/a for the paper's columns
    demo = members[EXPERIMENTS.index("demo")]
    demo_report = (
        Path(json.loads((demo / "artifacts.json").read_text())["report"]) / "report.md"
    ).read_text()
    assert "| ours |" in demo_report and "| paper | n/a" in demo_report
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
    for label in ("Random", "ProLong", "LADM", "w/o DU_T", "alpha=1"):
        assert label in text
    assert (Path(index["report"]) / "table1.csv").read_text().count("\n") == 1 + 3 * len(EXPERIMENTS)
