"""Multi-process launch: `python run.py ... training.num_gpus=8` (or, without a train stage,
`evaluation.num_gpus=8`) re-runs itself under torchrun or the deepspeed launcher, one process per GPU,
all writing to the same run directory.

The children get the job's own overrides (not a sweep's `-m` arguments) and LONGATTN_RUN_DIR, so every
rank resolves the same Hydra run directory. Stages synchronise through the artifact directory: prepare
and select run on rank 0 while the others wait, score shards windows by rank, train runs on every rank,
evaluate shards each suite's prompts by rank (lm-eval's data parallelism) and writes on rank 0.

Multi-node, the documented path: torchrun, ONE command per node (SLURM: one task per node), joined by a
c10d rendezvous at MASTER_ADDR:MASTER_PORT; node ranks are assigned by the rendezvous. Every node needs
the same LONGATTN_RUN_DIR (on the shared filesystem), which also names the rendezvous unless
SLURM_JOB_ID or LONGATTN_RDZV_ID does.

The DeepSpeed runner (`training.launcher=deepspeed`) is the other way: run ONCE, on the first host of a
hostfile (`training.hostfile`); it starts every node itself over ssh (pdsh). It forwards only some
environment variables, so the ones the job needs are written to `<run dir>/.deepspeed_env` (mode 0600:
it may hold HF_TOKEN / WANDB_API_KEY) and handed to it as DS_ENV_FILE.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_text
from common.distributed import rank_info
from common.errors import ConfigError, UserError

DEFAULT_PORT = "29500"
ERROR_DIR = ".launch_errors"
"""Under the run directory: one file per rank of a relaunched job that stopped on a user error."""
ERROR_DIR_ENV = "LONGATTN_ERROR_DIR"
DEEPSPEED_ENV_FILE = ".deepspeed_env"
# Variables a remote rank needs (prefixes); the DeepSpeed runner itself forwards only PYTHON*, NCCL*, UCX*...
FORWARDED_ENV_PREFIXES = (
    "LONGATTN_",
    "HF_",
    "HUGGING_FACE_",
    "TRANSFORMERS_",
    "WANDB_",
    "TORCH_EXTENSIONS_DIR",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "PYTORCH_",
    "CUBLAS_WORKSPACE_CONFIG",
    "FLASH_ATTENTION_DETERMINISTIC",
    "TRITON_",
)


@dataclass(frozen=True)
class Launch:
    """What `training.*` (or `evaluation.num_gpus`) says about the processes to start."""

    launcher: str
    num_gpus: int
    num_nodes: int = 1
    hostfile: str | None = None
    source: str = "training"
    """The config group whose keys set it (named in errors): training or evaluation."""
    device: str = "auto"
    """That group's `device`: cpu starts CPU processes (gloo) on purpose."""


DETERMINISTIC_CUBLAS = ":4096:8"
EVALUATE_STAGES = ("evaluate", "evaluate_base")


def process_environment(cfg: Mapping) -> dict[str, str]:
    """Variables the process needs before CUDA starts. `training.deterministic` needs cuBLAS's fixed
    workspace (CUBLAS_WORKSPACE_CONFIG), which cuBLAS reads when its first handle is created: in a
    pipeline that already scored on the GPU, setting it at the train stage would be too late. A value the
    user set is kept."""
    training = cfg.get("training") or {}
    if training.get("deterministic") and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        return {"CUBLAS_WORKSPACE_CONFIG": DETERMINISTIC_CUBLAS}
    return {}


