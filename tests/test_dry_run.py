"""The dry run (pipeline.dry_run=true) on a half-finished artifacts directory: complete, claimed, partial
and to-run stages with the size of their work, per sweep member, and nothing written."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import SMALL_DEMO_SOURCES, run_cli

from common.artifacts import artifact_for
from common.claim_records import RECORD_FILE, ClaimSettings, OwnerRecord, Staleness
from common.claims import Claim
from experiments.dry_run import plan_stages
from experiments.pipeline import run_pipeline, stage_fingerprints
from selection.scorers.longattn import LongAttnScorer

ARGS = [
    "debug=tiny",
    SMALL_DEMO_SOURCES,
    "data.max_windows_per_domain=10",
    "selection.flush_every=3",
    "selection.batch_size=2",
]
STAGES = "stages=[prepare,score,select,train,evaluate_base]"


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path (files with size and mtime) but the live holder's owner record, which its heartbeat
    rewrites (and so the mtime of the directory holding it)."""
    paths = (p for p in sorted(root.rglob("*")) if not p.name.startswith(RECORD_FILE))
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in paths}


def states(text: str) -> list[tuple[str, str, str]]:
    """(stage, state, detail) of each line of one member's report."""
    found = re.findall(r"^  (\w+) +[0-9a-f]{16}  ([a-z ]+?)(?:: (.*))?$", text, flags=re.M)
    return [(stage, state, detail) for stage, state, detail in found]


@pytest.fixture
def half_finished(make_cfg, monkeypatch):
    """prepare complete; score killed after 2 of its 5 part files (8 of 20 windows); nothing else."""
    original = LongAttnScorer.score_batch
    calls = {"n": 0}

    def dying(self, windows, ids=()):
        calls["n"] += 1
        if calls["n"] > 5:  # 5 batches of 2 windows; flushed at 4 and 8
            raise KeyboardInterrupt("killed")
        return original(self, windows, ids)

    monkeypatch.setattr(LongAttnScorer, "score_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(make_cfg(*ARGS, "stages=[prepare,score]"))
    monkeypatch.setattr(LongAttnScorer, "score_batch", original)
    cfg = make_cfg(*ARGS, STAGES)
    fps = stage_fingerprints(cfg, ["score"])
    return cfg, artifact_for(Path(cfg.paths.artifacts_dir), "score", fps["score"]).path


def test_dry_run_states_of_a_half_finished_directory(half_finished, make_cfg, tmp_path):
    cfg, score_dir = half_finished
    plans = {p.stage: p for p in plan_stages(cfg)}
    assert [plans[s].state for s in ("prepare", "score", "select", "train", "evaluate_base")] == [
        "complete",
        "partial",
        "to run",
        "to run",
        "to run",
    ]
    assert plans["prepare"].detail.startswith("reusable as it is; produced by host")
    assert plans["score"].detail.startswith("8 of 20 windows scored (longattn, scorer tiny_llama)")
    assert plans["select"].detail.startswith("20 windows")
    assert plans["train"].detail.startswith("4 steps")  # 8,192 tokens at 2,048 per step
    assert plans["evaluate_base"].detail.startswith("2 suites; niah, ruler")
    empty = {
        p.stage: p for p in plan_stages(make_cfg(*ARGS, "stages=[select,train]", root=tmp_path / "empty"))
    }
    assert empty["select"].state == empty["train"].state == "blocked"
    assert (
        empty["select"].detail == "needs the prepare, score artifact, which is neither complete nor requested"
    )
    dead = subprocess.Popen(["true"])
    dead.wait()  # a run of this host that has exited, leaving its claim
    record = OwnerRecord(claimant="dead-run", run_dir="/runs/dead", pid=dead.pid)
    (score_dir / RECORD_FILE).write_text(json.dumps(asdict(record)))
    score = {p.stage: p for p in plan_stages(cfg)}["score"]
    assert score.state == "partial" and f"claim left by host {record.host} pid {dead.pid}" in score.detail
    assert score.detail.endswith("gone: its process has exited, so the next run takes it over")


@pytest.mark.slow
def test_dry_run_of_a_sweep_names_holders_and_sharers_and_writes_nothing(half_finished, tmp_path):
    cfg, score_dir = half_finished
    (score_dir / RECORD_FILE).unlink(missing_ok=True)
    holder = Claim(score_dir, "live-run", "/runs/live", ClaimSettings(heartbeat_s=0.5, stale_s=30))
    assert holder.try_acquire(Staleness()) is None  # a live run computes score now
    before = snapshot(tmp_path / "artifacts")
    try:
        out = run_cli(
            "-m",
            *ARGS,
            STAGES,
            "selection.alpha=0.5,1.0",
            "pipeline.dry_run=true",
            f"paths.root_dir={tmp_path}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ).stdout
    finally:
        holder.release()
    assert snapshot(tmp_path / "artifacts") == before
    assert not list((tmp_path / "sweep").rglob("artifacts.json"))
    blocks = re.split(r"^dry run of member #\d: nothing is run or written.*$", out, flags=re.M)[1:]
    assert len(blocks) == 2
    first, second = (states(b) for b in blocks)
    assert [s[:2] for s in first] == [s[:2] for s in second]
    assert [s[1] for s in first] == ["complete", "claimed", "to run", "to run", "to run"]
    claimed = first[1][2]
    assert re.match(rf"claimed by host \S+ pid {os.getpid()}, run dir /runs/live, since ", claimed)
    assert "last heartbeat" in claimed and claimed.endswith(
        "8 of 20 windows scored (longattn, scorer tiny_llama)"
    )
    assert first[4][2] == "2 suites; niah, ruler"  # evaluate_base: shared by both members
    assert (
        second[4][2]
        == "2 suites; niah, ruler; computed by member #0 of this sweep, this member would wait and reuse it"
    )
    assert "computed by" not in second[2][2]  # select differs per alpha
