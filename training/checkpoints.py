"""Step checkpoints: `checkpoints/step-{N}/` (DeepSpeed engine, optimizer and scheduler state) plus a
`complete.json` written last by rank 0. Only a checkpoint with that marker is ever resumed from, so a
run killed while saving resumes from the previous one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from common.atomic import atomic_write_json
from common.stage import Progress
from training.config import TrainConfig
from training.schedule import plan_steps

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_FILE = "complete.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_tag(step: int) -> str:
    return f"step-{step}"


def complete_steps(root: Path) -> list[int]:
    """Steps with a complete checkpoint under root/checkpoints, ascending."""
    base = Path(root) / CHECKPOINTS_DIR
    if not base.is_dir():
        return []
    steps = []
    for child in base.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / COMPLETE_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_complete(root: Path) -> int | None:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def mark_complete(root: Path, step: int, state: dict[str, Any]) -> None:
    atomic_write_json(Path(root) / CHECKPOINTS_DIR / step_tag(step) / COMPLETE_FILE, {"step": step, **state})


def read_state(root: Path, step: int) -> dict[str, Any]:
    return json.loads((Path(root) / CHECKPOINTS_DIR / step_tag(step) / COMPLETE_FILE).read_text())


def prune(root: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest
    complete one (left by a killed save); returns the deleted steps."""
    steps = complete_steps(root)
    if not steps:
        return []
    newest = steps[-1]
    doomed = set(steps[:-keep])
    base = Path(root) / CHECKPOINTS_DIR
    for child in base.iterdir():
        match = STEP_DIR.match(child.name)
        if match and int(match.group(1)) < newest and int(match.group(1)) not in steps:
            doomed.add(int(match.group(1)))
    for step in sorted(doomed):
        shutil.rmtree(base / step_tag(step), ignore_errors=True)
    return sorted(doomed)


def progress(cfg: DictConfig, out_dir: Path, inputs: dict[str, Path]) -> Progress:
    """Steps up to the latest complete checkpoint (a killed run resumes there) of the planned steps."""
    conf = TrainConfig.from_cfg(cfg)
    world = conf.num_gpus * conf.num_nodes
    steps = plan_steps(
        conf.budget_tokens, conf.global_batch_tokens, conf.seq_len, conf.micro_batch, world
    ).steps
    total = min(steps, conf.max_steps) if conf.max_steps else steps
    detail = f"{conf.global_batch_tokens:,} tokens per step on {world} rank(s)"
    return Progress(latest_complete(out_dir) or 0, total, "steps", "checkpointed", detail)
