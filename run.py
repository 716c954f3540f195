"""Entry point: `python run.py [group=option ...] [key=value ...]` (see README)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.pipeline import run_pipeline


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    manifests = run_pipeline(cfg)
    metric = cfg.get("optimized_metric")
    if metric:  # for sweepers: "stage.key" in the manifests
        stage, key = metric.split(".", 1)
        return manifests.get(stage, {}).get(key)
    return None


if __name__ == "__main__":
    main()
