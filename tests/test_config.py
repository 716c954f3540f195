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


def test_paper_training_defaults(make_cfg):
    """training=cpt_32k: the paper's 64 x 32K global batch, fp32 gradients, ignored boundary targets."""
    t = make_cfg("experiment=longattn_32k").training
    assert t.global_batch_tokens == 64 * 32768 and t.micro_batch == 1 and t.seq_len == 32768
    assert t.grad_accum_dtype == "fp32" and t.grad_reduce_dtype == "fp32"
    assert t.ignore_boundary_targets is True and t.attn_implementation == "auto"


def test_released_data_experiment_trains_on_the_authors_selection(make_cfg):
    """experiment=released_data_32k: the released LongABC-32K rows, every window kept, no scorer."""
    from experiments.pipeline import stage_fingerprints
    from experiments.stages import STAGES

    cfg = make_cfg("experiment=released_data_32k")
    assert cfg.selection.method == "all" and cfg.selection.fraction == 1.0
    assert cfg.selection.label == "LongAttn-70"  # the report's row name: the paper's LongAttn-70 rows
    assert [dict(s) for s in cfg.data.sources] == [
        {"domain": "longabc", "hub": "Lyun0912/LongABC", "split": "train", "text_field": "content"}
    ]
    assert cfg.data.window_size == 32768 and cfg.data.windowing == "first"
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B" and cfg.training.seq_len == 32768
    assert STAGES["score"].skip_reason(cfg) and STAGES["select"].input_names(cfg) == ("prepare",)
    assert STAGES["score"].skip_reason(make_cfg("experiment=random_32k")) is None
    # the select fingerprint does not depend on a score artifact, nor on the report label
    fps = stage_fingerprints(cfg, ["select"])
    assert "score" not in fps
    relabeled = stage_fingerprints(make_cfg("experiment=released_data_32k", "selection.label=x"), ["select"])
    assert relabeled["select"] == fps["select"]


def test_stage_packages_import_only_common():
    """selection/, training/ and evaluation/ never import each other or experiments/ (ARCHITECTURE.md)."""
    import ast

    repo = Path(__file__).resolve().parent.parent
    packages = {"selection", "training", "evaluation", "experiments"}
    for package in ("selection", "training", "evaluation"):
        for path in sorted((repo / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top not in packages - {package}, f"{path.relative_to(repo)} imports {name}"
