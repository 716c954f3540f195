"""What a CPU can show of the CUDA paths: device choice per rank, MFU peaks by exact GPU name, peak-memory
and cache resets between stages, the RoPE fields vLLM reads, cuBLAS determinism set at process start,
and a multi-process launch that checks once and reports a rank's user error as one line."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import run_cli

from common.distributed import RankInfo
from common.errors import USER_ERROR_EXIT_CODE, ConfigError


def test_each_rank_scores_on_its_own_gpu_and_makes_it_current(monkeypatch):
    from selection.score import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(str(device)))
    assert resolve_device("auto", RankInfo(rank=5, world_size=8, local_rank=3)) == "cuda:3"
    assert resolve_device("cuda", RankInfo(rank=1, world_size=2, local_rank=1)) == "cuda:1"
    assert current == ["cuda:3", "cuda:1"]  # Triton and cuBLAS launch on the current device
    assert resolve_device("cpu", RankInfo(rank=1, world_size=2, local_rank=1)) == "cpu"
    assert current == ["cuda:3", "cuda:1"]


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H800", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
    ],
)
def test_mfu_peak_is_keyed_on_the_exact_gpu_name(monkeypatch, name, peak):
    from training.metrics import peak_flops_for

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops_for(torch.device("cuda", 0), None) == peak
    assert peak_flops_for(torch.device("cuda", 0), 1e15) == 1e15  # training.peak_flops wins
    assert peak_flops_for(torch.device("cpu"), None) is None


def test_an_unknown_gpu_gets_no_mfu_and_one_warning_naming_the_key(monkeypatch, caplog):
    from training.metrics import peak_flops_for

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 Something New")
    with caplog.at_level(logging.WARNING, logger="training.metrics"):
        assert peak_flops_for(torch.device("cuda", 0), None) is None
    assert "training.peak_flops" in caplog.text and "H100 Something New" in caplog.text


def test_peak_memory_restarts_after_the_model_is_built(monkeypatch):
    from training.metrics import reset_peak_memory

    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: reset.append(device))
    reset_peak_memory(torch.device("cpu"))
    reset_peak_memory(torch.device("cuda", 1))
    assert reset == [torch.device("cuda", 1)]


def test_the_cuda_cache_is_released_between_stages(monkeypatch, make_cfg):
    """After every stage the pipeline collects garbage and empties the CUDA cache (a no-op on CPU)."""
    import experiments.pipeline as pipeline
    from common.accelerator import release_accelerator_memory

    assert release_accelerator_memory() is None  # CPU: CUDA was never initialised
    calls = []
    monkeypatch.setattr(pipeline, "release_accelerator_memory", lambda: calls.append(1))
    pipeline.run_pipeline(make_cfg("debug=tiny", "stages=[prepare]", "data.max_windows_per_domain=2"))
    assert calls == [1]

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * 2**30 * (not emptied))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)
    assert release_accelerator_memory() == {"reserved_gib_before": 3.0, "reserved_gib_after": 0.0}


def test_saved_configs_carry_the_rope_base_for_transformers_4_readers(tmp_path):
    """transformers 5 writes the base only in rope_parameters; vLLM on transformers 4 would read its own
    default (1e4). The saved config also has rope_theta / rope_scaling, which transformers 5 ignores."""
    from transformers import LlamaConfig

    from training.model import rope_theta_of, with_legacy_rope_fields

    plain = {"rope_parameters": {"rope_type": "default", "rope_theta": 8e6}, "model_type": "llama"}
    assert with_legacy_rope_fields(plain)["rope_theta"] == 8e6
    assert with_legacy_rope_fields(plain)["rope_scaling"] is None
    llama31 = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
    }
    legacy = with_legacy_rope_fields({"rope_parameters": llama31})
    assert legacy["rope_theta"] == 5e5
    assert legacy["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
    }
    assert with_legacy_rope_fields({"model_type": "opt"}) == {"model_type": "opt"}

    config = LlamaConfig(vocab_size=32, hidden_size=16, num_attention_heads=2, num_hidden_layers=1)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 8e6}
    config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(with_legacy_rope_fields(json.loads(path.read_text()))))
    assert json.loads(path.read_text())["rope_theta"] == 8e6
    reloaded = LlamaConfig.from_pretrained(tmp_path)
    assert rope_theta_of(reloaded) == 8e6 and reloaded.rope_parameters["rope_type"] == "default"


def test_deterministic_training_sets_cublas_at_process_start(monkeypatch):
    from omegaconf import OmegaConf

    from experiments.launch import DETERMINISTIC_CUBLAS, process_environment

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert process_environment(OmegaConf.create({"training": {"deterministic": True}})) == {
        "CUBLAS_WORKSPACE_CONFIG": DETERMINISTIC_CUBLAS
    }
    assert process_environment(OmegaConf.create({"training": {"deterministic": False}})) == {}
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own value is kept
    assert process_environment(OmegaConf.create({"training": {"deterministic": True}})) == {}


def test_more_processes_than_visible_gpus_are_refused_before_launch():
    from experiments.launch import Launch, check_devices

    eight = Launch("torchrun", 8)
    with pytest.raises(ConfigError, match=r"training.num_gpus=8: this machine shows 0 CUDA device\(s\)"):
        check_devices(eight, 0, {})
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='0,1'.*training.num_gpus=2"):
        check_devices(Launch("torchrun", 8, device="cuda"), 2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    evaluation = Launch("torchrun", 4, source="evaluation")
    with pytest.raises(ConfigError, match="evaluation.num_gpus=4.*evaluation.device=cpu"):
        check_devices(evaluation, 1, {})
    check_devices(eight, 8, {})
    check_devices(Launch("torchrun", 8, device="cpu"), 0, {})  # CPU processes (gloo) on purpose
    check_devices(Launch("torchrun", 1), 0, {})


def test_a_ranks_user_error_is_left_to_the_parent(tmp_path, capsys):
    from experiments.launch import ERROR_DIR_ENV, first_user_error, report_user_error

    folder = tmp_path / "errors"
    report_user_error("bad key", {ERROR_DIR_ENV: str(folder), "RANK": "3"})
    report_user_error("first", {ERROR_DIR_ENV: str(folder), "RANK": "1"})
    assert capsys.readouterr().err == ""
    assert first_user_error(folder) == "first"  # the lowest rank's
    report_user_error("plain run", {})
    assert capsys.readouterr().err == "error: plain run\n"
    assert first_user_error(tmp_path / "none") is None


def one_error_line(done) -> str:
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def launch_args(tmp_path, corpus, *extra: str) -> list[str]:
    return [
        "debug=tiny",
        "stages=[prepare,score,select,train]",
        "data=jsonl",
        f"data.sources=[{{path: '{corpus}', domain: book}}]",
        "data.window_size=32",
        "training.num_gpus=2",
        f"paths.root_dir={tmp_path}",
        *extra,
    ]


@pytest.mark.slow
def test_a_multi_process_launch_checks_once_and_reports_one_line(tmp_path):
    missing = run_cli(
        *launch_args(tmp_path, tmp_path / "nope.jsonl", "training.device=cpu"),
        returncode=USER_ERROR_EXIT_CODE,
    )
    assert "matches no file" in one_error_line(missing) and "launching" not in missing.stdout

    gpus = run_cli(*launch_args(tmp_path, tmp_path / "nope.jsonl"), returncode=USER_ERROR_EXIT_CODE)
    assert one_error_line(gpus).startswith("error: training.num_gpus=2: this machine shows 0 CUDA")

    corpus = tmp_path / "books.jsonl"  # passes every check; rank 0's prepare stops at line 2
    corpus.write_text(json.dumps({"text": "fine " * 50}) + "\n{oops\n")
    child = run_cli(*launch_args(tmp_path, corpus, "training.device=cpu"), returncode=USER_ERROR_EXIT_CODE)
    assert "launching:" in child.stdout
    assert one_error_line(child).startswith(f"error: {corpus}:2: malformed JSON")
