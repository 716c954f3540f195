"""Run the requested stages in order, reusing every artifact whose fingerprint is already complete."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.accelerator import release_accelerator_memory
from common.artifacts import Artifact, artifact_for
from common.atomic import atomic_write_json
from common.claim_records import ClaimSettings
from common.claims import describe_producer, stage_claim
from common.distributed import rank_info, wait_until
from common.errors import MissingInputError
from common.stage import StageContext
from common.tracking import Tracker, make_tracker
from common.versions import stack_versions
from experiments.stages import STAGES, validate_stages

log = logging.getLogger(__name__)


def flatten_numbers(obj: Any, prefix: str) -> dict[str, float]:
    """Numeric leaves of a manifest as `prefix/a/b` keys for the tracker."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(flatten_numbers(value, f"{prefix}/{key}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    return out


def stage_fingerprints(cfg: DictConfig, upto: list[str]) -> dict[str, str]:
    """Fingerprints of the requested stages and everything upstream of them."""
    fps: dict[str, str] = {}

    def visit(name: str) -> str:
        if name not in fps:
            spec = STAGES[name]
            fps[name] = spec.fingerprint(cfg, {i: visit(i) for i in spec.input_names(cfg)})
        return fps[name]

    for name in upto:
        visit(name)
    return fps


def upstream_index(artifacts_dir: Path, fps: dict[str, str], requested: list[str]) -> dict[str, str]:
    """The complete artifacts this config's requested stages build on but do not run, so that a run
    directory made by `stages=[report]` (or `[evaluate]`) still records what its results come from."""
    index = {}
    for name, fp in fps.items():
        art = artifact_for(artifacts_dir, name, fp)
        if name not in requested and art.is_complete():
            index[name] = str(art.path)
    return index


def run_stage(
    cfg: DictConfig, name: str, art: Artifact, inputs: dict[str, Artifact], tracker: Tracker
) -> dict:
    """Run one stage into its artifact directory, or reuse it if its manifest says it is complete."""
    spec = STAGES[name]
    if art.is_complete():
        manifest = art.read_manifest()
        log.info(
            "%s: reused artifact %s (fingerprint %s, produced by %s); nothing to do",
            *(name, art.path, art.fingerprint, describe_producer(manifest)),
        )
        return manifest
    ranks = rank_info()
    if not ranks.is_main and not spec.distributed:
        log.info("%s: rank %d waits for rank 0 to write %s", name, ranks.rank, art.path)
        wait_until(art.is_complete, f"rank 0 to complete {art.path}")
        return art.read_manifest()
    run_dir = str(Path(cfg.paths.output_dir).expanduser().resolve())
    claim = stage_claim(art.path, run_dir, claim_settings(cfg), art.is_complete, f"{name} {art.path}")
    if claim is None:  # another run held the claim and completed the artifact while this one waited
        manifest = art.read_manifest()
        log.info("%s: reused artifact %s, produced by %s", name, art.path, describe_producer(manifest))
        return manifest
    with claim:
        log.info("%s: running into %s", name, art.path)
        ctx = StageContext(
            out_dir=art.path, inputs=inputs, cache_dir=Path(cfg.paths.cache_dir), tracker=tracker
        )
        started = time.time()
        manifest = spec.run(cfg, ctx)
        if manifest is None:  # a non-zero rank of a distributed stage: rank 0 merges and writes the manifest
            wait_until(art.is_complete, f"rank 0 to merge {art.path}")
            return art.read_manifest()
        claim.check()  # a run that lost its claim leaves the artifact to the one that took it over
        manifest = art.write_manifest(
            {
                **manifest,
                "seconds": round(time.time() - started, 3),
                "inputs": {k: str(v.path) for k, v in inputs.items()},
                "config": spec.resolved_config(cfg),
                "versions": stack_versions(),
                "produced_by": claim.record.producer() if claim.record else None,
            }
        )
    tracker.log_metrics(flatten_numbers({k: v for k, v in manifest.items() if k != "produced_by"}, name))
    return manifest


def claim_settings(cfg: DictConfig) -> ClaimSettings:
    """The `pipeline` group's claim keys (they decide how runs share stages, never what a stage writes)."""
    node = cfg.get("pipeline")
    return ClaimSettings.from_mapping(
        OmegaConf.to_container(node, resolve=True) if node is not None else None
    )


def preflight(cfg: DictConfig) -> dict[str, str]:
    """What can be checked before any stage runs: the stage names, the pipeline keys, every requested
    stage's config, and the fingerprints, which read the inputs' signatures (a data source that matches
    no file fails here). run.py calls it once before starting a multi-process job, so a typo gives one
    line, not one per rank. Returns the fingerprints of the requested stages and their upstream."""
    requested = validate_stages(list(cfg.stages))
    claim_settings(cfg)  # a bad pipeline.* value fails now, not when a stage is reached
    for name in requested:  # every requested stage's config, before the first one runs
        STAGES[name].check_config(cfg)
    return stage_fingerprints(cfg, requested)


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Returns {stage: manifest}; writes artifacts.json (stage -> artifact dir, the requested stages' and the
    complete upstream ones they build on) into the run directory."""
    fps = preflight(cfg)
    requested = validate_stages(list(cfg.stages))
    artifacts_dir = Path(cfg.paths.artifacts_dir).expanduser().resolve()
    run_dir = Path(cfg.paths.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    main = rank_info().is_main
    logger_cfg = cfg.get("logger") if main else None  # log from rank 0 only
    tracker = make_tracker(
        logger_cfg, str(run_dir), {**OmegaConf.to_container(cfg, resolve=True), "versions": stack_versions()}
    )
    index = upstream_index(artifacts_dir, fps, requested)
    manifests: dict[str, Any] = {}
    try:
        for name in requested:
            STAGES[name].check_implemented()
            if reason := STAGES[name].skip_reason(cfg):
                log.info("%s: skipped: %s", name, reason)
                continue
            inputs: dict[str, Artifact] = {}
            for upstream in STAGES[name].input_names(cfg):
                art = artifact_for(artifacts_dir, upstream, fps[upstream])
                if not art.is_complete():
                    raise MissingInputError(
                        f"stage '{name}' needs the '{upstream}' artifact {art.path}, which does not exist for "
                        f"this config; add '{upstream}' to stages (e.g. stages=[{upstream},{name}])"
                    )
                inputs[upstream] = art
            if main:  # before the stage runs: the report stage reads its run's index
                atomic_write_json(run_dir / "artifacts.json", index)
            art = artifact_for(artifacts_dir, name, fps[name])
            manifests[name] = run_stage(cfg, name, art, inputs, tracker)
            if released := release_accelerator_memory():  # the next stage starts with a free GPU
                log.info(
                    "%s: CUDA cache released (%.2f -> %.2f GiB reserved)",
                    name,
                    released["reserved_gib_before"],
                    released["reserved_gib_after"],
                )
            index[name] = str(art.path)
            if main:
                atomic_write_json(run_dir / "artifacts.json", index)
        tracker.log_summary({f"artifacts/{k}": v for k, v in index.items()})
    finally:
        tracker.finish()
    return manifests
