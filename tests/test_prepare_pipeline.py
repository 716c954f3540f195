"""The prepare stage through the real pipeline: demo corpus, any JSONL, caching, determinism."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import selection.prepare
from common.corpus import CorpusError, CorpusStats, SourceSpec, iter_documents
from common.errors import MissingInputError
from common.stage import StageNotImplementedError
from experiments.pipeline import run_pipeline
from selection.windows import window_starts

ROOT = Path(__file__).parent.parent
SMALL_DEMO = (
    "data.sources=[{domain: code, format: python_code, options: {packages: [json, tomllib]}},"
    "{domain: docs, format: python_docs, options: {modules: [json, textwrap], reference_topics: false}}]"
)


def read_windows(artifact_dir: Path) -> list[dict]:
    rows = []
    for shard in sorted(Path(artifact_dir).glob("windows-*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return rows


def prepared(cfg) -> tuple[Path, dict]:
    manifests = run_pipeline(cfg)
    index = json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text())
    return Path(index["prepare"]), manifests["prepare"]


@pytest.mark.slow
def test_demo_prepare_end_to_end(make_cfg, smollm2_tokenizer):
    out, manifest = prepared(make_cfg("stages=[prepare]"))
    rows = read_windows(out)
    assert manifest["windows"] == len(rows) == 300
    assert {d: c["windows"] for d, c in manifest["per_domain"].items()} == {"code": 150, "docs": 150}
    assert all(c["windows_found"] > 150 for c in manifest["per_domain"].values())
    assert all(r["n_tokens"] == len(r["input_ids"]) == 1024 for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    # A window is exactly the tokenizer's ids of its document at the start Algorithm 1 gives.
    docs = {
        d["source_id"]: d["text"]
        for d in iter_documents([SourceSpec(domain="code", format="python_code")], "error", CorpusStats())
    }
    row = next(r for r in rows if r["domain"] == "code")
    ids = smollm2_tokenizer(docs[row["source_id"]], add_special_tokens=False).input_ids
    assert row["start"] == window_starts(len(ids), 1024)[row["position"]]
    assert row["input_ids"] == ids[row["start"] : row["start"] + 1024]


def write_jsonl(path: Path, texts: list[str], extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps({"text": t}) for t in texts] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def book_jsonl(tmp_path):
    paragraph = "The quick brown fox jumps over the lazy dog while the night owl watches. "
    texts = [paragraph * n for n in (1, 3, 7, 12, 30)]
    return write_jsonl(tmp_path / "books.jsonl", texts), texts


def jsonl_overrides(path: Path, window: int = 64, *extra: str) -> list[str]:
    return [
        "stages=[prepare]",
        "data=jsonl",
        f"data.sources=[{{path: '{path}', domain: book}}]",
        f"data.window_size={window}",
        "data.num_proc=1",
        *extra,
    ]


def test_any_jsonl_gives_the_windows_algorithm_1_predicts(make_cfg, book_jsonl, smollm2_tokenizer):
    path, texts = book_jsonl
    out, manifest = prepared(make_cfg(*jsonl_overrides(path)))
    lengths = [len(smollm2_tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    expected = sum(len(window_starts(n, 64)) for n in lengths)
    assert manifest["windows"] == len(read_windows(out)) == expected > 0
    book = manifest["per_domain"]["book"]
    assert book["documents"] == 5 and book["document_tokens"] == sum(lengths)
    assert book["short_documents"] == sum(n <= 64 for n in lengths) >= 1


def test_second_run_reuses_and_does_no_work(make_cfg, book_jsonl, monkeypatch, caplog):
    cfg = make_cfg(*jsonl_overrides(book_jsonl[0]))
    first, _ = prepared(cfg)
    monkeypatch.setattr(selection.prepare, "run", lambda *a: pytest.fail("prepare ran again"))
    with caplog.at_level(logging.INFO):
        second, _ = prepared(cfg)
    assert first == second
    assert "reused artifact" in caplog.text


def test_changing_the_window_size_reruns(make_cfg, book_jsonl):
    a, _ = prepared(make_cfg(*jsonl_overrides(book_jsonl[0], 64)))
    b, _ = prepared(make_cfg(*jsonl_overrides(book_jsonl[0], 48)))
    assert a != b and a.parent == b.parent
    assert {len(r["input_ids"]) for r in read_windows(b)} == {48}


def test_speed_keys_do_not_change_the_fingerprint(make_cfg, book_jsonl):
    a, _ = prepared(make_cfg(*jsonl_overrides(book_jsonl[0], 64, "data.num_proc=1")))
    b, _ = prepared(make_cfg(*jsonl_overrides(book_jsonl[0], 64, "data.num_proc=2", "data.shard_rows=3")))
    assert a == b


def test_same_config_same_windows_anywhere(make_cfg, book_jsonl, tmp_path):
    """Two fresh roots, different process counts and shard sizes: identical rows, ids and order."""
    a, _ = prepared(make_cfg(*jsonl_overrides(book_jsonl[0], 32, "data.num_proc=1"), root=tmp_path / "x"))
    b, _ = prepared(
        make_cfg(
            *jsonl_overrides(book_jsonl[0], 32, "data.num_proc=2", "data.shard_rows=4"), root=tmp_path / "y"
        )
    )
    assert len(list(b.glob("windows-*.parquet"))) > 1
    assert read_windows(a) == read_windows(b)


def test_per_domain_cap_is_seeded(make_cfg, book_jsonl):
    def ids(seed):
        out, manifest = prepared(
            make_cfg(*jsonl_overrides(book_jsonl[0], 16, "data.max_windows_per_domain=5", f"seed={seed}"))
        )
        assert manifest["per_domain"]["book"]["windows"] == 5
        return [r["id"] for r in read_windows(out)]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)


def test_bad_records_fail_or_are_counted(make_cfg, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["fine text " * 40], ['{"text": oops}', '{"text": ""}'])
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: malformed JSON"):
        run_pipeline(make_cfg(*jsonl_overrides(path)))
    _, manifest = prepared(make_cfg(*jsonl_overrides(path, 64, "data.on_bad_record=skip")))
    assert manifest["bad_records"] == {"book": 2}
    assert manifest["per_domain"]["book"]["documents"] == 1


def test_bad_source_config_names_the_key(make_cfg, tmp_path):
    with pytest.raises(CorpusError, match=r"data.sources\[0\]: unknown key\(s\) \['pth'\]"):
        run_pipeline(
            make_cfg("stages=[prepare]", "data=jsonl", "data.sources=[{pth: x.jsonl, domain: book}]")
        )
    with pytest.raises(CorpusError, match="matches no file"):
        run_pipeline(make_cfg(*jsonl_overrides(tmp_path / "missing.jsonl")))


def test_unimplemented_stage_fails_by_name_after_finished_work(make_cfg, book_jsonl, monkeypatch):
    """Every stage is implemented now; a stage registered without a runner (a future extension) must
    still fail by name, after the finished stages' artifacts are complete."""
    import dataclasses

    from experiments import stages

    monkeypatch.setitem(stages.STAGES, "report", dataclasses.replace(stages.STAGES["report"], runner=None))
    cfg = make_cfg(*jsonl_overrides(book_jsonl[0]))
    cfg.stages = ["prepare", "report"]
    with pytest.raises(StageNotImplementedError, match="Stage 'report' is not implemented yet"):
        run_pipeline(cfg)
    index = json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text())
    assert (Path(index["prepare"]) / "manifest.json").is_file()


