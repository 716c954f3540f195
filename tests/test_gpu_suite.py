"""The GPU suite before any GPU: its smoke mode (every part on CPU with tiny shapes) and the kit's contents."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_the_smoke_suite_runs_every_part_and_records_real_values(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(out), "--work", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = (out / "gpu_suite.log").read_text() if (out / "gpu_suite.log").is_file() else ""
    assert done.returncode == 0, done.stdout[-2000:] + log[-4000:]
    parts = json.loads((out / "gpu_suite.json").read_text())["parts"]
    from gpu_suite import PARTS

    assert list(parts) == list(PARTS) and all(p["status"] == "ok" for p in parts.values())
    assert parts["versions"]["versions"]["deepspeed"][0].isdigit()  # imported, not "import failed"
    cases = parts["triton_correctness"]["cases"]
    assert len(cases) == 3 * 2 * 2  # dtypes x attention modes x sinks at one length and shape
    assert all(c[key] < 1e-4 for c in cases for key in ("ds_vs_blocked", "var_vs_reference"))
    tiny = parts["throughput"]["tiny"]
    assert tiny["triton_causal"]["tokens_per_s"] > 0 and tiny["sdpa_flash_causal"]["seconds"] > 0
    assert parts["pytest_cuda"]["counts"]["skipped"] == parts["pytest_cuda"]["counts"]["tests"] > 0
    methods = parts["score_e2e"]["methods"]
    assert sorted(methods) == sorted(
        ["longattn", "ladm", "prolong", "random", "longppl", "longfilter", "ppl_gain", "compression"]
    )
    assert all(m["windows"] == 4 and m["all_finite"] for m in methods.values())
    train = parts["train_step"]
    assert train["stage"]["attn_implementation"] == "sdpa" and len(train["steps"]) == 3
    assert (
        all(math.isfinite(s["loss"]) for s in train["steps"]) and train["bench_step"][0]["tokens_per_s"] > 0
    )
    lengths = parts["eval"]["lengths"]
    assert [r["length"] for r in lengths] == [256, 512] and all(r["truncated_prompts"] == 0 for r in lengths)


def test_a_part_that_fails_or_times_out_is_reported_with_what_it_recorded(tmp_path):
    import gpu_suite

    broken = tmp_path / "broken"  # a DeepSpeed that does not import, as a missing kit wheel would
    broken.mkdir()
    (broken / "deepspeed.py").write_text("raise ImportError('not in the kit')\n")
    args = gpu_suite.argparse.Namespace(smoke=True, work=tmp_path)
    env = gpu_suite.part_env(args, {"PYTHONPATH": f"{broken}:{REPO}"})
    with open(tmp_path / "log", "w") as log:
        failed = gpu_suite.run_part("versions", args, env, 60, log)
        timed_out = gpu_suite.run_part("triton_correctness", args, gpu_suite.part_env(args, {}), 0.5, log)
    assert failed["status"] == "failed" and failed["returncode"] == 1
    assert failed["failures"] == ["deepspeed: import failed: ImportError: not in the kit"]
    assert failed["versions"]["torch"][0].isdigit()  # what it measured before the failure is kept
    assert timed_out["status"] == "timeout" and timed_out["returncode"] is None


def test_the_kit_carries_what_the_device_lacks_and_nothing_it_has():
    from gpu_kit import device_packages, needed_distributions

    present = device_packages()
    assert {"torch", "transformers", "accelerate", "triton", "safetensors"} <= present
    need = needed_distributions(present)
    for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "deepspeed", "lm-eval", "datasets"):
        assert name in need
    assert "nltk" in need and "wonderwords" in need  # lm-eval[ruler]
    assert not set(need) & (present - {"filelock"} | {"wandb", "gguf", "jieba", "torch"})
    assert "filelock" in need  # carried anyway: common/claims.py needs filelock 4's API
    import importlib.metadata as md

    assert need["deepspeed"] == md.version("deepspeed")  # this venv's version = constraints.txt
