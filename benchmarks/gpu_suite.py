"""The one-command GPU suite: everything this project wants measured or checked on a lent GPU, in one call
that fits the device's 15 minutes (about 8 of them for the suite).

On the device (the exact call; `make gpu-kit` here first, which fills the git-ignored `.gpu-kit/`):

    run(command="python3 benchmarks/gpu_suite.py --out $OUT", carry=[".gpu-kit"], timeout_s=600)
    run(command="python3 benchmarks/gpu_suite.py --out $OUT --parts pytest_cuda,eval", ...)   # a rerun

It installs the kit's wheels into a temporary site directory (no registry there), seeds a model cache
with SmolLM2's tokenizer (no weights travel: parts use random weights in the real shapes), then runs
each part in its own process under a time box, in this order (kernel numbers first: the fewest
dependencies, the numbers most wanted):

  versions            Python / torch / triton / transformers / DeepSpeed / lm-eval versions, GPU, clocks
  triton_correctness  Triton vs blocked and the literal reference on the GPU: L 1024 / 8192 / 32768,
                      fp32 / fp16 / bf16, causal and not, sink 0 and 4, Llama-3.1 8B and 70B layer-0 shapes
  throughput          32K: Triton tokens/s (both modes), with the q/k projection, vs blocked, vs SDPA flash
  pytest_cuda         `pytest -m cuda tests/test_cuda.py` (scorers on CUDA vs CPU, DeepSpeed step, lm-eval)
  score_e2e           `run.py -m stages=[prepare,score]` for longattn, ladm, prolong, random at 8K: windows/s
  train_step          the train stage at 32K on a 4-layer Llama-3-8B shape (s/step, tokens/s, MFU, memory,
                      attention), and bench_train's step with sdpa and FlexAttention
  eval                the evaluate stage (HF) at 8K / 16K / 32K: s/sample, peak memory, truncated prompts

Each part's results are written as they come (a part stopped by its box keeps what it measured) to
`<out>/gpu_suite.json`, and every part's output to `<out>/gpu_suite.log`; the table printed last says
ok / failed / timeout / skipped per part. `--smoke` runs the same parts on CPU with tiny shapes (Triton
under TRITON_INTERPRET=1, no kit): the test suite runs it, so the suite itself is tested before any GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = {  # name -> (module, function, time box on the device in s, in smoke mode in s)
    "versions": ("gpu_parts", "part_versions", 60, 120),
    "triton_correctness": ("gpu_parts", "part_triton_correctness", 120, 300),
    "throughput": ("gpu_parts", "part_throughput", 90, 300),
    "pytest_cuda": ("gpu_parts", "part_pytest_cuda", 240, 300),
    "score_e2e": ("gpu_parts_pipeline", "part_score_e2e", 150, 300),
    "train_step": ("gpu_parts_pipeline", "part_train_step", 240, 300),
    "eval": ("gpu_parts_pipeline", "part_eval", 150, 300),
}
RESULTS, LOG = "gpu_suite.json", "gpu_suite.log"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def install_kit(kit: Path, work: Path) -> dict[str, str]:
    """The kit's wheels into `<work>/site` and SmolLM2's tokenizer into a fresh model cache; returns the
    environment the parts run with."""
    site, cache = work / "site", work / "cache"
    wheels = sorted(str(p) for p in (kit / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no wheels in {kit}/wheels: run `make gpu-kit` and carry .gpu-kit")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run([*pip, "--no-cache-dir", "--target", str(site), *wheels], check=True)
    tokenizer = cache / "tokenizers" / "smollm2_135m"
    tokenizer.mkdir(parents=True, exist_ok=True)
    for file in (kit / "smollm2").iterdir():
        (tokenizer / file.name).write_bytes(file.read_bytes())
    (tokenizer / ".complete").write_text("from the GPU kit (tokenizer and config only, no weights)\n")
    return {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "LONGATTN_CACHE_DIR": str(cache)}


def part_env(args: argparse.Namespace, extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    env.setdefault("PYTHONPATH", str(ROOT))
    if args.smoke:
        env.setdefault("TRITON_INTERPRET", "1")  # no GPU: Triton's interpreter, as the CPU tests run it
        env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LONGATTN_RUN_DIR"):
        env.pop(key, None)  # a part starts its own process group
    return env


def run_part(name: str, args: argparse.Namespace, env: dict[str, str], budget_s: float, log) -> dict:
    *_, box_full, box_smoke = PARTS[name]
    box = min(box_smoke if args.smoke else box_full, budget_s)
    result_path = args.work / f"{name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--work", str(args.work)] + (
        ["--smoke"] if args.smoke else []
    )
    log.write(f"\n===== {name} (time box {box:.0f} s) =====\n")
    log.flush()
    began = time.perf_counter()
    try:
        code = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=box
        ).returncode
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        code, status = None, "timeout"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if status == "ok" and not result.get("ok", False):
        status = "failed"
    return {"status": status, "returncode": code, "seconds": round(time.perf_counter() - began, 2), **result}


def child(name: str, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import importlib

    from gpu_parts import Recorder

    module, function = PARTS[name][:2]
    rec = Recorder(args.work / f"{name}.json")
    getattr(importlib.import_module(module), function)("smoke" if args.smoke else "full", args.work, rec)
    rec.flush()
    sys.exit(0 if rec.data["ok"] else 1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "gpu_suite_out")))
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no kit (what CI runs)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole suite's deadline")
    parser.add_argument("--kit", type=Path, default=ROOT / ".gpu-kit")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args.child, args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in PARTS]:
        raise SystemExit(f"error: --parts: unknown {unknown}; choose from {','.join(PARTS)}")
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_suite_"))).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    summary = {"mode": "smoke" if args.smoke else "full", "argv": sys.argv[1:], "parts": {}}
    summary["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with open(args.out / LOG, "a") as log:
        extra = {} if args.smoke else install_kit(args.kit, args.work)
        env = part_env(args, extra)
        for name in parts:
            left = deadline - time.monotonic()
            if left < 15:
                summary["parts"][name] = {"status": "skipped", "reason": "the suite's --budget-s ran out"}
            else:
                summary["parts"][name] = run_part(name, args, env, left, log)
            write_json(args.out / RESULTS, summary)
    print(f"{'part':<20} {'status':<8} {'seconds':>8}  failures")
    for name, part in summary["parts"].items():
        failures = "; ".join(part.get("failures", []))[:160]
        print(f"{name:<20} {part['status']:<8} {part.get('seconds', 0):>8.1f}  {failures}")
    print(f"results: {args.out / RESULTS}; log: {args.out / LOG}")
    sys.exit(0 if all(p["status"] == "ok" for p in summary["parts"].values()) else 1)


if __name__ == "__main__":
    main()
