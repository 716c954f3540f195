from __future__ import annotations

import sys
import types

from conftest import run_cli

from common.tracking import Tracker, WandbTracker, make_tracker, wandb_mode


def test_none_logger_is_a_noop():
    tracker = make_tracker({"name": "none"})
    assert type(tracker) is Tracker and not tracker.enabled
    tracker.log_metrics({"a": 1})  # does nothing, raises nothing


def test_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"


def test_wandb_failure_never_fails_the_run(monkeypatch):
    fake = types.ModuleType("wandb")

    def boom(**kwargs):
        raise TimeoutError("no network")

    fake.init = boom
    fake.Settings = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = make_tracker({"name": "wandb", "mode": "offline"})
    assert type(tracker) is Tracker


def test_wandb_errors_after_start_disable_tracking():
    class Run:
        config = types.SimpleNamespace(update=lambda *a, **k: None)

        def log(self, *a, **k):
            raise OSError("disk full")

    tracker = WandbTracker(Run())
    tracker.log_metrics({"x": 1})
    assert not tracker.enabled


def test_offline_wandb_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = make_tracker({"name": "wandb", "project": "t"}, run_dir=str(tmp_path), config={"a": 1})
    assert tracker.enabled
    tracker.log_metrics({"prepare/windows": 3})
    tracker.log_table("report/table1", ["method", "S1"], [["LongAttn-8", "100.0"]])
    assert tracker.enabled  # the table was accepted
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


FAKE_WANDB = '''
"""Stand-in for wandb: appends each init's keyword arguments to $FAKE_WANDB_LOG as a JSON line."""
import json, os, types


class Settings(dict):
    def __init__(self, **kw):
        super().__init__(kw)


class Table:
    def __init__(self, columns=None, data=None):
        self.columns, self.data = columns, data


def init(**kw):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        seen = {k: v for k, v in kw.items() if k in ("group", "project", "mode")}
        f.write(json.dumps({**seen, "versions": kw["config"].get("versions")}) + "\\n")
    return types.SimpleNamespace(
        config=types.SimpleNamespace(update=lambda *a, **k: None),
        log=lambda *a, **k: None,
        finish=lambda: None,
        summary={},
        dir=kw.get("dir"),
    )
'''


def test_members_of_a_multirun_log_to_one_wandb_group_named_after_the_sweep(tmp_path):
    """...and the software stack that ran is in the W&B config and in every manifest."""
    import importlib.metadata
    import json

    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    log = tmp_path / "inits.jsonl"
    sweep = tmp_path / "sweep-ablation"
    run_cli(
        "-m",
        "debug=tiny",
        "stages=[prepare]",
        "logger=wandb",
        "logger.mode=offline",
        "data.max_windows_per_domain=2,3",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        env={"PYTHONPATH": str(tmp_path / "fake"), "FAKE_WANDB_LOG": str(log), "WANDB_MODE": "offline"},
    )
    inits = [json.loads(line) for line in log.read_text().splitlines()]
    assert [i["group"] for i in inits] == ["sweep-ablation", "sweep-ablation"]
    assert {i["mode"] for i in inits} == {"offline"}
    installed = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "datasets")}
    manifests = sorted((tmp_path / "artifacts" / "prepare").glob("*/manifest.json"))
    recorded = [i["versions"] for i in inits] + [json.loads(m.read_text())["versions"] for m in manifests]
    assert len(recorded) == 4  # two W&B inits, two prepare artifacts (max_windows 2 and 3)
    for versions in recorded:
        assert {k: versions[k] for k in installed} == installed and versions["python"]
