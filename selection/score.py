"""Score stage: every prepared window gets its method's statistics (scores contract).

- Sharded by rank: each rank takes a contiguous block of the windows (in id order, so it reads only the
  shards holding its block); launch with
  `torchrun --nproc_per_node=N run.py ...` (or accelerate launch); ranks sync through files.
- Resumable: results are flushed every `flush_every` windows to atomic part files
  `parts/rank-RRRR-SSSSSS.parquet`; a re-run (any world size) skips every id found in any part file, so a
  kill -9 loses at most the unflushed windows and duplicates nothing.
- Rank 0 waits for every rank's `.done` marker, merges the parts into `scores.parquet` (sorted by id) and
  returns the manifest; other ranks return None and the pipeline waits for that manifest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from common.atomic import atomic_write, atomic_write_text
from common.distributed import RankInfo, launch_id, rank_info, wait_until
from common.errors import ConfigError, MissingInputError, UserError
from common.model_sources import load_tokenizer
from common.stage import Progress, StageContext
from selection.scorers.registry import ScorerSetup, build_scorer, scorer_class, typed_options

log = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"
PARTS_DIR = "parts"
BASE_COLUMNS = ["id", "domain", "n_tokens"]
UNSCORED_METHOD = "all"
"""selection=all: no scorer; the score stage is skipped and select keeps every prepared window."""


def skip_reason(cfg: DictConfig) -> str | None:
    """Why the score stage has nothing to do for this config (None: it runs)."""
    if cfg.selection.method == UNSCORED_METHOD:
        return f"selection.method={UNSCORED_METHOD} has no scorer; select reads the prepared windows"
    return None


@dataclass
class ScoreConfig:
    """`selection` keys the score stage reads."""

    method: str
    scorer_model: str
    options: dict[str, Any] = field(default_factory=dict)
    scorer_dtype: str | None = None
    """`selection.scorer_model.dtype`: the dtype `scoring.dtype: auto` means on CUDA (CPU: float32)."""
    batch_size: int = 8
    """Windows per scorer call; does not change results."""
    flush_every: int = 64
    """Windows per part file (what a kill can lose at most); does not change results."""
    device: str = "auto"
    wait_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.flush_every < 1:
            raise ConfigError("selection.batch_size and selection.flush_every must be >= 1")

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> ScoreConfig:
        sel = cfg.selection
        return cls(
            method=sel.method,
            scorer_model=sel.scorer_model.name_or_path,
            scorer_dtype=sel.scorer_model.get("dtype"),
            options=OmegaConf.to_container(sel.scoring, resolve=True) or {},
            batch_size=sel.get("batch_size", 8),
            flush_every=sel.get("flush_every", 64),
            device=sel.get("device", "auto"),
            wait_timeout_s=sel.get("wait_timeout_s"),
        )


def check_config(cfg: DictConfig) -> None:
    """Fail on a bad `selection` or `selection.scoring` value before any stage runs."""
    conf = ScoreConfig.from_cfg(cfg)
    scorer = scorer_class(conf.method)
    typed_options(scorer.options_class, conf.options, conf.method)


def resolve_device(device: str, ranks: RankInfo) -> str:
    """`selection.device` for this rank: auto = its own GPU (`cuda:<local rank>`) or the CPU. The rank's
    GPU also becomes the current CUDA device: kernels launched without an explicit device (Triton's,
    cuBLAS handles, `torch.cuda.synchronize()`) go to the current device, which is cuda:0 otherwise, and
    would read another GPU's pointers there."""
    import torch

    if device == "auto":
        device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{ranks.local_rank}"
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    return device


def window_shards(prepare_dir: Path) -> list[Path]:
    shards = sorted(Path(prepare_dir).glob("windows-*.parquet"))
    if not shards:
        raise MissingInputError(f"{prepare_dir}: no windows-*.parquet; re-run the prepare stage")
    return shards


def finished_ids(parts_dir: Path) -> set[str]:
    done: set[str] = set()
    for part in sorted(parts_dir.glob("rank-*.parquet")):
        done.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return done


