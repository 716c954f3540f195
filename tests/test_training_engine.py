"""The real DeepSpeed path on CPU (gloo): ZeRO-2 and ZeRO-3 in bf16, resume, two processes, SmolLM2.

A tiny 2-layer Llama trains on the debug=tiny selection (256-token windows, 8 sequences per step).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from common.artifacts import find_artifact
from common.stage import StageContext
from experiments.pipeline import run_pipeline
from training.metrics import read_records
from training.schedule import cosine_lr

TINY = ["debug=tiny", "training.save_every=2", "training.keep_checkpoints=2", "training.lr=1e-3"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """prepare/score/select of debug=tiny, shared by the tests (train fingerprints differ by test)."""
    from conftest import compose_cfg

    root = tmp_path_factory.mktemp("tiny")
    run_pipeline(compose_cfg(root, [*TINY, "stages=[prepare,score,select]"]))
    return root


def _train(make_cfg, root: Path, *overrides: str) -> tuple[dict, Path]:
    manifests = run_pipeline(make_cfg(*TINY, "stages=[prepare,score,select,train]", *overrides, root=root))
    return manifests["train"], Path(manifests["train"]["model_dir"]).parent


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_zero2_and_zero3_bf16_train_checkpoint_and_save_a_reloadable_model(make_cfg, tiny_root):
    from transformers import AutoModelForCausalLM

    from common.model_sources import resolve_model_path
    from training.model import rope_theta_of

    runs = {}
    for stage in ("zero2", "zero3"):
        manifest, out = _train(
            make_cfg,
            tiny_root,
            f"training.deepspeed={stage}",
            "training.rope_theta=1e6",
            "training.precision=bf16",
        )
        runs[stage] = (manifest, out, read_records(out))
        assert manifest["zero_stage"] == int(stage[-1]) and manifest["attn_implementation"] == "sdpa"
        # bf16 weights; gradients accumulated and reduced in fp32, as the DeepSpeed engine resolved them
        assert manifest["grad_accum_dtype"] == "float32" and manifest["grad_reduce_dtype"] == "float32"
        assert (
            manifest["steps"] == 4 and manifest["tokens"] == 4 * 2048 and manifest["grad_accumulation"] == 8
        )
        assert manifest["rope_theta"] == 1e6
        records = runs[stage][2]
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
        assert [r["lr"] for r in records] == pytest.approx([cosine_lr(s, 1e-3, 1, 4, 1e-4) for s in range(4)])
        assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
        # the saved directory is a Hugging Face model with the ABF theta, and it was trained
        model = AutoModelForCausalLM.from_pretrained(out / "model")
        assert rope_theta_of(model.config) == 1e6
        # transformers 4 readers (vLLM on transformers 4.x) find the ABF base at the top level too
        saved_config = json.loads((out / "model" / "config.json").read_text())
        assert saved_config["rope_theta"] == 1e6 and saved_config["rope_scaling"] is None
        assert (out / "model" / "training_config.yaml").is_file()
        saved = _weights(out / "model")
        initial = _weights(Path(resolve_model_path("tiny_llama")))
        assert saved.keys() == initial.keys()
        assert all(saved[k].shape == initial[k].shape for k in saved)
        assert not torch.equal(
            saved["model.layers.0.self_attn.q_proj.weight"].float(),
            initial["model.layers.0.self_attn.q_proj.weight"].float(),
        )
    # same data, same maths: ZeRO-2 and ZeRO-3 follow the same trajectory
    loss2 = [r["loss"] for r in runs["zero2"][2]]
    loss3 = [r["loss"] for r in runs["zero3"][2]]
    assert loss2 == pytest.approx(loss3, rel=1e-3)
    w2, w3 = _weights(runs["zero2"][1] / "model"), _weights(runs["zero3"][1] / "model")
    assert all(torch.allclose(w2[k].float(), w3[k].float(), atol=2e-2) for k in w2)


def test_zero3_offload_follows_zero3_with_cpu_adam(make_cfg, tiny_root):
    """ZeRO-3 with optimizer and parameters offloaded to the CPU (DeepSpeedCPUAdam, compiled on first
    use: minutes on a fresh machine, then cached in TORCH_EXTENSIONS_DIR) takes the steps ZeRO-3 takes."""
    runs = {}
    for stage in ("zero3", "zero3_offload"):
        manifest, out = _train(make_cfg, tiny_root, f"training.deepspeed={stage}")
        assert manifest["zero_stage"] == 3 and manifest["steps"] == 4
        runs[stage] = [r["loss"] for r in read_records(out)]
    assert runs["zero3_offload"] == pytest.approx(runs["zero3"], rel=1e-3)
    assert runs["zero3_offload"][-1] < runs["zero3_offload"][0]


def _stage_context(root: Path, out_dir: Path) -> StageContext:
    index = json.loads((root / "run" / "artifacts.json").read_text())
    inputs = {name: find_artifact(Path(index[name])) for name in ("prepare", "select")}
    out_dir.mkdir(parents=True, exist_ok=True)
    from common.model_sources import default_cache_dir

    return StageContext(out_dir=out_dir, inputs=inputs, cache_dir=default_cache_dir())


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_gives_the_uninterrupted_losses_and_weights(make_cfg, tiny_root, tmp_path, stage):
    """4 steps in one go == 2 steps, stop, resume for 2 more (dropout on: its RNG is per step), with
    ZeRO-2 and ZeRO-3 and their fp32 gradient accumulation."""
    from training.train import run as train_stage

    common = [
        *TINY,
        f"training.deepspeed={stage}",
        "training.budget_tokens=8192",
        "training.save_every=2",
        "training.dropout=0.1",
    ]
    whole = train_stage(make_cfg(*common, root=tiny_root), _stage_context(tiny_root, tmp_path / "whole"))
    part = tmp_path / "parts"
    first = train_stage(
        make_cfg(*common, "training.max_steps=2", root=tiny_root), _stage_context(tiny_root, part)
    )
    assert first["steps"] == 2 and first["resumed_from_step"] is None
    second = train_stage(make_cfg(*common, root=tiny_root), _stage_context(tiny_root, part))
    assert second["resumed_from_step"] == 2 and second["steps"] == 4
    assert second["grad_accum_dtype"] == "float32"
    assert [r["step"] for r in read_records(part)] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_records(part)] == [r["loss"] for r in read_records(tmp_path / "whole")]
    assert whole["final_loss"] == second["final_loss"]
    a, b = _weights(tmp_path / "whole" / "model"), _weights(part / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_checkpoint_after_the_last_step_when_asked(make_cfg, tiny_root):
    manifest, out = _train(
        make_cfg,
        tiny_root,
        "training.max_steps=1",
        "training.save_every=100",
        "training.checkpoint_at_end=false",
    )
    assert manifest["steps"] == 1 and (out / "model" / "model.safetensors").is_file()
    assert not list((out / "checkpoints").glob("step-*"))


def test_two_processes_under_torchrun_train_the_same_steps_as_one(make_cfg, tiny_root, tmp_path):
    """training.num_gpus=2 relaunches run.py under torchrun (gloo); each step's 8 sequences are split
    over the two ranks, so the losses match the one-process run."""
    _, one = _train(make_cfg, tiny_root)
    root = tmp_path / "two"
    done = run_cli(
        *TINY,
        "stages=[prepare,score,select,train]",
        "training.num_gpus=2",
        "training.device=cpu",
        f"paths.root_dir={root}",
        env={"LONGATTN_RUN_DIR": str(root / "run")},
    )
    assert "torch.distributed.run --nproc_per_node=2" in done.stdout
    index = json.loads((root / "run" / "artifacts.json").read_text())
    two = Path(index["train"])
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["grad_accumulation"] == 4
    one_losses = [r["loss"] for r in read_records(one)]
    two_losses = [r["loss"] for r in read_records(two)]
    assert two_losses[0] == pytest.approx(one_losses[0], abs=1e-5)  # same 8 sequences, same weights
    assert two_losses == pytest.approx(one_losses, rel=1e-3)
    # the token-weighted loss gives the same gradient however the step's sequences (packed short ones
    # with fewer targets among them) are spread over ranks and micro-batches
    one_norms = [r["grad_norm"] for r in read_records(one)]
    assert [r["grad_norm"] for r in read_records(two)] == pytest.approx(one_norms, rel=1e-3)


def test_smollm2_demo_training_lowers_the_loss_on_repeated_data(make_cfg, tmp_path):
    """The demo model for a few steps at 512 tokens on CPU, trained on one code window again and again."""
    manifests = run_pipeline(
        make_cfg(
            "stages=[prepare,score,select,train]",
            "data.window_size=512",
            "data.max_windows_per_domain=2",
            "selection.fraction=0.5",
            "selection.mixture.long_share=1.0",
            "selection.domain_ratios={code:1.0}",
            "selection.mixture.short={wiki:0.0,github:0.0,web:0.0}",
            "training.budget_tokens=4096",
            "training.global_batch_tokens=1024",
            "training.lr=1e-4",
            "training.warmup_steps=0",
            "training.save_every=4",  # one 1.9 GB checkpoint (fp32 Adam states), not two
        )
    )
    assert manifests["select"]["windows"] == 2
    records = read_records(Path(manifests["train"]["model_dir"]).parent)
    losses = [r["loss"] for r in records]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
