"""Select stage: normalise scores (within each domain by default, as the authors' per-file run; or over the
whole scored set), rank, choose per domain, write the selection contract (`id, domain, score, rank,
n_tokens`), the training mixture and the analysis."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_write, atomic_write_json, atomic_write_text
from common.errors import ConfigError, MissingInputError
from common.model_sources import load_tokenizer
from common.registry import Registry
from common.stage import Progress, StageContext
from selection import analysis
from selection.ranking import (
    NORMALIZATIONS,
    SCOPES,
    longattn_score,
    rank_order,
    select_per_domain,
    training_mixture,
)
from selection.score import SCORES_FILE, UNSCORED_METHOD

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.parquet"
EXAMPLES_PER_END = 3


@dataclass
class SelectConfig:
    """`selection` keys the select stage reads."""

    method: str
    alpha: float = 0.5
    """Weight of the uniformity term (paper ablation: 1.0)."""
    normalization: str = "min_max"
    """min_max (authors' code) | zscore (paper Eq. 8)."""
    normalization_scope: str = "domain"
    """domain (the authors normalise each domain's file on its own) | global (over every scored window)."""
    use_uniformity: bool = True
    """False = the paper's "w/o DU_T" ablation."""
    fraction: float | None = 0.5
    """Keep this top fraction of each domain (authors: half). Exclusive with budget_tokens."""
    budget_tokens: float | None = None
    """Or fill this many tokens, split across domains by domain_ratios."""
    domain_ratios: dict[str, float] | None = None
    """Relative shares of the long domains (budget split and training mixture); null = equal."""
    mixture: dict[str, Any] = field(default_factory=lambda: {"long_share": 0.9, "short": {}})

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"selection.normalization={self.normalization}: choose one of {NORMALIZATIONS}")
        if self.normalization_scope not in SCOPES:
            raise ConfigError(
                f"selection.normalization_scope={self.normalization_scope}: choose one of {SCOPES}"
            )
        if self.budget_tokens is not None:
            self.fraction = None
        elif self.fraction is None or not 0 < self.fraction <= 1:
            raise ConfigError(
                f"selection.fraction={self.fraction}: must be in (0, 1], or set selection.budget_tokens"
            )

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SelectConfig:
        sel = OmegaConf.to_container(cfg.selection, resolve=True)
        return cls(**{k: sel[k] for k in cls.__dataclass_fields__ if k in sel})


def check_config(cfg: DictConfig) -> None:
    """Fail on a bad `selection` value before any stage runs, not after hours of scoring."""
    conf = SelectConfig.from_cfg(cfg)
    SCORE_RULES.get(conf.method)


ScoreRule = Callable[[pa.Table, SelectConfig], np.ndarray]
SCORE_RULES: Registry[ScoreRule] = Registry("selection score rule")


@SCORE_RULES.register("longattn")
def _longattn_rule(table: pa.Table, conf: SelectConfig) -> np.ndarray:
    return longattn_score(
        table.column("ds").to_numpy(),
        table.column("variance").to_numpy(),
        conf.alpha,
        conf.normalization,
        conf.use_uniformity,
        table.column("domain").to_pylist() if conf.normalization_scope == "domain" else None,
    )


def _column_rule(column: str) -> ScoreRule:
    """Rivals: their statistic as is, higher is better (ranking within a domain needs no normalisation, so
    `normalization_scope` changes nothing for them)."""
    return lambda table, conf: table.column(column).to_numpy().astype(np.float64)


SCORE_RULES.add("ladm", _column_rule("cds"))
SCORE_RULES.add("prolong", _column_rule("lds"))
SCORE_RULES.add("random", _column_rule("u"))
# beyond the paper: each scorer's `rank_column` (tests/test_context_scorers.py checks they agree)
SCORE_RULES.add("longppl", _column_rule("key_fraction"))
SCORE_RULES.add("longfilter", _column_rule("kl_gain"))
SCORE_RULES.add("ppl_gain", _column_rule("ppl_gain"))
SCORE_RULES.add("compression", _column_rule("incompressibility"))
# selection=all: no scorer; every window scores 0, so ranks follow the window ids and fraction 1.0 keeps all
SCORE_RULES.add(UNSCORED_METHOD, lambda table, conf: np.zeros(table.num_rows))


def stage_inputs(cfg: DictConfig) -> tuple[str, ...]:
    """The select stage's inputs: selection=all reads only the prepared windows (no score artifact)."""
    return ("prepare",) if cfg.selection.method == UNSCORED_METHOD else ("prepare", "score")


def read_scores(score_dir: Path) -> pa.Table:
    path = Path(score_dir) / SCORES_FILE
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; re-run the score stage")
    return pq.read_table(path)


def read_window_index(prepare_dir: Path) -> pa.Table:
    """`id, domain, n_tokens` of every prepared window, sorted by id (what an unscored selection ranks)."""
    shards = sorted(Path(prepare_dir).glob("windows-*.parquet"))
    if not shards:
        raise MissingInputError(f"{prepare_dir}: no windows-*.parquet; re-run the prepare stage")
    tables = [pq.read_table(s, columns=["id", "domain", "n_tokens"]) for s in shards]
    return pa.concat_tables(tables).sort_by("id")


