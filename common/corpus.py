"""Corpus readers: JSONL, JSON arrays, Parquet, `datasets.load_from_disk` dirs, Hub datasets, demo text.

Every reader yields `(text, location)` pairs; `location` ("file.jsonl:12", "file.parquet#row 3") is what
an error message names. Validation (empty, non-string, undecodable, malformed) lives in one place,
`iter_documents`, with one policy: fail naming the record, or skip and count (`data.on_bad_record`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError, UserError
from common.registry import Registry

log = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("error", "skip")
MAX_EXAMPLES = 5


class CorpusError(UserError, ValueError):
    """Bad corpus input; the message names the file, the record and the config key to change."""


@dataclass(frozen=True)
class SourceSpec:
    """One corpus source of one domain (an entry of `data.sources`)."""

    domain: str
    """Domain label used for per-domain selection (e.g. arxiv, book, code)."""
    path: str | None = None
    """File, directory or glob. Directories are read recursively (sorted)."""
    hub: str | None = None
    """Hugging Face dataset id (needs the Hub, or its local cache when offline)."""
    format: str = "auto"
    """auto | jsonl | json | parquet | arrow_dir | hub | python_code | python_docs."""
    text_field: str = "text"
    split: str = "train"
    name: str | None = None
    """Hub dataset configuration name."""
    options: dict[str, Any] = field(default_factory=dict)
    """Reader-specific options (the demo readers take their package and module lists here)."""

    def __post_init__(self) -> None:
        if not self.domain:
            raise CorpusError("data.sources[*].domain is required for every source")
        if self.format not in READERS and self.format != "auto":
            raise CorpusError(f"data.sources[*].format: {READERS.unknown_message(self.format)}")

    @property
    def label(self) -> str:
        return self.path or self.hub or self.format


class BadRecord(Exception):
    """Raised by readers for one unusable record; `iter_documents` applies the policy."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location, self.reason = location, reason


RawRecords = Iterator[tuple[Any, str]]
READERS: Registry[Callable[[SourceSpec], RawRecords]] = Registry("corpus format")


def _field(record: Any, spec: SourceSpec, location: str) -> Any:
    """The record's text field, or a BadRecord saying why there is none (the policy is applied later)."""
    if not isinstance(record, dict):
        return BadRecord(location, f"record is a {type(record).__name__}, not an object")
    if spec.text_field not in record:
        return BadRecord(location, f"no field '{spec.text_field}' (set data.sources[*].text_field)")
    return record[spec.text_field]


@READERS.register("jsonl")
def read_jsonl(spec: SourceSpec, path: Path) -> RawRecords:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            location = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield BadRecord(location, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"), location
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadRecord(location, f"malformed JSON ({exc.msg}, column {exc.colno})"), location
                continue
            yield _field(record, spec, location), location


@READERS.register("json")
def read_json_array(spec: SourceSpec, path: Path) -> RawRecords:
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise CorpusError(
            f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); a JSON source must be an array "
            "of objects (use .jsonl for one object per line)"
        ) from exc
    if not isinstance(records, list):
        raise CorpusError(f"{path}: expected a JSON array of objects, found a {type(records).__name__}")
    for index, record in enumerate(records):
        location = f"{path}[{index}]"
        yield _field(record, spec, location), location


def _read_table_rows(spec: SourceSpec, rows: Iterator[dict], origin: str) -> RawRecords:
    for index, record in enumerate(rows):
        location = f"{origin}#row {index}"
        yield _field(record, spec, location), location


@READERS.register("parquet")
def read_parquet(spec: SourceSpec, path: Path) -> RawRecords:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if spec.text_field not in pf.schema_arrow.names:
        raise CorpusError(
            f"{path}: no column '{spec.text_field}' (columns: {', '.join(pf.schema_arrow.names)}); "
            "set data.sources[*].text_field"
        )
    rows = (row for batch in pf.iter_batches(columns=[spec.text_field]) for row in batch.to_pylist())
    yield from _read_table_rows(spec, rows, str(path))


@READERS.register("arrow_dir")
def read_saved_dataset(spec: SourceSpec, path: Path) -> RawRecords:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if spec.split not in ds:
            raise CorpusError(
                f"{path}: no split '{spec.split}' (splits: {', '.join(ds)}); set data.sources[*].split"
            )
        ds = ds[spec.split]
    if spec.text_field not in ds.column_names:
        raise CorpusError(
            f"{path}: no column '{spec.text_field}' (columns: {', '.join(ds.column_names)}); "
            "set data.sources[*].text_field"
        )
    yield from _read_table_rows(spec, iter(ds.select_columns([spec.text_field])), str(path))


@READERS.register("hub")
def read_hub(spec: SourceSpec, _path: Path | None = None) -> RawRecords:
    from datasets import load_dataset

    try:
        ds = load_dataset(spec.hub, spec.name, split=spec.split, streaming=True)
    except Exception as exc:  # offline, missing, gated: all end the same way for the user
        raise CorpusError(
            f"data.sources[*].hub={spec.hub}: could not open the dataset ({type(exc).__name__}: {exc}). "
            "Offline, download it elsewhere and point data.sources[*].path at local files instead."
        ) from exc
    yield from _read_table_rows(spec, iter(ds), f"hub:{spec.hub}")


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return (
            "arrow_dir"
            if (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()
            else "dir"
        )
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".json"):
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    raise CorpusError(
        f"{path}: cannot tell the format from the name; set data.sources[*].format ({', '.join(READERS)})"
    )