class PartWriter:
    """Buffers result rows and flushes them to numbered atomic part files."""

    def __init__(self, parts_dir: Path, rank: int) -> None:
        self.parts_dir, self.rank = parts_dir, rank
        existing = sorted(parts_dir.glob(f"rank-{rank:04d}-*.parquet"))
        self.next_seq = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        self.rows: list[dict[str, Any]] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows)
        path = self.parts_dir / f"rank-{self.rank:04d}-{self.next_seq:06d}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        self.next_seq += 1
        self.rows = []


def check_vocabulary(cfg: DictConfig, conf: ScoreConfig, ctx: StageContext) -> None:
    """Windows hold token ids of `model`'s tokenizer; a scorer that reads ids with another vocabulary would
    read garbage (text-based scorers such as ProLong re-tokenize instead)."""
    windows_tok = cfg.model.name_or_path
    if conf.scorer_model == windows_tok or not scorer_class(conf.method).requires_window_vocabulary:
        return
    a, b = load_tokenizer(windows_tok, ctx.cache_dir), load_tokenizer(conf.scorer_model, ctx.cache_dir)
    if a.get_vocab() != b.get_vocab():
        raise ConfigError(
            f"windows were tokenized with model.name_or_path={windows_tok}, but the scorer "
            f"selection.scorer_model.name_or_path={conf.scorer_model} has a different vocabulary; use a scorer "
            "that shares the tokenizer (e.g. Llama-3.1 for Llama-3 windows)."
        )


def rank_slice(all_ids: list[str], ranks: RankInfo) -> list[str]:
    """This rank's contiguous block of the windows (in id order), so it reads only the shards holding it."""
    n = len(all_ids)
    return all_ids[ranks.rank * n // ranks.world_size : (ranks.rank + 1) * n // ranks.world_size]


def score_my_windows(
    conf: ScoreConfig,
    ctx: StageContext,
    ranks: RankInfo,
    parts_dir: Path,
    windows_tokenizer: str | None = None,
) -> int:
    """Score this rank's unfinished windows; returns how many were scored in this call."""
    done = finished_ids(parts_dir)
    shards = window_shards(ctx.inputs["prepare"].path)
    shard_ids = [pq.read_table(s, columns=["id"]).column("id").to_pylist() for s in shards]
    all_ids = [i for ids in shard_ids for i in ids]
    mine = {i for i in rank_slice(all_ids, ranks) if i not in done}
    meta = pa.concat_tables(pq.read_table(s, columns=["id", "n_tokens"]) for s in shards)
    total_tokens = sum(n for i, n in zip(all_ids, meta.column("n_tokens").to_pylist()) if i in mine)
    log.info(
        "score: rank %d/%d has %d windows to score (%d already done)",
        ranks.rank,
        ranks.world_size,
        len(mine),
        len(done),
    )
    if not mine:
        return 0
    scorer = build_scorer(
        ScorerSetup(
            conf.method,
            conf.scorer_model,
            conf.options,
            ctx.cache_dir,
            resolve_device(conf.device, ranks),
            windows_tokenizer,
            model_dtype=conf.scorer_dtype,
        )
    )
    writer = PartWriter(parts_dir, ranks.rank)
    scored, tokens, start = 0, 0, time.monotonic()
    bar = tqdm(
        total=len(mine),
        unit="win",
        desc=f"scoring ({conf.method}, rank {ranks.rank})",
        disable=not ranks.is_main,
        mininterval=1.0,
    )
    for shard, ids_in_shard in zip(shards, shard_ids):
        if mine.isdisjoint(ids_in_shard):
            continue  # none of this rank's windows: do not read its tokens
        table = pq.read_table(shard, columns=[*BASE_COLUMNS, "input_ids"])
        lengths = table.column("n_tokens").to_pylist()
        ids = table.column("id").to_pylist()
        rows = [r for r, window_id in enumerate(ids) if window_id in mine]
        rows.sort(key=lambda r: (-lengths[r], ids[r]))  # length-sorted batches
        for b in range(0, len(rows), conf.batch_size):
            batch = rows[b : b + conf.batch_size]
            windows = [table.column("input_ids")[r].values.to_numpy() for r in batch]
            results = scorer.score_batch(windows, [ids[r] for r in batch])
            writer.add(
                [
                    {"id": ids[r], "domain": table.column("domain")[r].as_py(), "n_tokens": lengths[r], **res}
                    for r, res in zip(batch, results)
                ]
            )
            scored += len(batch)
            tokens += sum(lengths[r] for r in batch)
            if len(writer.rows) >= conf.flush_every:
                writer.flush()
            elapsed = max(time.monotonic() - start, 1e-9)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / elapsed:,.0f}", left_tok=f"{total_tokens - tokens:,}")
    writer.flush()
    bar.close()
    elapsed = time.monotonic() - start
    ctx.tracker.log_metrics({"score/windows_per_s": scored / elapsed, "score/tokens_per_s": tokens / elapsed})
    return scored


