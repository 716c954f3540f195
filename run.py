"""Entry point: `python run.py [group=option ...] [key=value ...]` (see README)."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from common.errors import USER_ERROR_EXIT_CODE, UserError
from experiments.dry_run import dry_run_report
from experiments.launch import (
    check_devices,
    job_launch,
    needs_launch,
    process_environment,
    relaunch,
    report_user_error,
    visible_cuda_devices,
)
from experiments.pipeline import preflight, run_pipeline


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
        report_user_error(str(exc))  # a rank of a relaunched job leaves it to the parent: one line per job
        sys.exit(USER_ERROR_EXIT_CODE)


def run(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    if cfg.pipeline.dry_run:  # before any launch: it runs nothing, writes nothing
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        member = f"member #{hydra_cfg.job.num}" if multirun else None  # Hydra logs each member's overrides
        print(dry_run_report(cfg, member), flush=True)
        return None
    os.environ.update(process_environment(cfg))  # before anything initialises CUDA (cuBLAS reads it once)
    launch = job_launch(cfg.training, cfg.evaluation, list(cfg.stages))
    if needs_launch(launch, os.environ):
        check_devices(launch, visible_cuda_devices(), os.environ)
        preflight(cfg)  # config and inputs once here, not once per rank after the job started
        code = relaunch(
            launch, os.path.abspath(__file__), hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task)
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
