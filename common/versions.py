"""The software stack a run used, for every manifest and the W&B config.

For a reproduction the library versions are part of the result: the authors' LongAttn scores are
non-causal only because of how transformers 4.43's sdpa path builds its masks. Recording what ran makes
two runs' numbers comparable, or explains why they are not.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from functools import lru_cache

# Distributions whose versions decide results or speed (absent ones are left out).
STACK = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "pyarrow",
    "accelerate",
    "deepspeed",
    "lm_eval",
    "hydra-core",
    "omegaconf",
    "triton",
    "flash_attn",
    "vllm",
    "safetensors",
    "numpy",
    "nltk",
    "wandb",
)


@lru_cache(maxsize=1)
def stack_versions() -> dict[str, str]:
    """{"python": ..., "platform": ..., <distribution>: version, "cuda": ..., "gpu": ...}."""
    out = {"python": platform.python_version(), "platform": f"{sys.platform}-{platform.machine()}"}
    for name in STACK:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import torch
    except ImportError:
        return out
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
