"""Corpus readers and the bad-input policy."""

from __future__ import annotations

import json

import pytest

from common.corpus import CorpusError, CorpusStats, SourceSpec, expand_source_files, iter_documents
from common.errors import ConfigError


def docs(*specs: SourceSpec, policy: str = "error", stats: CorpusStats | None = None) -> list[dict]:
    return list(iter_documents(list(specs), policy, stats if stats is not None else CorpusStats()))


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.fixture
def messy_jsonl(tmp_path):
    path = tmp_path / "messy.jsonl"
    write_lines(
        path,
        [
            json.dumps({"text": "good one"}).encode(),
            b'{"text": "broken',  # line 2: malformed JSON
            json.dumps({"text": "   "}).encode(),  # line 3: empty text
            b'{"text": "caf\xe9"}',  # line 4: latin-1, not UTF-8
            json.dumps({"body": "no text field"}).encode(),  # line 5: missing field
            json.dumps({"text": 42}).encode(),  # line 6: not text
            json.dumps({"text": "good two"}).encode(),
            json.dumps({"text": "good one"}).encode(),  # line 8: exact duplicate
        ],
    )
    return path


def test_malformed_line_names_file_and_line(messy_jsonl):
    with pytest.raises(CorpusError, match=r"messy\.jsonl:2: malformed JSON.*data\.on_bad_record=skip"):
        docs(SourceSpec(domain="book", path=str(messy_jsonl)))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (3, "empty text"),
        (4, "not valid UTF-8"),
        (5, "no field 'text'"),
        (6, "field 'text' is a int, not text"),
    ],
)
def test_each_bad_record_kind_is_an_error_naming_its_line(tmp_path, messy_jsonl, line, reason):
    raw = messy_jsonl.read_bytes().split(b"\n")
    single = tmp_path / "single.jsonl"
    write_lines(single, [raw[0], raw[line - 1]])
    with pytest.raises(CorpusError, match=rf"single\.jsonl:2: {reason}"):
        docs(SourceSpec(domain="book", path=str(single)))


def test_skip_policy_counts_and_reports(messy_jsonl):
    stats = CorpusStats()
    out = docs(SourceSpec(domain="book", path=str(messy_jsonl)), policy="skip", stats=stats)
    assert [d["text"] for d in out] == ["good one", "good two"]
    manifest = stats.as_manifest()
    assert manifest["bad_records"] == {"book": 5}
    assert manifest["duplicate_documents"] == {"book": 1}
    assert manifest["bad_records_by_reason"] == {
        "malformed JSON": 1,
        "empty text": 1,
        "not valid UTF-8": 1,
        "no field 'text'": 1,
        "field 'text' is a int, not text": 1,
    }
    assert manifest["bad_record_examples"][0].endswith(
        "messy.jsonl:2: malformed JSON (Unterminated string starting at, column 10)"
    )


def test_unknown_policy_is_rejected(messy_jsonl):
    with pytest.raises(ConfigError, match="data.on_bad_record=maybe"):
        docs(SourceSpec(domain="book", path=str(messy_jsonl)), policy="maybe")


def test_path_matching_nothing_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"path=.*nothing-\*\.jsonl: matches no file"):
        docs(SourceSpec(domain="book", path=str(tmp_path / "nothing-*.jsonl")))


def test_source_ids_hash_the_text_and_ignore_paths(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        write_lines(tmp_path / sub / "x.jsonl", [json.dumps({"text": "same words"}).encode()])
    a = docs(SourceSpec(domain="book", path=str(tmp_path / "a" / "x.jsonl")))
    b = docs(SourceSpec(domain="book", path=str(tmp_path / "b" / "x.jsonl")))
    assert a == b == [{"domain": "book", "source_id": "93b287590ee25237", "text": "same words"}]


def test_json_array_parquet_and_saved_dataset_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    records = [{"content": "alpha text"}, {"content": "beta text"}]
    (tmp_path / "arr.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet")
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    for path in ("arr.json", "t.parquet", "saved"):
        out = docs(SourceSpec(domain="arxiv", path=str(tmp_path / path), text_field="content"))
        assert [d["text"] for d in out] == ["alpha text", "beta text"], path


def test_missing_column_in_parquet_names_the_key(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "t.parquet")
    with pytest.raises(CorpusError, match="no column 'text'.*text_field"):
        docs(SourceSpec(domain="arxiv", path=str(tmp_path / "t.parquet")))


def test_directory_source_reads_supported_files_in_order(tmp_path):
    write_lines(tmp_path / "b.jsonl", [json.dumps({"text": "second"}).encode()])
    write_lines(tmp_path / "a.jsonl", [json.dumps({"text": "first"}).encode()])
    (tmp_path / "notes.txt").write_text("ignored")
    files = expand_source_files(SourceSpec(domain="d", path=str(tmp_path)))
    assert [(p.name, fmt) for p, fmt in files] == [("a.jsonl", "jsonl"), ("b.jsonl", "jsonl")]


def test_offline_hub_source_fails_with_the_key(monkeypatch):
    with pytest.raises(CorpusError, match="data.sources\\[\\*\\].hub=nobody/nothing: could not open"):
        docs(SourceSpec(domain="web", hub="nobody/nothing"))


def test_unknown_format_suggests(tmp_path):
    with pytest.raises(CorpusError, match="Unknown corpus format 'jsnl'. Did you mean 'jsonl'"):
        SourceSpec(domain="d", path="x", format="jsnl")


def test_demo_corpus_text_is_identical_across_processes():
    """Different hash seed, environment and process state (one process imports wandb and configures
    logging first, as the pipeline does): the same documents, byte for byte, so the demo's window ids and
    selection are reproducible."""
    import os
    import subprocess
    import sys

    script = (
        "import hashlib, sys\n"
        "if sys.argv[1] == 'polluted':\n"
        "    import logging, wandb, datasets\n"
        "    logging.basicConfig(level=logging.DEBUG)\n"
        "    logging.getLogger('some.library').addHandler(logging.NullHandler())\n"
        "from common.corpus import CorpusStats, SourceSpec, iter_documents\n"
        "specs = [SourceSpec(domain='code', format='python_code'), SourceSpec(domain='docs', format='python_docs')]\n"
        "h, n = hashlib.sha256(), {'code': 0, 'docs': 0}\n"
        "for d in iter_documents(specs, 'error', CorpusStats()):\n"
        "    h.update(d['text'].encode())\n"
        "    n[d['domain']] += 1\n"
        "print(n['code'], n['docs'], h.hexdigest())\n"
    )
    digests = set()
    for seed, state in (("1", "clean"), ("2", "polluted")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "SOME_SECRET_TOKEN": f"value-{seed}"}
        out = subprocess.run(
            [sys.executable, "-c", script, state], capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        code_docs, docs_docs, digest = out.stdout.strip().splitlines()[-1].split()
        assert int(code_docs) >= 10 and int(docs_docs) >= 40  # real content, not two empty corpora
        digests.add(digest)
    assert len(digests) == 1
