"""The parts of the GPU suite (benchmarks/gpu_suite.py runs each in its own process, time-boxed).

Each part is `part(mode, work, rec)`: `mode` is "full" (the device: real shapes, 32K) or "smoke" (CPU,
tiny shapes, Triton under TRITON_INTERPRET=1); `work` a scratch directory shared by the parts; `rec` a
Recorder that rewrites the part's JSON after every measurement, so a part stopped by its time box keeps
what it measured. A part marks a failed check with rec.fail(...) and carries on with the next case.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_longattn import SHAPES as QK_SHAPES  # noqa: E402  (heads, kv heads, head dim of layer 0)

# What differs between the device ("full") and the CPU smoke run: sizes only, so the smoke run takes the
# code paths (configs, overrides, stages) the device will take.
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "qk_shapes": {name: QK_SHAPES[name] for name in ("8b", "70b")},
        "hidden": {"8b": 4096, "70b": 8192},  # model width of the layer-0 projection
        "vocab": 128256,
        "lengths": [1024, 8192, 32768],
        "all_heads_up_to": 8192,  # above: blocked on 8 heads, reference on one GQA group
        "throughput_length": 32768,
        "reps": 5,
    },
    "smoke": {
        "qk_shapes": {"tiny": (4, 2, 16)},
        "hidden": {"tiny": 64},
        "vocab": 1000,
        "lengths": [256],
        "all_heads_up_to": 8192,
        "throughput_length": 256,
        "reps": 1,
    },
}


class Recorder:
    """The part's result JSON, rewritten atomically after every change."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = Path(path), {"ok": True, "failures": []}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def append(self, key: str, item: Any) -> None:
        self.data.setdefault(key, []).append(item)
        self.flush()

    def fail(self, what: str) -> None:
        self.data["ok"] = False
        self.append("failures", what)

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def device() -> str:
    return "cuda" if on_gpu() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], warmup: int = 1, reps: int = 5) -> dict[str, float]:
    """Median seconds of `reps` calls after `warmup` (CUDA events on a GPU; host clock on CPU), and the
    first call's seconds (compilation included)."""
    import torch

    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(reps):
        if on_gpu():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return {"seconds": sorted(times)[len(times) // 2], "first_call_seconds": first}


def max_rel_err(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float(((got - want).abs() / want.abs().clamp_min(1e-300)).max())


# ---- 1. versions, GPU name, clocks --------------------------------------------------------------


def part_versions(mode: str, work: Path, rec: Recorder) -> None:
    import torch

    rec.set("python", platform.python_version())
    versions = {}
    for module in ("torch", "triton", "transformers", "accelerate", "deepspeed", "lm_eval", "datasets"):
        versions[module] = _version_of(module)
    for module in ("hydra", "omegaconf", "pyarrow", "huggingface_hub", "nltk", "flash_attn", "vllm"):
        versions[module] = _version_of(module)
    rec.set("versions", versions)
    for needed in ("torch", "transformers", "deepspeed", "lm_eval", "datasets", "hydra", "omegaconf"):
        if str(versions[needed]).startswith("import failed"):
            rec.fail(f"{needed}: {versions[needed]}")
    gpu: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu.update(
            name=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            count=torch.cuda.device_count(),
        )
    rec.set("gpu", gpu)
    query = (
        "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
    )
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        )
        rec.set("nvidia_smi", dict(zip(query.split(","), (v.strip() for v in out.stdout.split(",")))))


def _version_of(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - a record of what failed, not a crash
        return f"import failed: {type(exc).__name__}: {str(exc)[:200]}"


# ---- 2. pytest -m cuda ----------------------------------------------------------------------------


def part_pytest_cuda(mode: str, work: Path, rec: Recorder) -> None:
    import xml.etree.ElementTree as ET

    xml = work / "pytest_cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
    done = subprocess.run([*cmd, f"--junitxml={xml}"], cwd=ROOT)
    rec.set("returncode", done.returncode)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    rec.set("counts", counts)
    for case in suite.iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            rec.fail(f"{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:300]}")
    if done.returncode != 0:
        rec.fail(f"pytest exit {done.returncode}, counts {counts}")
    if mode == "smoke" and counts["skipped"] != counts["tests"]:  # no CUDA: every test must skip cleanly
        rec.fail(f"on CPU every cuda test should skip; counts {counts}")


# ---- 3. Triton correctness ------------------------------------------------------------------------


def _random_qk(heads: int, kv: int, dim: int, length: int, dtype, seed: int):
    import torch

    gen = torch.Generator(device=device()).manual_seed(seed)
    q = torch.randn(heads, length, dim, device=device(), generator=gen).mul_(2).to(dtype)
    k = torch.randn(kv, length, dim, device=device(), generator=gen).mul_(2).to(dtype)
    return q, k


def part_triton_correctness(mode: str, work: Path, rec: Recorder) -> None:
    """Triton against `blocked` and the literal `reference` on the same q/k. At 32K the reference (an
    L x L softmax per head) and `blocked` (a Python loop over tiles) run on a head subset (one GQA group /
    8 heads); Triton always runs every head, and per-head sums are independent."""
    import torch

    from selection.scorers.attention_stats import (
        blocked_head_sums,
        default_min_distance,
        reference_head_stats,
        stats_from_sums,
    )
    from selection.scorers.attention_stats_triton import triton_head_sums

    sizes = SIZES[mode]
    tolerance = 1e-4
    seed = 0
    for name, (heads, kv, dim) in sizes["qk_shapes"].items():
        rep = heads // kv
        for length in sizes["lengths"]:
            ref_heads = heads if length <= sizes["all_heads_up_to"] else rep
            cmp_heads = heads if length <= sizes["all_heads_up_to"] else max(8, rep)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for causal in (True, False):
                    for sink in (0, 4):
                        seed += 1
                        q, k = _random_qk(heads, kv, dim, length, dtype, seed)
                        dist = default_min_distance(length)
                        began = time.perf_counter()
                        tri = stats_from_sums(
                            *triton_head_sums(q, k, dist, exclude_sink_tokens=sink, causal=causal), length
                        )
                        sync()
                        seconds = time.perf_counter() - began
                        qb, kb = q[:cmp_heads], k[: cmp_heads // rep]
                        blk = stats_from_sums(
                            *blocked_head_sums(qb, kb, dist, exclude_sink_tokens=sink, causal=causal), length
                        )
                        ref = reference_head_stats(q[:ref_heads], k[: ref_heads // rep], dist, sink, causal)
                        case = {
                            "shape": name,
                            "length": length,
                            "dtype": str(dtype).removeprefix("torch."),
                            "causal": causal,
                            "sink": sink,
                            "triton_seconds": seconds,
                            "ds_vs_blocked": max_rel_err(tri.ds[:cmp_heads], blk.ds),
                            "var_vs_blocked": max_rel_err(tri.variance[:cmp_heads], blk.variance),
                            "ds_vs_reference": max_rel_err(tri.ds[:ref_heads], ref.ds),
                            "var_vs_reference": max_rel_err(tri.variance[:ref_heads], ref.variance),
                            "heads_compared": [cmp_heads, ref_heads],
                        }
                        rec.append("cases", case)
                        worst = max(v for key, v in case.items() if key.startswith(("ds_", "var_")))
                        if not worst < tolerance:  # NaN fails too
                            rec.fail(
                                f"{name} L={length} {case['dtype']} causal={causal} sink={sink}: {worst:.2e}"
                            )
                        del q, k
                        if on_gpu():
                            torch.cuda.empty_cache()


# ---- 4. throughput at 32K -------------------------------------------------------------------------


def part_throughput(mode: str, work: Path, rec: Recorder) -> None:
    """tokens/s of the Triton statistics (both attention modes), with the layer-0 q/k projection (random
    weights in the real shapes, fp16 as the paper configs), `blocked` on the same device, and SDPA's flash
    forward (causal) on the same q/k as the speed-of-light reference."""
    sizes = SIZES[mode]
    for name, (heads, kv, dim) in sizes["qk_shapes"].items():
        _throughput_of(name, heads, kv, dim, sizes, rec)


def _throughput_of(name: str, heads: int, kv: int, dim: int, sizes: dict, rec: Recorder) -> None:
    import torch

    from selection.scorers.attention_stats import blocked_head_sums, default_min_distance
    from selection.scorers.attention_stats_triton import triton_head_sums

    length, reps = sizes["throughput_length"], sizes["reps"]
    dist = default_min_distance(length)
    dtype = torch.float16
    q, k = _random_qk(heads, kv, dim, length, dtype, 1)
    row: dict[str, Any] = {"shape": name, "length": length, "dtype": "float16"}
    rec.set(name, row)
    for causal, mode_name in ((True, "causal"), (False, "non_causal")):
        t = timed(lambda c=causal: triton_head_sums(q, k, dist, causal=c), reps=reps)
        row[f"triton_{mode_name}"] = {**t, "tokens_per_s": length / t["seconds"]}
        rec.flush()
    qk_flops = 2.0 * heads * dim * length * length / 2  # causal QK^T
    row["triton_causal"]["qk_tflops"] = qk_flops / row["triton_causal"]["seconds"] / 1e12
    blocked = timed(lambda: blocked_head_sums(q, k, dist, causal=True), warmup=1, reps=1)
    row["blocked_causal"] = {**blocked, "tokens_per_s": length / blocked["seconds"]}
    row["blocked_over_triton"] = blocked["seconds"] / row["triton_causal"]["seconds"]
    rec.flush()
    sdpa = _sdpa_flash(q, k, reps)
    row["sdpa_flash_causal"] = {**sdpa, "tokens_per_s": length / sdpa["seconds"]}
    row["triton_over_sdpa"] = row["triton_causal"]["seconds"] / sdpa["seconds"]
    rec.flush()
    projection = _first_layer(sizes["hidden"][name], sizes["vocab"], heads, kv, dim, dtype)
    ids = torch.randint(0, projection.embed.shape[0], (length,), device=device())
    for causal, mode_name in ((True, "causal"), (False, "non_causal")):
        whole = timed(lambda c=causal: triton_head_sums(*projection(ids), dist, causal=c), reps=reps)
        row[f"scorer_path_{mode_name}"] = {**whole, "tokens_per_s": length / whole["seconds"]}
        rec.flush()


def _sdpa_flash(q, k, reps: int) -> dict[str, float]:
    """SDPA's flash forward (causal) on the same q/k (keys repeated per GQA group, random values)."""
    import torch
    import torch.nn.functional as F

    qf, kf = q[None], k.repeat_interleave(q.shape[0] // k.shape[0], 0)[None]
    vf = torch.randn_like(kf)
    flash = torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION])
    with flash if on_gpu() else contextlib.nullcontext():
        return timed(lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=True), reps=reps)


def _first_layer(hidden: int, vocab: int, heads: int, kv: int, dim: int, dtype):
    """FirstLayerQK with random weights of a layer-0 shape (Llama-3.1 8B / 70B: width 4096 / 8192, a
    128,256-token vocabulary) and the authors' RoPE base."""
    import torch
    from transformers import LlamaConfig

    from selection.scorers.first_layer import FirstLayerQK, LayerZeroWeights

    config = LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=dim,
        vocab_size=vocab,
        rope_theta=2.5e6,
        max_position_embeddings=131072,
    )
    gen = torch.Generator(device=device()).manual_seed(2)

    def rand(*shape, scale=0.02):
        return torch.randn(*shape, device=device(), generator=gen).mul_(scale).to(dtype)

    weights = LayerZeroWeights(
        embed=rand(vocab, hidden),
        norm=rand(hidden, scale=1.0).abs_(),
        q_proj=rand(heads * dim, hidden),
        k_proj=rand(kv * dim, hidden),
        q_bias=None,
        k_bias=None,
    )
    return FirstLayerQK(config, weights, device(), dtype)
