"""Multi-process launch: `python run.py ... training.num_gpus=8` re-runs itself under torchrun or the
deepspeed launcher, one process per GPU, all writing to the same run directory.

The children get the job's own overrides (not a sweep's `-m` arguments) and LONGATTN_RUN_DIR, so every
rank resolves the same Hydra run directory. Stages synchronise through the artifact directory: prepare
and select run on rank 0 while the others wait, score shards windows by rank, train runs on every rank.

Multi-node: run the same command on every node with `training.num_nodes=N` and, in the environment,
NODE_RANK, MASTER_ADDR and MASTER_PORT (what SLURM's `srun` wrappers usually export; see README).
With `training.launcher=deepspeed`, a `hostfile` in the working directory is used as DeepSpeed expects.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from common.distributed import rank_info
from common.errors import ConfigError


def needs_launch(num_gpus: int, num_nodes: int, stages: Sequence[str], env: Mapping[str, str]) -> bool:
    """More than one process is asked for, training is requested, and no launcher started us."""
    return num_gpus * num_nodes > 1 and "train" in stages and "WORLD_SIZE" not in env


def launch_command(
    launcher: str,
    num_gpus: int,
    num_nodes: int,
    script: str,
    overrides: Sequence[str],
    env: Mapping[str, str],
) -> list[str]:
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_gpus}"]
        if num_nodes > 1:
            missing = [k for k in ("NODE_RANK", "MASTER_ADDR") if k not in env]
            if missing:
                raise ConfigError(
                    f"training.num_nodes={num_nodes}: set {', '.join(missing)} (and MASTER_PORT) on every node"
                )
            cmd += [
                f"--nnodes={num_nodes}",
                f"--node_rank={env['NODE_RANK']}",
                f"--master_addr={env['MASTER_ADDR']}",
                f"--master_port={env.get('MASTER_PORT', '29500')}",
            ]
        else:
            cmd += ["--standalone"]
        return [*cmd, script, *overrides]
    if launcher == "deepspeed":
        cmd = ["deepspeed", f"--num_gpus={num_gpus}", f"--num_nodes={num_nodes}", "--no_local_rank"]
        if num_nodes > 1 and os.path.isfile("hostfile"):
            cmd.append("--hostfile=hostfile")
        return [*cmd, script, *overrides]
    raise ConfigError(f"training.launcher={launcher}: choose torchrun or deepspeed")


def relaunch(
    launcher: str, num_gpus: int, num_nodes: int, script: str, run_dir: str, overrides: Sequence[str]
) -> int:
    """Run the job under the launcher and wait; returns its exit code."""
    assert rank_info().world_size == 1
    env = {**os.environ, "LONGATTN_RUN_DIR": run_dir}
    cmd = launch_command(launcher, num_gpus, num_nodes, script, overrides, env)
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)
