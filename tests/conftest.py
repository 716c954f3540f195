"""Shared fixtures: the real Hydra config, composed with paths under tmp_path and tracking off."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

CONF_DIR = "../conf"


def pytest_collection_modifyitems(config, items) -> None:
    """`cuda`-marked tests skip cleanly where no CUDA device is visible (CI, CUDA_VISIBLE_DEVICES=)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


REPO = Path(__file__).resolve().parent.parent
# A demo corpus of 5 small documents (2 packages' sources, 3 modules' docs): a few seconds of prepare
SMALL_DEMO_SOURCES = (
    "data.sources=[{domain: code, format: python_code, options: {packages: [json, tomllib]}},"
    "{domain: docs, format: python_docs, options: {modules: [json, textwrap, difflib], reference_topics: false}}]"
)
# set by a launcher or an enclosing run; a child `run.py` must start clean of them
RUN_ENV_KEYS = ("LONGATTN_RUN_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600, returncode: int = 0
) -> subprocess.CompletedProcess:
    """`python run.py *args` from the repository root, as a user types it; fails the test on another exit
    status than `returncode`, with the tail of its output. `env` adds to (or overrides) a copy of this
    environment."""
    child = {k: v for k, v in os.environ.items() if k not in RUN_ENV_KEYS}
    child.update(OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        env=child,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == returncode, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def compose_cfg(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """Compose conf/ like run.py does, with every path under tmp_path (the model cache stays shared)."""
    GlobalHydra.instance().clear()
    with initialize(config_path=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, root: Path | None = None) -> DictConfig:
        return compose_cfg(root or tmp_path, list(overrides))

    return _make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from common.model_sources import default_cache_dir, resolve_model_path

    return Path(resolve_model_path("smollm2_135m", default_cache_dir()))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_packed_lm(attn: str = "sdpa"):
    """A 2-layer random Llama (seed 0) for packed-sequence attention tests, with `attn` as its kernel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attn,
        use_cache=False,  # as training_config sets: with a KV cache transformers skips packed-sequence masks
    )
    return LlamaForCausalLM(config).eval()