def window_decoder(prepare_dir: Path, wanted: set[str], tokenizer) -> Callable[[str], str]:
    """Decode only the windows the examples need, reading their shards once."""
    texts: dict[str, str] = {}
    for shard in sorted(Path(prepare_dir).glob("windows-*.parquet")):
        table = pq.read_table(shard, columns=["id", "input_ids"])
        for i, window_id in enumerate(table.column("id").to_pylist()):
            if window_id in wanted:
                texts[window_id] = tokenizer.decode(table.column("input_ids")[i].as_py())
    return lambda window_id: texts[window_id]


SELECTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("score", pa.float64()),
        ("rank", pa.int64()),
        ("n_tokens", pa.int64()),
    ]
)


def write_selection(path: Path, ids, domains, n_tokens, scores, chosen: dict[str, list[int]]) -> int:
    """The selection contract, domain by domain in rank order; returns the number of rows."""
    rows = [
        {"id": ids[i], "domain": d, "score": float(scores[i]), "rank": r + 1, "n_tokens": n_tokens[i]}
        for d, order in chosen.items()
        for r, i in enumerate(order)
    ]
    table = pa.Table.from_pylist(rows, schema=SELECTION_SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return len(rows)


def write_analysis(
    out_dir: Path,
    table: pa.Table,
    scores: np.ndarray,
    chosen: dict[str, list[int]],
    decoder: Callable[[set[str]], Callable[[str], str]],
) -> tuple[dict, list[str]]:
    """analysis.md (Table 10 layout), histograms, and the best/worst windows' text per domain."""
    ids = table.column("id").to_pylist()
    domains = table.column("domain").to_pylist()
    selected = np.zeros(len(ids), dtype=bool)
    for order in chosen.values():
        selected[order] = True
    columns = {c: table.column(c).to_numpy() for c in ("ds", "variance") if c in table.column_names}
    columns["score"] = scores
    stats = analysis.domain_statistics(domains, columns)
    atomic_write_text(
        out_dir / "analysis.md", "# Score statistics per domain\n\n" + analysis.statistics_markdown(stats)
    )
    plots = analysis.write_histograms(out_dir, domains, columns, selected)
    ranked = rank_order(ids, scores)
    best_worst = {}
    for domain in sorted(set(domains)):
        mine = [(ids[i], float(scores[i])) for i in ranked if domains[i] == domain]
        best_worst[domain] = (mine[:EXAMPLES_PER_END], mine[-EXAMPLES_PER_END:][::-1])
    wanted = {w for best, worst in best_worst.values() for w, _ in best + worst}
    atomic_write_text(out_dir / "examples.md", analysis.examples_markdown(best_worst, decoder(wanted)))
    return stats, plots


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    conf = SelectConfig.from_cfg(cfg)
    if "score" in ctx.inputs:
        table = read_scores(ctx.inputs["score"].path)
    else:
        table = read_window_index(ctx.inputs["prepare"].path)
    ids = table.column("id").to_pylist()
    domains = table.column("domain").to_pylist()
    n_tokens = table.column("n_tokens").to_pylist()
    scores = SCORE_RULES.get(conf.method)(table, conf)
    chosen = select_per_domain(
        ids, domains, n_tokens, scores, conf.fraction, conf.budget_tokens, conf.domain_ratios
    )
    n_rows = write_selection(ctx.out_dir / SELECTION_FILE, ids, domains, n_tokens, scores, chosen)

    tokens = {d: int(sum(n_tokens[i] for i in order)) for d, order in chosen.items()}
    mixture = training_mixture(
        sorted(set(domains)),
        conf.mixture.get("long_share", 0.9),
        conf.mixture.get("short") or {},
        conf.domain_ratios,
    )
    atomic_write_json(ctx.out_dir / "mixture.json", {**mixture, "selected_tokens": tokens})

    tokenizer = load_tokenizer(cfg.model.name_or_path, ctx.cache_dir)
    stats, plots = write_analysis(
        ctx.out_dir,
        table,
        scores,
        chosen,
        lambda wanted: window_decoder(ctx.inputs["prepare"].path, wanted, tokenizer),
    )
    for domain in sorted(chosen):
        log.info(
            "select: %-8s kept %5d of %5d windows (%s tokens)",
            domain,
            len(chosen[domain]),
            domains.count(domain),
            f"{tokens[domain]:,}",
        )
    return {
        "method": conf.method,
        "windows": n_rows,
        "tokens": int(sum(tokens.values())),
        "per_domain": {
            d: {"windows": len(o), "tokens": tokens[d], "scored": domains.count(d)} for d, o in chosen.items()
        },
        "budget_tokens": conf.budget_tokens,
        "fraction": conf.fraction,
        "statistics": stats,
        "plots": plots,
        "mixture": mixture,
    }


def progress(cfg: DictConfig, out_dir: Path, inputs: dict[str, Path]) -> Progress:
    """Select is not resumable (it takes seconds): the size of its work is the prepared windows."""
    manifest = Path(inputs["prepare"]) / "manifest.json"
    total = json.loads(manifest.read_text())["windows"] if manifest.is_file() else None
    return Progress(0, total, "windows", "selected", f"selection.method={cfg.selection.method}")
