"""Every config composes; the defaults are what the docs say."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.stages import STAGE_ORDER, validate_stages

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}")
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["data"]["window_size"] > 0
    assert set(cfg.stages) <= set(STAGE_ORDER)


def test_defaults(make_cfg):
    cfg = make_cfg()
    assert cfg.model.name_or_path == "smollm2_135m"
    assert cfg.data.window_size == 1024
    assert [s["format"] for s in cfg.data.sources] == ["python_code", "python_docs"]


def test_paper_setting_uses_32k_windows_and_llama3(make_cfg):
    cfg = make_cfg("experiment=longattn_32k")
    assert cfg.data.window_size == 32768
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert [s["domain"] for s in cfg.data.sources] == ["arxiv", "book", "code"]


def test_debug_tiny_uses_the_tiny_model(make_cfg):
    cfg = make_cfg("debug=tiny")
    assert cfg.model.name_or_path == "tiny_llama" and cfg.data.window_size == 256


def test_cache_dir_honours_env(monkeypatch, make_cfg):
    monkeypatch.setenv("LONGATTN_CACHE_DIR", "/somewhere/cache")
    assert make_cfg().paths.cache_dir == "/somewhere/cache"


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (["prepare", "bogus"], "unknown stage 'bogus'"),
        (["score", "prepare"], "pipeline order"),
        (["prepare", "prepare"], "listed twice"),
    ],
)
def test_stage_lists_are_validated(stages, message):
    with pytest.raises(ValueError, match=message):
        validate_stages(stages)


def test_slurm_launcher_config_composes():
    """hydra/launcher=slurm resolves to the submitit SLURM launcher with our node shape."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize(config_path="../conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "experiment=longattn_32k"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 8 and launcher.tasks_per_node == 1 and launcher.nodes == 1


@pytest.mark.parametrize("names", [("python3",), ("python3", "python3.11")])
def test_makefile_picks_python311_else_python3_and_says_which(tmp_path, names):
    """A fresh machine with only `python3` (3.12 on current Ubuntu) must not be refused."""
    import shutil
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).symlink_to(sys.executable)
    make = shutil.which("make")
    done = subprocess.run(
        [make, "-n", "-B", "install", f"VENV={tmp_path / 'venv'}"],
        cwd=Path(__file__).resolve().parent.parent,
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f'echo "using {bin_dir / names[-1]} (' in done.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("selection.fraction=0", r"selection\.fraction=0: must be in \(0, 1\]"),
        ("selection.scoring.impl=fast", r"selection\.scoring\.impl=fast"),
        ("+selection.scoring.colour=red", r"selection\.scoring: unknown key\(s\) \['colour'\]"),
        ("evaluation.max_length=512", r"exceeds evaluation\.max_length=512"),
        ("data.on_bad_record=ignore", r"data\.on_bad_record=ignore"),
    ],
)
def test_every_requested_stage_is_checked_before_the_first_runs(make_cfg, tmp_path, override, message):
    from common.errors import ConfigError
    from experiments.pipeline import run_pipeline

    cfg = make_cfg("debug=tiny", override)
    with pytest.raises(ConfigError, match=message):
        run_pipeline(cfg)
    assert not (tmp_path / "artifacts").exists()
