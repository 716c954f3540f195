"""Select stage: normalise scores over the whole scored set, rank, choose per domain, write the selection
contract (`id, domain, score, rank, n_tokens`), the training mixture and the analysis."""

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

from common.atomic import atomic_write, atomic_write_json
from common.model_sources import load_tokenizer
from common.registry import Registry
from common.stage import StageContext
from selection import analysis
from selection.ranking import NORMALIZATIONS, longattn_score, select_per_domain, training_mixture
from selection.score import SCORES_FILE

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
    """min_max (authors' code) | zscore (paper Eq. 8); always over the whole scored set."""
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
            raise ValueError(f"selection.normalization={self.normalization}: choose one of {NORMALIZATIONS}")
        if self.budget_tokens is not None:
            self.fraction = None

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SelectConfig:
        sel = OmegaConf.to_container(cfg.selection, resolve=True)
        return cls(**{k: sel[k] for k in cls.__dataclass_fields__ if k in sel})


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
    )


def _column_rule(column: str) -> ScoreRule:
    """Rivals: their statistic as is, higher is better (ranking within a domain needs no normalisation)."""
    return lambda table, conf: table.column(column).to_numpy().astype(np.float64)


SCORE_RULES.add("ladm", _column_rule("cds"))
SCORE_RULES.add("prolong", _column_rule("lds"))
SCORE_RULES.add("random", _column_rule("u"))


def read_scores(score_dir: Path) -> pa.Table:
    path = Path(score_dir) / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; re-run the score stage")
    return pq.read_table(path)


def window_decoder(prepare_dir: Path, wanted: set[str], tokenizer) -> Callable[[str], str]:
    """Decode only the windows the examples need, reading their shards once."""
    texts: dict[str, str] = {}
    for shard in sorted(Path(prepare_dir).glob("windows-*.parquet")):
        table = pq.read_table(shard, columns=["id", "input_ids"])
        for i, window_id in enumerate(table.column("id").to_pylist()):
            if window_id in wanted:
                texts[window_id] = tokenizer.decode(table.column("input_ids")[i].as_py())
    return lambda window_id: texts[window_id]


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    conf = SelectConfig.from_cfg(cfg)
    table = read_scores(ctx.inputs["score"].path)
    ids = table.column("id").to_pylist()
    domains = table.column("domain").to_pylist()
    n_tokens = table.column("n_tokens").to_pylist()
    scores = SCORE_RULES.get(conf.method)(table, conf)
    chosen = select_per_domain(
        ids, domains, n_tokens, scores, conf.fraction, conf.budget_tokens, conf.domain_ratios
    )

    rows = [
        {"id": ids[i], "domain": d, "score": float(scores[i]), "rank": r + 1, "n_tokens": n_tokens[i]}
        for d, order in chosen.items()
        for r, i in enumerate(order)
    ]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("domain", pa.string()),
            ("score", pa.float64()),
            ("rank", pa.int64()),
            ("n_tokens", pa.int64()),
        ]
    )
    out_table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(ctx.out_dir / SELECTION_FILE, lambda tmp: pq.write_table(out_table, tmp))

    tokens = {d: int(sum(n_tokens[i] for i in order)) for d, order in chosen.items()}
    mixture = training_mixture(
        sorted(set(domains)),
        conf.mixture.get("long_share", 0.9),
        conf.mixture.get("short") or {},
        conf.domain_ratios,
    )
    atomic_write_json(ctx.out_dir / "mixture.json", {**mixture, "selected_tokens": tokens})

    # Analysis beside the artifact.
    selected = np.zeros(len(ids), dtype=bool)
    for order in chosen.values():
        selected[order] = True
    stat_columns = {c: table.column(c).to_numpy() for c in ("ds", "variance") if c in table.column_names}
    stat_columns["score"] = scores
    stats = analysis.domain_statistics(domains, stat_columns)
    analysis.write_text(
        ctx.out_dir / "analysis.md", "# Score statistics per domain\n\n" + analysis.statistics_markdown(stats)
    )
    plots = analysis.write_histograms(ctx.out_dir, domains, stat_columns, selected)
    best_worst = {}
    for domain in sorted(set(domains)):
        ranked = [
            i for i in sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i])) if domains[i] == domain
        ]
        pick = lambda idx: [(ids[i], float(scores[i])) for i in idx]  # noqa: E731
        best_worst[domain] = (pick(ranked[:EXAMPLES_PER_END]), pick(ranked[-EXAMPLES_PER_END:][::-1]))
    wanted = {w for best, worst in best_worst.values() for w, _ in best + worst}
    decode = window_decoder(
        ctx.inputs["prepare"].path, wanted, load_tokenizer(cfg.model.name_or_path, ctx.cache_dir)
    )
    analysis.write_text(ctx.out_dir / "examples.md", analysis.examples_markdown(best_worst, decode))

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
        "windows": len(rows),
        "tokens": int(sum(tokens.values())),
        "per_domain": {
            d: {"windows": len(o), "tokens": tokens[d], "scored": domains.count(d)} for d, o in chosen.items()
        },
        "budget_tokens": conf.budget_tokens,
        "fraction": conf.fraction,
        "statistics": stats,
        "plots": plots,
        "mixture": json.loads(json.dumps(mixture)),
    }
