"""Concurrent runs on one artifacts directory (issue 21): runs started together compute each shared stage
once, a joblib sweep shares prepare and score, and kill -9 of the run computing a stage hands it to a
waiting run, which resumes from the finished parts and writes what an uninterrupted run writes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, RUN_ENV_KEYS, SMALL_DEMO_SOURCES, compose_cfg, run_cli

import selection.score
from common.artifacts import artifact_for
from common.claim_records import RECORD_FILE, OwnerRecord, read_record
from common.stage import StageContext
from experiments.pipeline import run_pipeline, stage_fingerprints

ARGS = [
    "debug=tiny",
    SMALL_DEMO_SOURCES,
    "data.max_windows_per_domain=10",
    "selection.batch_size=2",
    "stages=[prepare,score,select]",
]
# 5 prepare chunks (5 documents) and 5 score part files (20 windows); these keys change no fingerprint
RESUMABLE = ["data.part_records=1", "selection.flush_every=3"]
CLAIMS = ["pipeline.claim_heartbeat_s=0.5", "pipeline.claim_stale_s=20", "pipeline.wait_timeout_s=240"]
STAGES = ("prepare", "score", "select")


def artifact_bytes(index: dict[str, str]) -> dict[str, bytes]:
    """The data files of the three artifacts (manifests hold times and producers, so they differ)."""
    return {
        "prepare": b"".join(p.read_bytes() for p in sorted(Path(index["prepare"]).glob("windows-*.parquet"))),
        "score": (Path(index["score"]) / "scores.parquet").read_bytes(),
        "select": (Path(index["select"]) / "selection.parquet").read_bytes(),
    }


def manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def index_of(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "artifacts.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, bytes], dict]:
    """An uninterrupted sequential run of the same config, in this process."""
    cfg = compose_cfg(tmp_path_factory.mktemp("reference"), ARGS)
    manifests = run_pipeline(cfg)
    return artifact_bytes(index_of(Path(cfg.paths.output_dir))), manifests["prepare"]["per_domain"]


class Run:
    """One `python run.py` (or the slowed tests/fixtures/slow_run.py) in the background, output to a file."""

    def __init__(self, root: Path, name: str, *extra: str, slow_s: float | None = None) -> None:
        self.run_dir, self.log_path = root / name, root / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if k not in RUN_ENV_KEYS}
        env.update(OMP_NUM_THREADS="1", SLOW_PART_S=str(slow_s or 0))
        script = "tests/fixtures/slow_run.py" if slow_s else "run.py"
        args = [*ARGS, *RESUMABLE, *CLAIMS, f"paths.root_dir={root}", f"hydra.run.dir={self.run_dir}", *extra]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, script, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 300) -> None:
        assert self.proc.wait(timeout=timeout) == 0, self.log()[-4000:]


def wait_for(condition: Callable[[], bool], what: str, runs: list[Run], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(r.proc.poll() not in (None, 0) for r in runs):
            pytest.fail(f"gave up waiting for {what}:\n" + "\n---\n".join(r.log()[-2500:] for r in runs))
        time.sleep(0.2)


def only_dir(root: Path, stage: str) -> Path | None:
    dirs = list((root / "artifacts" / stage).glob("*")) if (root / "artifacts" / stage).is_dir() else []
    assert len(dirs) <= 1, dirs
    return dirs[0] if dirs else None


def holder_pid(directory: Path | None) -> int | None:
    record = read_record(directory / RECORD_FILE) if directory else None
    return record.pid if record else None


@pytest.mark.slow
def test_two_runs_started_together_compute_each_shared_stage_once(tmp_path, reference):
    runs = [Run(tmp_path, "run-a", slow_s=0.5), Run(tmp_path, "run-b", slow_s=0.5)]
    for run in runs:
        run.finish()
    index = index_of(runs[0].run_dir)
    assert index_of(runs[1].run_dir) == index
    for stage in STAGES:
        producer = manifest(index[stage])["produced_by"]
        [maker] = [r for r in runs if producer["run_dir"] == str(r.run_dir)]
        [waiter] = [r for r in runs if r is not maker]
        assert producer["pid"] == maker.pid and f"{stage}: running into" in maker.log()
        assert f"{stage}: running into" not in waiter.log()
        assert re.search(
            rf"{stage}: reused artifact {index[stage]}.*produced by host \S+ pid {maker.pid}", waiter.log()
        )
    waited = [
        (stage, r) for stage in STAGES for r in runs if f"{stage} {index[stage]}: claimed by host" in r.log()
    ]
    assert waited  # started together: one of them waited for the other's claim, then reused its artifact
    for stage, run in waited:
        assert manifest(index[stage])["produced_by"]["pid"] != run.pid
    assert artifact_bytes(index) == reference[0]


@pytest.mark.slow
def test_a_parallel_joblib_sweep_computes_prepare_and_score_once(tmp_path, reference):
    run_cli(
        "-m",
        *ARGS,
        *CLAIMS,
        "selection.alpha=0.25,0.5,1.0",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=3",
    )
    members = [tmp_path / "sweep" / str(i) for i in range(3)]
    indexes = [index_of(m) for m in members]
    logs = [(m / "run.log").read_text() for m in members]
    for stage in ("prepare", "score"):
        assert len({i[stage] for i in indexes}) == 1 and only_dir(tmp_path, stage) is not None
        assert sum(f"{stage}: running into" in log for log in logs) == 1
        assert sum(f"{stage}: reused artifact" in log for log in logs) == 2
    assert (
        len({i["select"] for i in indexes}) == 3 == len(list((tmp_path / "artifacts" / "select").glob("*")))
    )
    assert artifact_bytes(indexes[1]) == reference[0]  # the alpha=0.5 member is the reference config


@pytest.mark.slow
def test_killed_holders_are_taken_over_and_resumed_to_the_same_artifacts(tmp_path, reference):
    """Three runs start together. kill -9 of whichever computes prepare once it has finished a chunk;
    a waiting run takes prepare over and resumes; kill -9 of whichever computes score once it has written a
    part file; the last run takes score over, resumes, and finishes."""
    runs = [Run(tmp_path, f"run-{c}", slow_s=1.5) for c in "abc"]

    def waiting(stage: str, directory: Path, others: list[Run]) -> bool:
        return all(f"{stage} {directory}: claimed by" in r.log() for r in others)

    def prepare_ready() -> bool:
        prep = only_dir(tmp_path, "prepare")
        if prep and (prep / "manifest.json").exists():
            pytest.fail("prepare finished before the other runs waited for it (raise slow_s)")
        done = len(list((prep / "parts").glob("*.json"))) if prep else 0
        holder = holder_pid(prep)
        return done >= 1 and waiting("prepare", prep, [r for r in runs if r.pid != holder])

    wait_for(prepare_ready, "a finished prepare chunk while the other runs wait", runs)
    prep = only_dir(tmp_path, "prepare")
    [first] = [r for r in runs if r.pid == holder_pid(prep)]
    first.kill()
    chunks_done = len(list((prep / "parts").glob("*.json")))
    assert not (prep / "manifest.json").exists() and 1 <= chunks_done < 5
    runs.remove(first)

    def score_ready() -> bool:
        score = only_dir(tmp_path, "score")
        if score and (score / "manifest.json").exists():
            pytest.fail("score finished before the last run waited for it (raise slow_s)")
        holder = holder_pid(score)
        parts = list((score / "parts").glob("rank-*.parquet")) if score else []
        return (
            holder is not None
            and len(parts) >= 1
            and waiting("score", score, [r for r in runs if r.pid != holder])
        )

    wait_for(score_ready, "a score part file while the last run waits", runs)
    score = only_dir(tmp_path, "score")
    [second] = [r for r in runs if r.pid == holder_pid(score)]
    second.kill()
    [last] = [r for r in runs if r is not second]
    last.finish()

    took = r"took over the claim of host \S+ pid {}.*resuming from its finished parts"
    [taker] = [r for r in (second, last) if re.search(took.format(first.pid), r.log())]  # of prepare
    resumed = re.search(r"prepare: resumed; (\d+) of 5 chunks were already finished", taker.log())
    assert resumed and int(resumed.group(1)) >= chunks_done
    assert re.search(took.format(second.pid), last.log()), last.log()[-3000:]
    already = re.search(r"score: rank 0/1 has (\d+) windows to score \((\d+) already done\)", last.log())
    assert already and int(already.group(2)) >= 4 and int(already.group(1)) + int(already.group(2)) == 20
    index = index_of(last.run_dir)
    ids = [
        i
        for p in sorted(Path(index["score"], "parts").glob("*.parquet"))
        for i in pq.read_table(p)["id"].to_pylist()
    ]
    assert len(ids) == len(set(ids)) == 20  # every window scored once, by one run or another
    assert manifest(index["prepare"])["per_domain"] == reference[1]  # documents counted once each
    assert artifact_bytes(index) == reference[0]


def test_score_taken_over_from_a_dead_two_rank_launch_by_a_single_process(
    make_cfg, tmp_path, monkeypatch, caplog, reference
):
    """A 2-rank launch died after its rank 1 had scored its half (parts and a .done marker of its launch);
    a single-process run takes the claim over, scores only the other half, ignores the dead launch's marker,
    and merges the same scores as an uninterrupted run."""
    cfg = make_cfg(*ARGS, "stages=[prepare,score]", root=tmp_path / "taken")
    run_pipeline(make_cfg(*ARGS, "stages=[prepare]", root=tmp_path / "taken"))
    fps = stage_fingerprints(cfg, ["score"])
    arts = Path(cfg.paths.artifacts_dir)
    prep, out = artifact_for(arts, "prepare", fps["prepare"]), artifact_for(arts, "score", fps["score"])
    out.path.mkdir(parents=True)
    with monkeypatch.context() as env:  # rank 1 of the dead launch
        env.setenv("WORLD_SIZE", "2")
        env.setenv("RANK", "1")
        env.setenv("MASTER_PORT", "29513")
        ctx = StageContext(out_dir=out.path, inputs={"prepare": prep}, cache_dir=Path(cfg.paths.cache_dir))
        assert selection.score.run(cfg, ctx) is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = OwnerRecord(claimant="launch 29513 of /runs/dead", run_dir="/runs/dead", pid=dead.pid)
    (out.path / RECORD_FILE).write_text(json.dumps(asdict(record)))
    with caplog.at_level(logging.INFO):
        taken = run_pipeline(cfg)["score"]
    assert f"took over the claim of host {record.host} pid {dead.pid}" in caplog.text
    assert taken["world_size"] == 1 and taken["scored_this_run_rank0"] == 10  # rank 1's half was kept
    assert taken["produced_by"]["pid"] == os.getpid() and not list((out.path / "parts").glob("*.done"))
    assert (out.path / "scores.parquet").read_bytes() == reference[0]["score"]