def job_launch(training: Mapping, evaluation: Mapping, stages: Sequence[str]) -> Launch:
    """The processes one job runs all its stages on: training's when `train` is requested (evaluate then
    uses every rank of it), else `evaluation.num_gpus` torchrun processes on this node when an evaluate
    stage is, else one."""
    eval_gpus = int(evaluation.get("num_gpus", 1))
    if "train" in stages:
        launch = Launch(
            training.launcher,
            training.num_gpus,
            training.num_nodes,
            training.get("hostfile"),
            source="training",
            device=str(training.get("device", "auto")),
        )
        if (
            eval_gpus > 1
            and eval_gpus != launch.num_gpus * launch.num_nodes
            and set(EVALUATE_STAGES) & set(stages)
        ):
            raise ConfigError(
                f"evaluation.num_gpus={eval_gpus} with training.num_gpus={launch.num_gpus} x training.num_nodes="
                f"{launch.num_nodes}: a job runs all its stages on the same processes, so evaluate uses "
                "training's; leave evaluation.num_gpus=1 or evaluate in its own command (stages=[evaluate])"
            )
        return launch
    device = str(evaluation.get("device", "auto"))
    if set(EVALUATE_STAGES) & set(stages):
        return Launch("torchrun", eval_gpus, source="evaluation", device=device)
    return Launch("torchrun", 1, source="evaluation", device=device)


def needs_launch(launch: Launch, env: Mapping[str, str]) -> bool:
    """More than one process is asked for and no launcher started us."""
    return launch.num_gpus * launch.num_nodes > 1 and "WORLD_SIZE" not in env


def rendezvous_id(env: Mapping[str, str]) -> str:
    """The same on every node of one job: LONGATTN_RDZV_ID, SLURM_JOB_ID, or a hash of the run dir."""
    if env.get("LONGATTN_RDZV_ID"):
        return env["LONGATTN_RDZV_ID"]
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    return "run-" + hashlib.sha1(env["LONGATTN_RUN_DIR"].encode()).hexdigest()[:12]


def torchrun_command(
    launch: Launch, script: str, overrides: Sequence[str], env: Mapping[str, str]
) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch.num_gpus}"]
    if launch.num_nodes == 1:
        return [*cmd, "--standalone", script, *overrides]
    missing = [k for k in ("MASTER_ADDR", "LONGATTN_RUN_DIR") if not env.get(k)]
    if missing:
        raise ConfigError(
            f"training.num_nodes={launch.num_nodes}: set {' and '.join(missing)} on every node (MASTER_ADDR: "
            "the first node's address; LONGATTN_RUN_DIR: one run directory on the shared filesystem)"
        )
    return [
        *cmd,
        f"--nnodes={launch.num_nodes}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={env['MASTER_ADDR']}:{env.get('MASTER_PORT') or DEFAULT_PORT}",
        f"--rdzv_id={rendezvous_id(env)}",
        script,
        *overrides,
    ]


def deepspeed_command(launch: Launch, script: str, overrides: Sequence[str]) -> list[str]:
    cmd = ["deepspeed", f"--num_gpus={launch.num_gpus}", f"--num_nodes={launch.num_nodes}"]
    if launch.num_nodes > 1:
        if not launch.hostfile or not Path(launch.hostfile).is_file():
            raise ConfigError(
                f"training.launcher=deepspeed with training.num_nodes={launch.num_nodes} needs "
                f"training.hostfile=<file with 'host slots={launch.num_gpus}' lines> (got {launch.hostfile}); "
                "run the command once, on the first host. Or use training.launcher=torchrun on every node"
            )
        cmd.append(f"--hostfile={Path(launch.hostfile).resolve()}")
    return [*cmd, "--no_local_rank", script, *overrides]


def launch_command(
    launch: Launch, script: str, overrides: Sequence[str], env: Mapping[str, str]
) -> list[str]:
    if launch.launcher == "torchrun":
        return torchrun_command(launch, script, overrides, env)
    if launch.launcher == "deepspeed":
        return deepspeed_command(launch, script, overrides)
    raise ConfigError(f"training.launcher={launch.launcher}: choose torchrun or deepspeed")


def forwarded_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables the job needs on remote ranks (single-line values only: the file is KEY=VALUE lines)."""
    return {k: v for k, v in sorted(env.items()) if k.startswith(FORWARDED_ENV_PREFIXES) and "\n" not in v}


def write_deepspeed_env(run_dir: Path, env: Mapping[str, str]) -> Path:
    """`<run_dir>/.deepspeed_env` (0600), read by the DeepSpeed runner through DS_ENV_FILE."""
    path = Path(run_dir) / DEEPSPEED_ENV_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{k}={v}\n" for k, v in forwarded_env(env).items())
    return path


class LaunchedUserError(UserError):
    """A rank of the relaunched job stopped on a user error; its message is the parent's one line."""


