"""Training sequences: the selected long windows and packed short documents, drawn in mixture order.

Every source becomes a pool of fixed-length sequences stored as an Arrow file (memory-mapped by
`datasets`, so a 32K x millions pool costs disk, not RAM):
- a long domain: its selected windows (from the select stage), cut to `seq_len`, positions 0..seq_len-1;
- a short source: its documents packed with EOS separators, positions restarting per document.

Sequence k of the run comes from the source the mixture schedule gives k, at that source's next row;
rows are visited in a seeded permutation per pass ("epoch") over the pool. So the whole data order is
a pure function of (seed, k): resuming at step s only needs s, on any number of ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import Dataset, Features, Sequence, Value
from datasets.arrow_writer import ArrowWriter

from common.corpus import CorpusStats, SourceSpec, iter_documents
from common.errors import UserError
from training.mixture import MixtureSchedule
from training.packing import pack_documents

log = logging.getLogger(__name__)

SEQUENCE_FEATURES = Features(
    {"input_ids": Sequence(Value("int32")), "position_ids": Sequence(Value("int32"))}
)
TOKENIZE_BATCH = 256


class TrainingDataError(UserError, ValueError):
    """Training data that cannot satisfy the mixture; the message names the config key to change."""


@dataclass(frozen=True)
class MixturePlan:
    """Shares of every source and how many sequences the run draws from each."""

    long: dict[str, float]
    short: dict[str, float]
    demand: dict[str, int]
    schedule: MixtureSchedule
    total_sequences: int

    @property
    def shares(self) -> dict[str, float]:
        return {**self.long, **self.short}


def plan_mixture(mixture: Mapping[str, Mapping[str, float]], total_sequences: int, seed: int) -> MixturePlan:
    """From the select stage's mixture.json ({"long": {...}, "short": {...}}); zero shares are dropped."""
    long = {k: float(v) for k, v in mixture.get("long", {}).items() if v > 0}
    short = {k: float(v) for k, v in mixture.get("short", {}).items() if v > 0}
    if clash := set(long) & set(short):
        raise TrainingDataError(
            f"selection.mixture.short names {sorted(clash)} are also long domains; rename the short sources"
        )
    schedule = MixtureSchedule({**long, **short}, seed)
    counts = schedule.counts(0, total_sequences)
    demand = {name: int(counts.get(name, 0)) for name in schedule.names}
    return MixturePlan(long, short, demand, schedule, total_sequences)


def _write_pool(path: Path, rows: Iterable[dict[str, list[int]]], batch: int = 64) -> int:
    """Write sequences to an Arrow file atomically; returns the row count."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with ArrowWriter(features=SEQUENCE_FEATURES, path=str(tmp), writer_batch_size=batch) as writer:
        for row in rows:
            writer.write(row)
            count += 1
        writer.finalize()
    os.replace(tmp, path)
    return count


def selected_ids(selection_path: Path, domain: str) -> set[str]:
    table = pq.read_table(selection_path, columns=["id", "domain"])
    return {
        i for i, d in zip(table.column("id").to_pylist(), table.column("domain").to_pylist()) if d == domain
    }


def long_rows(prepare_dir: Path, wanted: set[str], seq_len: int) -> Iterator[dict[str, list[int]]]:
    """The wanted windows in prepare's (deterministic) shard order, cut to seq_len."""
    positions = list(range(seq_len))
    for shard in sorted(Path(prepare_dir).glob("windows-*.parquet")):
        table = pq.read_table(shard, columns=["id", "n_tokens", "input_ids"])
        ids = table.column("id").to_pylist()
        for i, window_id in enumerate(ids):
            if window_id not in wanted:
                continue
            n_tokens = table.column("n_tokens")[i].as_py()
            if n_tokens < seq_len:
                raise TrainingDataError(
                    f"window {window_id} has {n_tokens} tokens, fewer than training.seq_len={seq_len}; "
                    "lower training.seq_len or re-prepare with a larger data.window_size"
                )
            yield {"input_ids": table.column("input_ids")[i].as_py()[:seq_len], "position_ids": positions}


