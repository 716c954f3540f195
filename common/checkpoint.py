"""Read named tensors straight from a safetensors checkpoint, opening only the shards that hold them.

For a sharded checkpoint the index (`model.safetensors.index.json`) says which shard holds which tensor;
shards holding none of the requested tensors are never opened (nor downloaded, for a Hub id). This is
how scoring with a 70B model needs only its embedding and first-layer projections in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from common.model_sources import ModelSourceError, resolve_model_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_file(name_or_path: str, filename: str, cache_dir: Path | None = None) -> Path | None:
    """A file of a local model directory or (downloaded alone) of a Hub repo; None if it does not exist."""
    resolved = resolve_model_path(name_or_path, cache_dir)
    local = Path(resolved)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(resolved, filename))
    except EntryNotFoundError:
        return None
    except Exception as exc:
        raise ModelSourceError(
            f"model {name_or_path}: could not fetch {filename} ({type(exc).__name__}: {exc}). Offline, point the "
            "model's name_or_path at a local directory."
        ) from exc


def tensor_locations(name_or_path: str, cache_dir: Path | None = None) -> dict[str, str]:
    """Tensor name -> shard file name (one entry per tensor)."""
    index = checkpoint_file(name_or_path, INDEX_FILE, cache_dir)
    if index is not None:
        return dict(json.loads(index.read_text())["weight_map"])
    single = checkpoint_file(name_or_path, SINGLE_FILE, cache_dir)
    if single is None:
        raise ModelSourceError(
            f"model {name_or_path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
            "checkpoints are supported for selective loading)"
        )
    from safetensors import safe_open

    with safe_open(single, "pt") as fh:
        return dict.fromkeys(fh.keys(), SINGLE_FILE)


def load_tensors(
    name_or_path: str, names: Iterable[str], cache_dir: Path | None = None, optional: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Load `names` (each required) and `optional` (if present) from the shards that hold them."""
    from safetensors import safe_open

    names, optional = list(names), set(optional)
    where = tensor_locations(name_or_path, cache_dir)
    missing = [n for n in names if n not in where and n not in optional]
    if missing:
        raise ModelSourceError(f"model {name_or_path}: checkpoint has no tensor(s) {missing}")
    by_shard: dict[str, list[str]] = {}
    for name in names:
        if name in where:
            by_shard.setdefault(where[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for shard, shard_names in sorted(by_shard.items()):
        path = checkpoint_file(name_or_path, shard, cache_dir)
        if path is None:
            raise ModelSourceError(f"model {name_or_path}: shard {shard} listed in the index is missing")
        with safe_open(path, "pt") as fh:
            for name in shard_names:
                out[name] = fh.get_tensor(name)
    return out


def find_prefix(where: dict[str, str], suffix: str) -> str:
    """The prefix under which a model stores its decoder ('model.' for *ForCausalLM, '' for bare models)."""
    for prefix in ("model.", ""):
        if prefix + suffix in where:
            return prefix
    raise ModelSourceError(f"checkpoint has no tensor ending in '{suffix}'")


def load_config(name_or_path: str, cache_dir: Path | None = None, rope_theta: float | None = None):
    """The model's config with an optional RoPE base override.

    Scoring: the authors scored with theta 2.5e6. Training: ABF raises theta to extend the context.
    """
    from transformers import AutoConfig

    path = checkpoint_file(name_or_path, "config.json", cache_dir)
    if path is None:
        raise ModelSourceError(f"model {name_or_path}: no config.json")
    config = AutoConfig.from_pretrained(path.parent)
    if rope_theta is not None:
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict):
            params["rope_theta"] = float(rope_theta)
        if hasattr(config, "rope_theta") or not isinstance(params, dict):
            config.rope_theta = float(rope_theta)
    return config
