"""Prepare's resumable units of work: chunks of `data.part_records` raw records of one input file.

At paper scale (~36B tokens) tokenization takes hours, so a killed prepare must not start over. Each
chunk's windows are saved as a `datasets` directory under `parts/` and a marker JSON is written last,
atomically: a chunk with its marker is finished and is never tokenized again. The marker carries the
chunk's counts and the source ids of its documents, so a resumed run rebuilds the per-domain duplicate
filter exactly and the merged artifact equals an uninterrupted run's, bit for bit.

Chunks are processed strictly in order (sources, then files, then records), because whether a document
is a duplicate depends on every document before it in its domain.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.atomic import atomic_write_json
from common.corpus import CorpusStats, SourceSpec, read_unit, source_units, validated_documents

PARTS_DIR = "parts"


@dataclass
class PartSummary:
    """What a finished chunk contributes to the manifest (its marker file, minus the windows)."""

    domain: str
    last: bool
    """The chunk ended its file (or source)."""
    records: int
    text_bytes: int
    document_tokens: int = 0
    short_documents: int = 0
    windows_found: int = 0
    source_ids: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    """CorpusStats.as_manifest() of this chunk alone."""


@dataclass(frozen=True)
class Unit:
    """One input file of one source (or a whole Hub/demo source): read once, in chunks."""

    source: int
    file: int
    spec: SourceSpec
    path: Path | None
    fmt: str

    @property
    def size(self) -> int | None:
        return self.path.stat().st_size if self.path is not None and self.path.is_file() else None

    def part_name(self, chunk: int) -> str:
        return f"s{self.source:03d}-f{self.file:05d}-c{chunk:05d}"


def plan_units(specs: list[SourceSpec]) -> list[Unit]:
    return [
        Unit(si, fi, spec, path, fmt)
        for si, spec in enumerate(specs)
        for fi, (path, fmt) in enumerate(source_units(spec))
    ]


def read_marker(parts_dir: Path, name: str) -> PartSummary | None:
    marker = parts_dir / f"{name}.json"
    if not marker.exists():
        return None
    return PartSummary(**json.loads(marker.read_text(encoding="utf-8")))


ChunkTokenizer = Callable[[Iterator[dict[str, str]], Path], dict[str, int]]
"""(documents, out_dir) -> {document_tokens, short_documents, windows_found}; saves the chunk's windows
as a datasets directory at out_dir when it has any."""


class ProgressBar:
    """One bar over the whole corpus: input bytes (exact at file boundaries), tokens/s, ETA."""

    def __init__(self, units: list[Unit], enabled: bool) -> None:
        sizes = [u.size for u in units]
        total = sum(sizes) if all(s is not None for s in sizes) else None
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not enabled)
        self.started, self.tokens, self.done_bytes = time.monotonic(), 0, 0

    def chunk_done(self, text_bytes: int, tokens: int) -> None:
        self.tokens += tokens
        self._advance(text_bytes)

    def file_done(self, unit: Unit, file_start: int) -> None:
        """Snap to the exact byte count at a file boundary (text bytes are an approximation inside)."""
        if unit.size is not None:
            self._advance(file_start + unit.size - self.done_bytes)

    def _advance(self, n: int) -> None:
        self.done_bytes += n
        self.bar.update(n)
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tokens/s")

    def close(self) -> None:
        self.bar.close()


def run_units(
    units: list[Unit],
    parts_dir: Path,
    part_records: int,
    on_bad_record: str,
    tokenize_chunk: ChunkTokenizer,
    progress: bool = True,
) -> tuple[list[tuple[str, PartSummary]], int]:
    """Every chunk of every unit, in order: finished ones are read from their markers, the others are
    tokenized. Returns [(part name, summary)] in order and how many chunks were reused."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, set[str]] = {}
    done: list[tuple[str, PartSummary]] = []
    reused = 0
    bar = ProgressBar(units, progress)
    try:
        for unit in units:
            file_start = bar.done_bytes
            records = Peekable(read_unit(unit.spec, unit.path, unit.fmt))
            seen_in_domain = seen.setdefault(unit.spec.domain, set())
            for chunk in itertools.count():
                name = unit.part_name(chunk)
                summary = read_marker(parts_dir, name)
                if summary is not None:  # finished by an earlier run: consume its records, keep its ids
                    for _ in itertools.islice(records, summary.records):
                        pass
                    seen_in_domain.update(summary.source_ids)
                    reused += 1
                    bar.chunk_done(summary.text_bytes, 0)
                else:
                    summary = _run_chunk(
                        unit,
                        records,
                        part_records,
                        parts_dir / name,
                        seen_in_domain,
                        on_bad_record,
                        tokenize_chunk,
                    )
                    bar.chunk_done(summary.text_bytes, summary.document_tokens)
                done.append((name, summary))
                if summary.last:
                    break
            bar.file_done(unit, file_start)
    finally:
        bar.close()
    return done, reused


def _run_chunk(
    unit: Unit,
    records: Peekable,
    part_records: int,
    out_dir: Path,
    seen_in_domain: set[str],
    on_bad_record: str,
    tokenize_chunk: ChunkTokenizer,
) -> PartSummary:
    """Tokenize the next `part_records` raw records into out_dir, then write the marker (last)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a chunk killed before its marker: start it again
    batch = list(itertools.islice(records, part_records))
    last = not records.has_more()
    stats = CorpusStats()
    text_bytes = 0
    ids: list[str] = []

    def documents() -> Iterator[dict[str, str]]:
        nonlocal text_bytes
        for doc in validated_documents(batch, unit.spec, on_bad_record, stats, seen_in_domain):
            text_bytes += len(doc["text"].encode("utf-8"))
            ids.append(doc["source_id"])
            yield doc

    counts = tokenize_chunk(documents(), out_dir)
    summary = PartSummary(
        domain=unit.spec.domain,
        last=last,
        records=len(batch),
        text_bytes=text_bytes,
        source_ids=ids,
        stats=stats.as_manifest(),
        **counts,
    )
    atomic_write_json(out_dir.parent / f"{out_dir.name}.json", asdict(summary))
    return summary


class Peekable(Iterator):
    """An iterator that can tell whether it has more without losing the record it looks at: a chunk
    knows it is its file's last one, so a resumed run never reads past a finished file."""

    def __init__(self, items: Iterator) -> None:
        self._items, self._head = iter(items), []

    def __next__(self) -> Any:
        return self._head.pop() if self._head else next(self._items)

    def has_more(self) -> bool:
        if not self._head:
            try:
                self._head.append(next(self._items))
            except StopIteration:
                return False
        return True


def parts_progress(parts_dir: Path, units: list[Unit]) -> tuple[int, int, int, int | None]:
    """(finished chunks, their raw records, their windows, input bytes or None when not all are files),
    read from the chunk markers alone: the dry run's view of a partial prepare."""
    chunks = records = windows = 0
    for marker in sorted(parts_dir.glob("*.json")) if parts_dir.is_dir() else []:
        summary = read_marker(parts_dir, marker.stem)
        if summary is not None:
            chunks, records, windows = chunks + 1, records + summary.records, windows + summary.windows_found
    sizes = [u.size for u in units]
    return chunks, records, windows, sum(sizes) if all(s is not None for s in sizes) else None
