"""Prepare stage: read corpora, tokenize, cut Algorithm-1 windows, write Parquet shards (windows contract).

Windows contract (ARCHITECTURE.md): `id` (str, stable), `domain`, `source_id` (hash of the document
text), `position` (window index within its document, by start offset), `n_tokens`, `input_ids`
(list<int32>); plus `start` (token offset of the window in its document).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_write
from common.corpus import CorpusError, CorpusStats, SourceSpec, check_bad_record_policy, source_signature
from common.errors import ConfigError
from common.model_sources import load_tokenizer
from common.stage import Progress, StageContext
from selection.prepare_parts import PARTS_DIR, PartSummary, parts_progress, plan_units, run_units
from selection.windows import WINDOWINGS, document_window_starts, window_id

log = logging.getLogger(__name__)

SUMMARY_POSITION = -1  # rows carrying one document's token count, dropped before writing
SHARD_PATTERN = "windows-{index:05d}.parquet"


@dataclass
class PrepareConfig:
    """The `data` config group, typed once at the stage boundary."""

    sources: list[SourceSpec]
    window_size: int
    """Tokens per window (32768 in the paper)."""
    keep_exact_fit: bool = False
    """Give a document of exactly window_size tokens its window (the authors' code gives none)."""
    windowing: str = "sliding"
    """sliding: Algorithm 1; first: one window per document, its first window_size tokens (a corpus that
    is already windows, such as the released LongABC-32K)."""
    max_windows_per_domain: int | None = None
    """Keep at most this many windows per domain, sampled with `seed` (None keeps all)."""
    seed: int = 0
    on_bad_record: str = "error"
    """error: stop at the first bad record, naming it; skip: skip, count and report in the manifest."""
    num_proc: int = 1
    """Tokenizer processes (datasets.map num_proc); does not change results."""
    shard_rows: int = 2000
    """Windows per Parquet shard; does not change results."""
    part_records: int = 1000
    """Raw records per resumable chunk of an input file (a killed run redoes at most one chunk); does not
    change results."""
    tokenizer: str = "???"

    def __post_init__(self) -> None:
        if self.windowing not in WINDOWINGS:
            raise ConfigError(f"data.windowing={self.windowing}: choose one of {WINDOWINGS}")
        check_bad_record_policy(self.on_bad_record)
        if self.window_size <= 0:
            raise CorpusError(f"data.window_size={self.window_size}: must be a positive number of tokens")
        if not self.sources:
            raise CorpusError("data.sources is empty: give at least one {path: ..., domain: ...}")
        if self.part_records <= 0:
            raise CorpusError(f"data.part_records={self.part_records}: must be a positive number of records")
        if self.max_windows_per_domain is not None and self.max_windows_per_domain <= 0:
            raise CorpusError(
                f"data.max_windows_per_domain={self.max_windows_per_domain}: must be positive or null"
            )

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> PrepareConfig:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        sources = []
        for i, src in enumerate(data.get("sources") or []):
            if not isinstance(src, dict):
                raise CorpusError(
                    f"data.sources[{i}] must be a mapping like {{path: file.jsonl, domain: book}}"
                )
            unknown = set(src) - set(SourceSpec.__dataclass_fields__)
            if unknown:
                raise CorpusError(
                    f"data.sources[{i}]: unknown key(s) {sorted(unknown)}; "
                    f"known: {sorted(SourceSpec.__dataclass_fields__)}"
                )
            sources.append(SourceSpec(**src))
        known = {
            k: data[k] for k in cls.__dataclass_fields__ if k in data and k not in ("sources", "tokenizer")
        }
        return cls(sources=sources, tokenizer=cfg.model.name_or_path, **known)


def check_config(cfg: DictConfig) -> None:
    """Fail on a bad `data` value before any stage runs (PrepareConfig validates itself)."""
    PrepareConfig.from_cfg(cfg)


def fingerprint_extras(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the corpus content beyond the config: file sizes/mtimes, Python version (demo)."""
    conf = PrepareConfig.from_cfg(cfg)
    return {"sources": [source_signature(s) for s in conf.sources], "python": list(sys.version_info[:2])}


def cut_windows(
    batch: dict[str, list], tokenizer, window: int, keep_exact_fit: bool, windowing: str = "sliding"
) -> dict[str, list]:
    """datasets.map function: tokenize documents (no special tokens) and emit window rows.

    One extra summary row per document (position -1, no tokens) carries its length for the manifest.
    """
    encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {
        k: [] for k in ("id", "domain", "source_id", "position", "start", "n_tokens", "input_ids")
    }

    def emit(domain, source_id, position, start, n_tokens, ids):
        out["id"].append(
            window_id(domain, source_id, position) if position >= 0 else f"{domain}/{source_id}/doc"
        )
        out["domain"].append(domain)
        out["source_id"].append(source_id)
        out["position"].append(position)
        out["start"].append(start)
        out["n_tokens"].append(n_tokens)
        out["input_ids"].append(ids)

    for domain, source_id, ids in zip(batch["domain"], batch["source_id"], encoded):
        emit(domain, source_id, SUMMARY_POSITION, 0, len(ids), [])
        for position, start in enumerate(document_window_starts(len(ids), window, windowing, keep_exact_fit)):
            emit(domain, source_id, position, start, window, ids[start : start + window])
    return out


def sample_per_domain(ids: list[str], domains: list[str], cap: int | None, seed: int) -> list[int]:
    """Row indices to keep: per domain at most `cap`, drawn with `seed` from the rows sorted by id.

    Sorting first makes the draw independent of row order (num_proc, file order).
    """
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    if cap is None:
        return order
    by_domain: dict[str, list[int]] = {}
    for i in order:
        by_domain.setdefault(domains[i], []).append(i)
    keep: list[int] = []
    for domain in sorted(by_domain):
        rows = by_domain[domain]
        if len(rows) > cap:
            rng = np.random.default_rng([seed, len(rows)])
            rows = [rows[j] for j in sorted(rng.choice(len(rows), size=cap, replace=False))]
        keep += rows
    return sorted(keep, key=lambda i: ids[i])


def _write_shards(windows, out_dir: Path, shard_rows: int) -> list[str]:
    names = []
    for index, begin in enumerate(range(0, len(windows), shard_rows)):
        name = SHARD_PATTERN.format(index=index)
        part = windows.select(range(begin, min(begin + shard_rows, len(windows))))
        atomic_write(out_dir / name, lambda tmp, part=part: part.to_parquet(str(tmp)))
        names.append(name)
    return names


def window_features():
    """The windows contract's columns (ARCHITECTURE.md), as datasets features."""
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "domain": Value("string"),
            "source_id": Value("string"),
            "position": Value("int32"),
            "start": Value("int64"),
            "n_tokens": Value("int32"),
            "input_ids": Sequence(Value("int32")),
        }
    )


