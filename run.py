"""Entry point: `python run.py [group=option ...] [key=value ...]` (see README)."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from common.errors import USER_ERROR_EXIT_CODE, UserError
from experiments.launch import job_launch, needs_launch, relaunch
from experiments.pipeline import run_pipeline


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """A user error (bad record, missing file, bad config value, missing offline data) ends the run with
    one line, `error: <message>`, and exit status 2; `HYDRA_FULL_ERROR=1` shows its traceback. A program
    bug keeps its traceback (Hydra prints it)."""
    try:
        return run(cfg)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)


def run(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    launch = job_launch(cfg.training, cfg.evaluation, list(cfg.stages))
    if needs_launch(launch, os.environ):
        code = relaunch(
            launch,
            os.path.abspath(__file__),
            hydra_cfg.runtime.output_dir,
            list(hydra_cfg.overrides.task),
        )
        if code:
            sys.exit(code)
        return None
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.get("logger") and not cfg.logger.get("group"):
        with open_dict(cfg):  # W&B: the members of one sweep form one group
            cfg.logger.group = os.path.basename(os.path.normpath(hydra_cfg.sweep.dir))
    manifests = run_pipeline(cfg)
    metric = cfg.get("optimized_metric")
    if metric:  # for sweepers: "stage.key" in the manifests
        stage, key = metric.split(".", 1)
        return manifests.get(stage, {}).get(key)
    return None


if __name__ == "__main__":
    main()
