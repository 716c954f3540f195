"""Matmul throughput per dtype on this machine: why the CPU demo and tests train in fp32.

A CPU without bf16/fp16 instructions (no avx512_bf16 / amx) emulates half-precision matmuls, which can
make a bf16 training step tens of times slower than fp32. The paper configs train in bf16 on GPUs; the
CPU demo (`training=cpu_demo`) uses fp32. Shapes default to SmolLM2-135M's MLP (tokens x 576 x 1536).

    python benchmarks/bench_matmul_dtypes.py [--threads 1] [--seconds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gflops(m: int, k: int, n: int, dtype: torch.dtype, device: str, seconds: float) -> float:
    """Best-effort sustained GFLOP/s of an [m, k] x [k, n] matmul (one warm-up call, then timed)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    started, calls = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        a @ b
        calls += 1
    sync()
    return 2 * m * k * n * calls / (time.perf_counter() - started) / 1e9


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")]
    return " ".join(wanted) or "none of avx2/avx512/amx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,576,1536", help="m,k,n")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    m, k, n = (int(x) for x in args.shape.split(","))
    print(
        f"{platform.processor() or platform.machine()}, flags: {cpu_flags()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), [{m}x{k}] @ [{k}x{n}] on {args.device}"
    )
    results = {name: gflops(m, k, n, dtype, args.device, args.seconds) for name, dtype in DTYPES.items()}
    print("| dtype | GFLOP/s | time vs float32 |")
    print("|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:,.2f} | {results['float32'] / value:,.1f}x |")


if __name__ == "__main__":
    main()
