from __future__ import annotations

import json

import pytest

from common.artifacts import artifact_for, find_artifact, fingerprint, strip_keys
from common.atomic import atomic_write, atomic_write_json


def test_fingerprint_ignores_dict_order_and_speed_keys():
    a = fingerprint(
        "prepare", {"window": 8, "num_proc": 1, "nested": {"x": 1, "num_proc": 4}}, ignored=["num_proc"]
    )
    b = fingerprint(
        "prepare", {"nested": {"num_proc": 16, "x": 1}, "window": 8, "num_proc": 8}, ignored=["num_proc"]
    )
    assert a == b and len(a) == 16


def test_fingerprint_changes_with_config_inputs_and_stage():
    base = fingerprint("score", {"alpha": 0.5}, {"prepare": "aaaa"})
    assert base != fingerprint("score", {"alpha": 1.0}, {"prepare": "aaaa"})
    assert base != fingerprint("score", {"alpha": 0.5}, {"prepare": "bbbb"})
    assert base != fingerprint("select", {"alpha": 0.5}, {"prepare": "aaaa"})


def test_fingerprint_is_a_known_value():
    # Pinned: a change to the hashing scheme would silently orphan every cached artifact.
    assert fingerprint("prepare", {"window_size": 1024}) == "30a97b63e8edce29"


def test_strip_keys_recurses_into_lists():
    assert strip_keys({"a": [{"num_proc": 1, "b": 2}]}, ["num_proc"]) == {"a": [{"b": 2}]}


def test_manifest_marks_completion(tmp_path):
    art = artifact_for(tmp_path, "prepare", "0123")
    art.path.mkdir(parents=True)
    assert not art.is_complete()
    with pytest.raises(FileNotFoundError, match="not a complete artifact"):
        find_artifact(art.path)
    art.write_manifest({"windows": 3})
    assert art.is_complete()
    assert find_artifact(art.path).read_manifest()["windows"] == 3
    assert json.loads(art.manifest_path.read_text())["fingerprint"] == "0123"


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})

    def broken(tmp):
        tmp.write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    """Not mkstemp's 0600: other users of a shared artifacts directory must read the manifests."""
    import os
    import stat

    from common.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