def chunk_tokenizer(conf: PrepareConfig, tokenizer, work: Path):
    """The function that turns one chunk's documents into its saved windows (see prepare_parts)."""
    from datasets import Dataset, Features, Value
    from datasets.exceptions import DatasetGenerationError

    features = window_features()

    def tokenize_chunk(documents, out_dir: Path) -> dict[str, int]:
        counts = {"document_tokens": 0, "short_documents": 0, "windows_found": 0}
        documents = iter(documents)
        first = next(documents, None)
        if first is None:  # only duplicates or skipped bad records: datasets refuses an empty generator
            return counts
        cache = work / out_dir.name
        shutil.rmtree(cache, ignore_errors=True)
        try:
            docs = Dataset.from_generator(
                lambda: itertools.chain([first], documents),
                cache_dir=str(cache),
                fingerprint=out_dir.name,  # hashing the generator would pickle the chunk's documents
                features=Features({k: Value("string") for k in ("domain", "source_id", "text")}),
            )
        except DatasetGenerationError as exc:  # datasets wraps our own errors; give the user the real one
            if isinstance(exc.__cause__, CorpusError):
                raise exc.__cause__ from None
            raise
        if len(docs):
            rows = docs.map(
                cut_windows,
                batched=True,
                batch_size=16,
                num_proc=conf.num_proc if conf.num_proc > 1 and len(docs) > 1 else None,
                remove_columns=docs.column_names,
                features=features,
                new_fingerprint=f"{out_dir.name}-windows",
                fn_kwargs={
                    "tokenizer": tokenizer,
                    "window": conf.window_size,
                    "keep_exact_fit": conf.keep_exact_fit,
                    "windowing": conf.windowing,
                },
            )
            positions, lengths = rows["position"], rows["n_tokens"]
            windows = [i for i, position in enumerate(positions) if position != SUMMARY_POSITION]
            for position, n in zip(positions, lengths):
                if position == SUMMARY_POSITION:
                    counts["document_tokens"] += n
                    counts["short_documents"] += not document_window_starts(
                        n, conf.window_size, conf.windowing, conf.keep_exact_fit
                    )
            counts["windows_found"] = len(windows)
            if windows:
                tmp = out_dir.with_name(out_dir.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                rows.select(windows).save_to_disk(str(tmp))
                os.replace(tmp, out_dir)
        shutil.rmtree(cache, ignore_errors=True)
        return counts

    return tokenize_chunk


def merge_windows(parts_dir: Path, names: list[str], conf: PrepareConfig, work: Path):
    """All finished chunks' windows, sampled per domain and sorted by id (the order no chunking changes)."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    parts = [load_from_disk(str(parts_dir / name)) for name in names]
    if not parts:
        features = window_features()
        return Dataset.from_dict({k: [] for k in features}, features=features)
    rows = concatenate_datasets(parts)
    meta = rows.select_columns(["id", "domain"]).to_dict()
    keep = sample_per_domain(meta["id"], meta["domain"], conf.max_windows_per_domain, conf.seed)
    work.mkdir(parents=True, exist_ok=True)
    return rows.select(keep).flatten_indices(cache_file_name=str(work / "windows.arrow"))


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    from datasets import disable_caching
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    conf = PrepareConfig.from_cfg(cfg)
    tokenizer = load_tokenizer(conf.tokenizer, ctx.cache_dir)
    work, parts_dir = ctx.out_dir / "_work", ctx.out_dir / PARTS_DIR
    shutil.rmtree(work, ignore_errors=True)
    for stale in ctx.out_dir.glob("windows-*.parquet"):
        stale.unlink()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    disable_caching()
    disable_progress_bar()  # one bar over the whole corpus instead of datasets' bars per chunk
    try:
        done, reused = run_units(
            plan_units(conf.sources),
            parts_dir,
            conf.part_records,
            conf.on_bad_record,
            chunk_tokenizer(conf, tokenizer, work),
        )
        if reused:
            log.info("prepare: resumed; %d of %d chunks were already finished", reused, len(done))
        windows = merge_windows(parts_dir, [n for n, s in done if s.windows_found], conf, work)
        shards = _write_shards(windows, ctx.out_dir, conf.shard_rows)
    finally:
        enable_progress_bar()
    manifest = summarize(done, windows["domain"], conf)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return {**manifest, "shards": shards}


def summarize(done: list[tuple[str, PartSummary]], kept_domains: list[str], conf: PrepareConfig) -> dict:
    """The manifest numbers, summed over the chunks in order (bad-record examples: the first ones read)."""
    stats = CorpusStats()
    doc_tokens, short_docs, windows_found = Counter(), Counter(), Counter()
    for _, part in done:
        stats.add_manifest(part.stats)
        doc_tokens[part.domain] += part.document_tokens
        short_docs[part.domain] += part.short_documents
        windows_found[part.domain] += part.windows_found
    kept = Counter(kept_domains)
    per_domain = {
        d: {
            "documents": stats.documents[d],
            "short_documents": int(short_docs[d]),
            "document_tokens": doc_tokens[d],
            "windows_found": windows_found[d],
            "windows": kept[d],
            "window_tokens": kept[d] * conf.window_size,
        }
        for d in sorted(set(stats.documents) | set(stats.bad_records))
    }
    for domain, counts in per_domain.items():
        log.info(
            "prepare: %-8s %6d documents (%d shorter than a window) -> %6d windows of %d tokens%s",
            domain,
            counts["documents"],
            counts["short_documents"],
            counts["windows"],
            conf.window_size,
            f" (sampled from {counts['windows_found']})"
            if counts["windows"] != counts["windows_found"]
            else "",
        )
    return {
        "window_size": conf.window_size,
        "tokenizer": conf.tokenizer,
        "windows": sum(kept.values()),
        "per_domain": per_domain,
        **{k: v for k, v in stats.as_manifest().items() if k != "documents"},
    }


def progress(cfg: DictConfig, out_dir: Path, inputs: dict[str, Path]) -> Progress:
    """Finished chunks of the input (a killed prepare resumes after them) and the size of the input."""
    conf = PrepareConfig.from_cfg(cfg)
    units = plan_units(conf.sources)
    chunks, records, windows, size = parts_progress(out_dir / PARTS_DIR, units)
    cap = conf.max_windows_per_domain
    detail = [f"{records:,} records read, {windows:,} windows found"] if chunks else []
    detail.append(f"input: {len(units)} unit(s)" + (f", {size:,} bytes" if size is not None else ""))
    detail.append(
        f"windows of {conf.window_size:,} tokens" + (f", at most {cap:,} per domain" if cap else "")
    )
    return Progress(chunks, None, f"input chunks of {conf.part_records:,} records", "done", "; ".join(detail))