def build_long_pool(prepare_dir: Path, selection_path: Path, domain: str, seq_len: int, path: Path) -> int:
    wanted = selected_ids(selection_path, domain)
    if not wanted:
        raise TrainingDataError(
            f"the selection has no windows of domain '{domain}', which has a share in the mixture; "
            "check selection.fraction / selection.budget_tokens / selection.domain_ratios"
        )
    return _write_pool(path, long_rows(prepare_dir, wanted, seq_len))


def short_rows(
    specs: list[SourceSpec], tokenizer, seq_len: int, limit: int, on_bad_record: str
) -> Iterator[dict[str, list[int]]]:
    """Documents in reader order, tokenized and packed; stops after `limit` sequences."""
    if tokenizer.eos_token_id is None:
        raise TrainingDataError(
            "the training model's tokenizer has no EOS token to separate packed documents"
        )

    def token_lists() -> Iterator[list[int]]:
        batch: list[str] = []
        for doc in iter_documents(specs, on_bad_record, CorpusStats()):
            batch.append(doc["text"])
            if len(batch) == TOKENIZE_BATCH:
                yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
                batch = []
        if batch:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]

    for count, packed in enumerate(pack_documents(token_lists(), seq_len, tokenizer.eos_token_id)):
        if count == limit:
            return
        yield {"input_ids": packed.input_ids, "position_ids": packed.position_ids}


def build_short_pool(
    name: str, specs: list[SourceSpec], tokenizer, seq_len: int, demand: int, on_bad_record: str, path: Path
) -> int:
    """Packs only as many sequences as the run draws (the rest of a large source is never read)."""
    rows = _write_pool(path, short_rows(specs, tokenizer, seq_len, demand, on_bad_record))
    if rows == 0:
        raise TrainingDataError(
            f"training.short_sources.{name}: its documents fill no {seq_len}-token sequence; give more data"
        )
    return rows


class MixtureSequences(torch.utils.data.Dataset):
    """Item k = training sequence k of the run (the same on any rank and after any resume)."""

    def __init__(self, pools: Mapping[str, Dataset], plan: MixturePlan, seed: int) -> None:
        missing = [n for n in plan.schedule.names if n not in pools]
        if missing:
            raise TrainingDataError(f"no sequence pool for mixture source(s) {missing}")
        self.pools = [pools[n].with_format("numpy") for n in plan.schedule.names]
        self.names = plan.schedule.names
        self.seed = seed
        self.source, self.ordinal = plan.schedule.ordinals(plan.total_sequences)

    def __len__(self) -> int:
        return len(self.source)

    @lru_cache(maxsize=64)  # noqa: B019 - one permutation per (source, pass), reused for a whole pass
    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, source, epoch]).permutation(len(self.pools[source]))

    def _position(self, k: int) -> tuple[int, int]:
        source = int(self.source[k])
        epoch, offset = divmod(int(self.ordinal[k]), len(self.pools[source]))
        return source, int(self._permutation(source, epoch)[offset])

    def locate(self, k: int) -> tuple[str, int]:
        """(source name, pool row) of sequence k."""
        source, row = self._position(k)
        return self.names[source], row

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        source, row = self._position(k)
        item = self.pools[source][row]
        return {
            "input_ids": torch.as_tensor(item["input_ids"], dtype=torch.long),
            "position_ids": torch.as_tensor(item["position_ids"], dtype=torch.long),
        }


def rank_indices(
    step: int, sequences_per_step: int, grad_accumulation: int, micro_batch: int, world_size: int, rank: int
) -> list[list[int]]:
    """The micro-batches (lists of sequence indices) this rank trains on in optimizer step `step`.

    Micro-batch m of rank r takes sequences step*S + (m*world + r)*micro ... + micro - 1: over all ranks
    and micro-batches, exactly the step's S sequences, whatever the world size.
    """
    base = step * sequences_per_step
    return [
        [base + (m * world_size + rank) * micro_batch + b for b in range(micro_batch)]
        for m in range(grad_accumulation)
    ]