def merge_parts(parts_dir: Path, expected_ids: list[str], out: Path) -> pa.Table:
    tables = [pq.read_table(p) for p in sorted(parts_dir.glob("rank-*.parquet"))]
    table = pa.concat_tables(tables, promote_options="default").sort_by("id")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{parts_dir}: duplicate window ids in part files; delete the parts and re-score")
    if ids != sorted(expected_ids):
        missing = len(set(expected_ids) - set(ids))
        raise UserError(
            f"{parts_dir}: {missing} windows have no score; re-run the score stage to finish them"
        )
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    return table


def rank_done(parts_dir: Path, rank: int, launch: str) -> bool:
    marker = parts_dir / f"rank-{rank:04d}.done"
    try:
        return json.loads(marker.read_text()).get("launch") == launch
    except (OSError, ValueError):
        return False


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any] | None:
    conf = ScoreConfig.from_cfg(cfg)
    ranks = rank_info()
    parts_dir = ctx.out_dir / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        check_vocabulary(cfg, conf, ctx)
    started = time.monotonic()
    scored = score_my_windows(conf, ctx, ranks, parts_dir, cfg.model.name_or_path)
    launch = launch_id()  # a launch ignores .done markers of an earlier one
    atomic_write_text(
        parts_dir / f"rank-{ranks.rank:04d}.done", json.dumps({"scored": scored, "launch": launch})
    )
    if not ranks.is_main:
        return None
    wait_until(
        lambda: all(rank_done(parts_dir, r, launch) for r in range(ranks.world_size)),
        "every rank's .done marker",
        conf.wait_timeout_s,
    )
    expected = pa.concat_tables(
        pq.read_table(s, columns=["id"]) for s in window_shards(ctx.inputs["prepare"].path)
    )
    table = merge_parts(parts_dir, expected.column("id").to_pylist(), ctx.out_dir / SCORES_FILE)
    for marker in parts_dir.glob("rank-*.done"):
        marker.unlink()
    per_domain: dict[str, int] = {}
    for domain in table.column("domain").to_pylist():
        per_domain[domain] = per_domain.get(domain, 0) + 1
    describe = getattr(scorer_class(conf.method), "describe", None)
    return {
        "method": conf.method,
        "scorer_model": conf.scorer_model,
        "scoring": describe(conf.options) if describe else {},
        "windows": table.num_rows,
        "per_domain": per_domain,
        "columns": table.column_names,
        "world_size": ranks.world_size,
        "scored_this_run_rank0": scored,
        "score_seconds": round(time.monotonic() - started, 3),
    }


def progress(cfg: DictConfig, out_dir: Path, inputs: dict[str, Path]) -> Progress:
    """Windows already in part files (a killed score resumes after them) of the prepared windows."""
    parts = sorted((out_dir / PARTS_DIR).glob("rank-*.parquet")) if (out_dir / PARTS_DIR).is_dir() else []
    done = sum(pq.read_metadata(p).num_rows for p in parts)
    manifest = Path(inputs["prepare"]) / "manifest.json"
    total = json.loads(manifest.read_text())["windows"] if manifest.is_file() else None
    scorer = f"{cfg.selection.method}, scorer {cfg.selection.scorer_model.name_or_path}"
    return Progress(
        done, total, "windows", "scored", scorer if total else f"{scorer}; windows known after prepare"
    )