def visible_cuda_devices() -> int:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES applied); counting creates no context."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(launch: Launch, visible: int, env: Mapping[str, str]) -> None:
    """Refuse more processes per node than GPUs before starting any: each rank takes `cuda:<local
    rank>`, so rank `visible` would crash after the job's start-up (or, with no GPU at all, every rank
    would run on the CPU). `<group>.device=cpu` starts CPU processes (gloo) deliberately."""
    if launch.device == "cpu" or launch.num_gpus <= 1 or launch.num_gpus <= visible:
        return
    shown = env.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={shown!r}" if shown is not None else "CUDA_VISIBLE_DEVICES unset"
    key = f"{launch.source}.num_gpus"
    raise ConfigError(
        f"{key}={launch.num_gpus}: this machine shows {visible} CUDA device(s) ({where}); set "
        f"{key}={max(visible, 1)} (processes per node), or {launch.source}.device=cpu to start "
        f"{launch.num_gpus} CPU processes (gloo)"
    )


def report_user_error(message: str, env: Mapping[str, str] = os.environ) -> None:
    """`error: <message>` on stderr; in a rank of our relaunch, the message goes to the run directory
    instead, and the parent prints it once for the whole job (not once per rank)."""
    folder = env.get(ERROR_DIR_ENV)
    if folder and "RANK" in env:
        atomic_write_text(Path(folder) / f"rank-{int(env['RANK']):05d}.txt", message)
        return
    print(f"error: {message}", file=sys.stderr, flush=True)


def first_user_error(folder: Path) -> str | None:
    """The lowest rank's user error written by `report_user_error`, if any rank wrote one."""
    files = sorted(Path(folder).glob("rank-*.txt")) if Path(folder).is_dir() else []
    return files[0].read_text(encoding="utf-8") if files else None


class _QuietWhenUserError(logging.Filter):
    """Drops torchrun's "failed (exitcode: 2)" record when that failure is a reported user error."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return first_user_error(self.folder) is None


def run_torchrun_here(args: Sequence[str], errors: Path) -> int:
    """torchrun's own `run` in this process (the agent, its rendezvous and workers as the command
    `python -m torch.distributed.run <args>` would start them), so that a worker's user error ends as
    one line instead of the agent's ChildFailedError traceback. Returns the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    quiet = _QuietWhenUserError(errors)
    agent_log.addFilter(quiet)
    try:
        torchrun.run(torchrun.parse_args(list(args)))
    except ChildFailedError as exc:
        if first_user_error(errors) is None:  # a bug in a worker: torchrun's report, as torchrun prints it
            print(exc.format_msg(), file=sys.stderr, flush=True)
        return 1
    finally:
        agent_log.removeFilter(quiet)
    return 0


def relaunch(launch: Launch, script: str, run_dir: str, overrides: Sequence[str]) -> int:
    """Run the job under the launcher and wait; returns its exit code, or raises LaunchedUserError with
    the first rank's message when a rank stopped on a user error."""
    assert rank_info().world_size == 1
    cmd = launch_command(launch, script, overrides, os.environ)  # multi-node checks the user's variables
    errors = Path(run_dir) / ERROR_DIR
    shutil.rmtree(errors, ignore_errors=True)
    job_env = {"LONGATTN_RUN_DIR": run_dir, ERROR_DIR_ENV: str(errors)}
    print("launching:", " ".join(cmd), flush=True)
    if launch.launcher == "torchrun":
        saved = {k: os.environ.get(k) for k in job_env}
        os.environ.update(job_env)  # the agent starts its workers with this process's environment
        try:
            code = run_torchrun_here(cmd[3:], errors)  # cmd = [python, -m, torch.distributed.run, *args]
        finally:  # a sweep's next member must not inherit this job's run directory
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    else:
        env = {**os.environ, **job_env}
        if launch.num_nodes > 1:  # the runner starts remote ranks over ssh
            env["DS_ENV_FILE"] = str(write_deepspeed_env(Path(run_dir), env).resolve())
        code = subprocess.call(cmd, env=env)
    if code and (message := first_user_error(errors)):
        raise LaunchedUserError(message)
    return code