def test_a_stage_without_its_input_artifact_says_what_to_run(make_cfg, book_jsonl):
    cfg = make_cfg(*jsonl_overrides(book_jsonl[0]))
    cfg.stages = ["score"]
    with pytest.raises(MissingInputError, match=r"needs the 'prepare' artifact.*stages=\[prepare,score\]"):
        run_pipeline(cfg)


@pytest.mark.slow
def test_run_py_entrypoint_writes_artifacts_json(tmp_path):
    env_run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "stages=[prepare]",
        "debug=tiny",
        SMALL_DEMO,
        f"paths.root_dir={tmp_path}",
    ]
    import os

    env = {**os.environ, "LONGATTN_RUN_DIR": str(env_run_dir)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((env_run_dir / "artifacts.json").read_text())
    assert Path(index["prepare"]).parent == tmp_path / "artifacts" / "prepare"
    assert "windows of 256 tokens" in proc.stderr + proc.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert "reused artifact" in again.stderr + again.stdout


def multi_file_corpus(root: Path) -> Path:
    """Three JSONL files; file c repeats a document of file a (a duplicate across chunks and files) and
    holds a bad record, so resuming must carry the duplicate filter and the bad-record counts over."""
    root.mkdir()
    sentence = "Resumable preparation keeps finished chunks and redoes only what was lost. "
    texts = {name: [f"{name}{i} " + sentence * (4 + 3 * i) for i in range(5)] for name in "abc"}
    texts["c"][2] = texts["a"][1]
    for name, docs in texts.items():
        write_jsonl(root / f"{name}.jsonl", docs, ['{"text": ""}'] if name == "c" else [])
    return root


def test_prepare_resumes_after_a_crash_with_the_same_artifact(make_cfg, tmp_path, monkeypatch):
    import selection.prepare_parts as parts

    corpus = multi_file_corpus(tmp_path / "corpus")
    overrides = [*jsonl_overrides(corpus, 32, "data.part_records=2", "data.on_bad_record=skip")]
    whole_dir, whole = prepared(make_cfg(*overrides, root=tmp_path / "whole"))

    real_run_chunk, calls = parts._run_chunk, []

    def crash_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise RuntimeError("killed")
        calls.append(args[3].name)
        return real_run_chunk(*args, **kwargs)

    monkeypatch.setattr(parts, "_run_chunk", crash_after_three)
    cfg = make_cfg(*overrides, root=tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="killed"):
        prepared(cfg)
    out_dir = tmp_path / "resumed" / "artifacts" / "prepare" / whole_dir.name
    assert sorted(p.name for p in (out_dir / "parts").glob("*.json")) == [f"{c}.json" for c in calls]
    assert not (out_dir / "manifest.json").exists()

    calls.clear()
    monkeypatch.setattr(
        parts, "_run_chunk", lambda *a, **k: calls.append(a[3].name) or real_run_chunk(*a, **k)
    )
    resumed_dir, resumed = prepared(cfg)
    # 3 files x 3 chunks (5 or 6 records in chunks of 2): the 3 finished chunks are not tokenized again
    assert len(calls) == 9 - 3 and calls[0] == "s000-f00001-c00000"
    shards = sorted(p.name for p in whole_dir.glob("windows-*.parquet"))
    assert shards and shards == sorted(p.name for p in resumed_dir.glob("windows-*.parquet"))
    for name in shards:
        assert (whole_dir / name).read_bytes() == (resumed_dir / name).read_bytes()
    timing = ("seconds", "completed_at", "inputs", "config", "produced_by")  # produced_by: run dir, start
    assert {k: v for k, v in whole.items() if k not in timing} == {
        k: v for k, v in resumed.items() if k not in timing
    }
    assert whole["duplicate_documents"] == {"book": 1} and whole["bad_records"] == {"book": 1}
    assert whole["per_domain"]["book"]["documents"] == 14
    assert not (resumed_dir / "parts").exists()


def test_chunking_does_not_change_the_artifact(make_cfg, tmp_path):
    corpus = multi_file_corpus(tmp_path / "corpus")
    runs = [
        prepared(
            make_cfg(
                *jsonl_overrides(corpus, 32, f"data.part_records={n}", "data.on_bad_record=skip"),
                root=tmp_path / str(n),
            )
        )
        for n in (1, 1000)
    ]
    (a, _), (b, _) = runs
    assert a.name == b.name  # part_records is a speed key: same fingerprint
    assert read_windows(a) == read_windows(b) and len(read_windows(a)) > 10
