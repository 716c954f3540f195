"""The train stage: continual pre-training on the selection mixed with short data (SPEC section 5).

Reads the prepare stage's windows, the select stage's selection and mixture; writes into its artifact
directory `data/` (sequence pools), `checkpoints/step-N/`, `metrics.jsonl` and `model/` (HF format).
Every rank runs it; rank 0 builds the pools while the others wait, and writes the manifest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_write_json
from common.corpus import SourceSpec, source_signature
from common.distributed import rank_info, wait_until
from common.model_sources import load_tokenizer
from common.stage import StageContext
from training.config import TrainConfig
from training.data import (
    MixturePlan,
    MixtureSequences,
    TrainingDataError,
    build_long_pool,
    build_short_pool,
    plan_mixture,
)
from training.loop import TrainJob, train
from training.schedule import plan_steps

log = logging.getLogger(__name__)

DATA_DIR = "data"
POOLS_FILE = "pools.json"


def short_specs(conf: TrainConfig, name: str, share: float) -> list[SourceSpec]:
    entries = conf.short_sources.get(name)
    if not entries:
        raise TrainingDataError(
            f"selection.mixture.short.{name}={share} but training.short_sources has no '{name}' entry: "
            f"add training.short_sources.{name}=[{{path: ..., format: jsonl}}], or set the share to 0"
        )
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "domain" in entry:
            raise TrainingDataError(
                f"training.short_sources.{name}[{i}] must be a mapping like {{path: wiki.jsonl}} "
                "(the source name is its domain)"
            )
        specs.append(SourceSpec(domain=name, **entry))
    return specs


def drawn_short_sources(cfg: DictConfig) -> set[str]:
    """The short sources the mixture draws from (share > 0 in `selection.mixture.short`)."""
    shares = OmegaConf.select(cfg, "selection.mixture.short", default=None) or {}
    return {name for name, share in shares.items() if share and float(share) > 0}


def fingerprint_extras(cfg: DictConfig) -> dict[str, Any]:
    """Sizes and mtimes of the drawn short sources' files (their content decides the packed sequences).
    A source with share 0 is never read, so its files need not exist (cpt_32k lists wiki, github and web;
    a run with github and web at 0 has only wiki's data)."""
    conf = TrainConfig.from_cfg(cfg)
    drawn = drawn_short_sources(cfg)
    return {
        name: [source_signature(SourceSpec(domain=name, **e)) for e in entries]
        for name, entries in sorted(conf.short_sources.items())
        if name in drawn
    }


def build_pools(
    cfg: DictConfig, ctx: StageContext, conf: TrainConfig, mixture: MixturePlan, data_dir: Path
) -> None:
    """One Arrow pool per mixture source, built once (a resumed run reuses the files already there)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    for name in mixture.schedule.names:
        path = data_dir / f"{name}.arrow"
        if path.is_file():
            continue
        if name in mixture.long:
            log.info("train: pooling the selected %s windows", name)
            build_long_pool(
                ctx.inputs["prepare"].path,
                ctx.inputs["select"].path / "selection.parquet",
                name,
                conf.seq_len,
                path,
            )
        else:
            tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path, ctx.cache_dir)
            log.info("train: packing %d sequences of short source %s", mixture.demand[name], name)
            build_short_pool(
                name,
                short_specs(conf, name, mixture.short[name]),
                tokenizer,
                conf.seq_len,
                mixture.demand[name],
                conf.on_bad_record,
                path,
            )


def pools_summary(mixture: MixturePlan, pools: dict[str, Dataset]) -> dict[str, Any]:
    """Per source: share, pool size, sequences drawn and passes over the pool."""
    return {
        name: {
            "share": mixture.shares[name],
            "kind": "long" if name in mixture.long else "short",
            "pool_sequences": len(pools[name]),
            "drawn_sequences": mixture.demand[name],
            "passes": round(mixture.demand[name] / len(pools[name]), 3),
        }
        for name in mixture.schedule.names
    }


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any] | None:
    conf = TrainConfig.from_cfg(cfg)
    ranks = rank_info()
    plan = plan_steps(
        conf.budget_tokens, conf.global_batch_tokens, conf.seq_len, conf.micro_batch, ranks.world_size
    )
    mixture_spec = json.loads((ctx.inputs["select"].path / "mixture.json").read_text())
    mixture = plan_mixture(mixture_spec, plan.steps * (plan.tokens_per_step // conf.seq_len), int(cfg.seed))
    data_dir = ctx.out_dir / DATA_DIR
    if ranks.is_main:
        (data_dir / POOLS_FILE).unlink(missing_ok=True)
        build_pools(cfg, ctx, conf, mixture, data_dir)
    else:  # pools.json is rank 0's "all pools written" marker
        wait_until((data_dir / POOLS_FILE).is_file, f"rank 0 to build the training pools in {data_dir}")
    pools = {name: Dataset.from_file(str(data_dir / f"{name}.arrow")) for name in mixture.schedule.names}
    summary = pools_summary(mixture, pools)
    if ranks.is_main:
        atomic_write_json(data_dir / POOLS_FILE, summary)
    job = TrainJob(
        conf=conf,
        model_name=cfg.model.name_or_path,
        cache_dir=ctx.cache_dir,
        sequences=MixtureSequences(pools, mixture, int(cfg.seed)),
        plan=plan,
        seed=int(cfg.seed),
        out_dir=ctx.out_dir,
        tracker=ctx.tracker,
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    manifest = train(job, resolved)
    if manifest is None:
        return None
    return {**manifest, "mixture": summary}
