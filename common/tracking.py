"""Experiment tracking: wandb behind a do-nothing interface, so no run ever blocks or fails on it.

wandb runs offline unless an API key is configured (WANDB_API_KEY or a netrc entry) or
`logger.mode=online`. Any wandb failure is logged as a warning and tracking is switched off for the run.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker; also the interface the wandb tracker implements."""

    enabled = False

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...

    def log_summary(self, metrics: Mapping[str, Any]) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def finish(self) -> None: ...


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None) -> str:
    """`online` only when asked for or a key exists; WANDB_MODE in the environment wins (e.g. tests)."""
    if env := os.environ.get("WANDB_MODE"):
        return env
    if requested in ("online", "offline", "disabled"):
        return requested
    return "online" if _has_wandb_key() else "offline"


class WandbTracker(Tracker):
    enabled = True

    def __init__(self, run: Any) -> None:
        self._run = run

    def _safely(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # wandb must never fail a run
            log.warning("wandb %s failed (%s); tracking disabled for this run", what, exc)
            self.enabled = False

    def log_config(self, config: Mapping[str, Any]) -> None:
        if self.enabled:
            self._safely("config", self._run.config.update, dict(config), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.enabled:
            self._safely("log", self._run.log, dict(metrics), step=step)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        if self.enabled:
            self._safely("summary", self._run.summary.update, dict(metrics))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.enabled:
            import wandb

            self._safely("table", self._run.log, {key: wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        if self.enabled:
            self._safely("finish", self._run.finish)
            self.enabled = False


def make_tracker(
    logger_cfg: Mapping[str, Any] | None, run_dir: str | None = None, config: Mapping | None = None
) -> Tracker:
    """Build the configured tracker; `logger=none` (or `name: none`) gives the no-op one."""
    if not logger_cfg or logger_cfg.get("name", "none") == "none":
        return Tracker()
    mode = wandb_mode(logger_cfg.get("mode"))
    if mode == "disabled":
        return Tracker()
    try:
        import wandb

        run = wandb.init(
            project=logger_cfg.get("project", "longattn"),
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group"),
            name=logger_cfg.get("run_name"),
            tags=list(logger_cfg.get("tags") or []),
            dir=run_dir,
            mode=mode,
            config=dict(config or {}),
            settings=wandb.Settings(init_timeout=float(logger_cfg.get("init_timeout", 60)), silent=True),
            reinit="finish_previous",
        )
    except Exception as exc:
        log.warning("wandb could not start (%s); continuing without tracking", exc)
        return Tracker()
    log.info("wandb %s run in %s", mode, getattr(run, "dir", run_dir))
    return WandbTracker(run)
