"""The dry run (`pipeline.dry_run=true`): each requested stage's fingerprint and state, with nothing run.

States: complete (reused as it is), claimed (another run computes it now: this run would wait and reuse it),
partial (a killed run left finished parts: this run would resume from them), to run; plus skipped and
blocked (an input that is neither complete nor requested). Each comes with the size of the work where the
stage can tell it (`PROGRESS`). It reads the artifact directories and writes nothing: no artifact, no claim,
no `artifacts.json`, no tracker run.

Under `-m` with Hydra's basic launcher the members run one after another in this process, so a later
member is told which earlier member of the sweep computes a stage they share (`_FIRST_MEMBER`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from common.artifacts import artifact_for
from common.claim_records import ClaimSettings
from common.claims import describe_producer, inspect_claim
from common.errors import UserError
from common.stage import Progress
from experiments.pipeline import claim_settings, stage_fingerprints
from experiments.stages import STAGES, validate_stages

PROGRESS = {
    "prepare": "selection.prepare:progress",
    "score": "selection.score:progress",
    "select": "selection.select:progress",
    "train": "training.checkpoints:progress",
    "evaluate": "evaluation.stage:progress",
    "evaluate_base": "evaluation.stage:progress",
}
"""Stage -> "module:function" (cfg, artifact dir, {input: artifact dir}) -> Progress, reading only."""

_FIRST_MEMBER: dict[str, str] = {}
"""Artifact directory -> the first member of this process's multirun whose dry run found it to compute."""


@dataclass(frozen=True)
class StagePlan:
    stage: str
    fingerprint: str
    path: Path
    state: str
    """complete | claimed | partial | to run | skipped | blocked | not implemented"""
    detail: str

    def line(self) -> str:
        return f"  {self.stage:<13} {self.fingerprint}  {self.state}" + (
            f": {self.detail}" if self.detail else ""
        )


def probe(name: str, cfg: DictConfig, path: Path, inputs: dict[str, Path]) -> Progress | str | None:
    """The stage's progress, or why it cannot be told (a config the real run would refuse too)."""
    if name not in PROGRESS:
        return None
    module, func = PROGRESS[name].split(":")
    try:
        return getattr(importlib.import_module(module), func)(cfg, path, inputs)
    except UserError as exc:
        return f"size unknown: {exc}"


def _pending(
    name: str,
    cfg: DictConfig,
    path: Path,
    inputs: dict[str, Path],
    member: str | None,
    settings: ClaimSettings,
) -> tuple[str, str]:
    """(state, detail) of a stage whose artifact is not complete: claimed, partial or to run."""
    claim = inspect_claim(path, settings)
    progress = probe(name, cfg, path, inputs)
    done = progress.describe() if isinstance(progress, Progress) else (progress or "")
    if claim.holder is not None and claim.gone is None:
        return "claimed", f"{claim.describe()}; this run would wait and reuse it; {done}".rstrip("; ")
    left = f"; {claim.describe()}, so the next run takes it over" if claim.holder is not None else ""
    if isinstance(progress, Progress) and progress.done > 0:
        return "partial", f"{done}; the next run resumes from them{left}"
    first = _FIRST_MEMBER.setdefault(str(path), member) if member else None
    shared = (
        f"; computed by {first} of this sweep, this member would wait and reuse it" if first != member else ""
    )
    size = progress.size() if isinstance(progress, Progress) else (progress or "")
    return "to run", f"{size}{shared}{left}".lstrip("; ")


def plan_stages(cfg: DictConfig, member: str | None = None) -> list[StagePlan]:
    """What a run of `cfg` would do per requested stage (`member` names it within a multirun)."""
    requested = validate_stages(list(cfg.stages))
    settings = claim_settings(cfg)
    for name in requested:
        STAGES[name].check_config(cfg)
    artifacts_dir = Path(cfg.paths.artifacts_dir).expanduser().resolve()
    fps = stage_fingerprints(cfg, requested)
    plans: list[StagePlan] = []
    runnable: set[str] = set()  # requested stages whose artifact this run would have
    for name in requested:
        spec = STAGES[name]
        art = artifact_for(artifacts_dir, name, fps[name])

        def plan(state: str, detail: str, name=name, art=art) -> None:
            plans.append(StagePlan(name, art.fingerprint, art.path, state, detail))

        if spec.runner is None:
            plan("not implemented", spec.pending or "see the project's open issues")
            continue
        if reason := spec.skip_reason(cfg):
            plan("skipped", reason)
            continue
        inputs = {u: artifact_for(artifacts_dir, u, fps[u]) for u in spec.input_names(cfg)}
        missing = [u for u, a in inputs.items() if not a.is_complete() and u not in runnable]
        if art.is_complete():
            plan("complete", f"reusable as it is; produced by {describe_producer(art.read_manifest())}")
        elif missing:
            plan(
                "blocked", f"needs the {', '.join(missing)} artifact, which is neither complete nor requested"
            )
            continue
        else:
            plan(*_pending(name, cfg, art.path, {u: a.path for u, a in inputs.items()}, member, settings))
        runnable.add(name)
    return plans


def dry_run_report(cfg: DictConfig, member: str | None = None) -> str:
    """The text the dry run prints."""
    where = Path(cfg.paths.artifacts_dir).expanduser().resolve()
    head = f"dry run{f' of {member}' if member else ''}: nothing is run or written (artifacts: {where})"
    return "\n".join([head, *(p.line() for p in plan_stages(cfg, member))])