def expand_source_files(spec: SourceSpec) -> list[tuple[Path, str]]:
    """The (path, format) pairs a path-based source stands for; a path matching nothing is an error."""
    matches = sorted(glob.glob(str(Path(spec.path).expanduser()), recursive=True))
    if not matches:
        raise CorpusError(f"data.sources[*].path={spec.path}: matches no file or directory")
    out: list[tuple[Path, str]] = []
    for match in map(Path, matches):
        fmt = spec.format if spec.format != "auto" else _detect_format(match)
        if fmt == "dir":
            inner = sorted(
                p for p in match.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".parquet")
            )
            if not inner:
                raise CorpusError(
                    f"data.sources[*].path={spec.path}: directory {match} holds no .jsonl/.json/.parquet"
                )
            out += [(p, _detect_format(p)) for p in inner]
        else:
            out.append((match, fmt))
    return out


def source_signature(spec: SourceSpec) -> list[Any]:
    """What identifies a source's content cheaply (path, size, mtime) for the prepare fingerprint."""
    if spec.path is None:
        return [spec.hub or spec.format, spec.name, spec.split]
    sig = []
    for path, fmt in expand_source_files(spec):
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        sig.append(
            [
                str(path.resolve()),
                fmt,
                [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()],
            ]
        )
    return sig


def source_units(spec: SourceSpec) -> list[tuple[Path | None, str]]:
    """The (path, format) units a source is read in: each file of a path source, or the whole source
    (Hub dataset, demo text) as one unit with no path. Prepare resumes at this granularity."""
    if spec.path is None:
        fmt = spec.format if spec.format != "auto" else ("hub" if spec.hub else "auto")
        if fmt == "auto":
            raise CorpusError("data.sources[*]: give a path, a hub id, or a format")
        return [(None, fmt)]
    return expand_source_files(spec)


def read_unit(spec: SourceSpec, path: Path | None, fmt: str) -> RawRecords:
    """The raw records of one unit, bad ones included as BadRecord values (see `validated_documents`)."""
    return READERS.get(fmt)(spec, path)


@dataclass
class CorpusStats:
    """What reading the corpus skipped, per domain and reason, with a few example locations."""

    documents: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)
    bad_records: Counter = field(default_factory=Counter)
    bad_by_reason: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)

    def add_manifest(self, other: dict[str, Any]) -> None:
        """Add the counts of another `as_manifest()` (a resumable chunk's), keeping the first examples."""
        self.documents.update(other["documents"])
        self.duplicates.update(other["duplicate_documents"])
        self.bad_records.update(other["bad_records"])
        self.bad_by_reason.update(other["bad_records_by_reason"])
        self.bad_examples += other["bad_record_examples"][: MAX_EXAMPLES - len(self.bad_examples)]

    def as_manifest(self) -> dict[str, Any]:
        return {
            "documents": dict(self.documents),
            "duplicate_documents": dict(self.duplicates),
            "bad_records": dict(self.bad_records),
            "bad_records_by_reason": dict(self.bad_by_reason),
            "bad_record_examples": self.bad_examples,
        }


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0]


def check_bad_record_policy(on_bad_record: str) -> None:
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ConfigError(f"data.on_bad_record={on_bad_record}: use one of {BAD_RECORD_POLICIES}")


def validated_documents(
    records: Iterable[tuple[Any, str]],
    spec: SourceSpec,
    on_bad_record: str,
    stats: CorpusStats,
    seen_in_domain: set[str],
) -> Iterator[dict[str, str]]:
    """The valid documents among `records` as {domain, source_id, text}; a bad record stops the run naming
    it, or is counted by reason (`on_bad_record`); an exact duplicate of a document already in
    `seen_in_domain` is counted and skipped. `source_id` hashes the text, so ids do not depend on file
    paths or reading order."""
    for text, location in records:
        problem = text if isinstance(text, BadRecord) else None
        if problem is None and not isinstance(text, str):
            problem = BadRecord(location, f"field '{spec.text_field}' is a {type(text).__name__}, not text")
        if problem is None and not text.strip():
            problem = BadRecord(location, "empty text")
        if problem is not None:
            if on_bad_record == "error":
                raise CorpusError(
                    f"{problem}. Fix the record, or set data.on_bad_record=skip to skip and count bad records."
                )
            stats.bad_records[spec.domain] += 1
            stats.bad_by_reason[_reason_kind(problem.reason)] += 1
            if len(stats.bad_examples) < MAX_EXAMPLES:
                stats.bad_examples.append(str(problem))
            continue
        source_id = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
        if source_id in seen_in_domain:
            stats.duplicates[spec.domain] += 1
            continue
        seen_in_domain.add(source_id)
        stats.documents[spec.domain] += 1
        yield {"domain": spec.domain, "source_id": source_id, "text": text}


def iter_documents(
    specs: list[SourceSpec], on_bad_record: str, stats: CorpusStats
) -> Iterator[dict[str, str]]:
    """Valid, de-duplicated documents of all sources in order (duplicates are per domain)."""
    check_bad_record_policy(on_bad_record)
    seen: dict[str, set[str]] = {}
    for spec in specs:
        for path, fmt in source_units(spec):
            records = read_unit(spec, path, fmt)
            yield from validated_documents(
                records, spec, on_bad_record, stats, seen.setdefault(spec.domain, set())
            )


# The demo readers register themselves on import; keep them available wherever formats are validated.
from common import demo_corpus  # noqa: E402,F401
