"""Evaluation on several ranks: lm-eval's own data parallelism with the in-memory model, the launch it
needs, per-rank resume, batch-size forms, vLLM's data/tensor-parallel plumbing, and one two-rank run
(gloo, tiny model) killed mid-suite, resumed, and compared with a one-process run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, RUN_ENV_KEYS, run_cli
from omegaconf import OmegaConf

from common.errors import ConfigError
from evaluation.stage import sample_rows

# ---- launch -------------------------------------------------------------------------------------------


def test_evaluation_num_gpus_relaunches_an_evaluation_job_and_follows_training_otherwise():
    from experiments.launch import Launch, job_launch, needs_launch

    training = OmegaConf.create({"launcher": "deepspeed", "num_gpus": 8, "num_nodes": 1, "hostfile": None})
    one, four = OmegaConf.create({"num_gpus": 1}), OmegaConf.create({"num_gpus": 4})
    assert job_launch(training, four, ["evaluate"]) == Launch("torchrun", 4, source="evaluation")
    assert job_launch(training, four, ["evaluate_base", "report"]) == Launch(
        "torchrun", 4, source="evaluation"
    )
    assert needs_launch(job_launch(training, four, ["evaluate"]), {})
    assert not needs_launch(job_launch(training, four, ["evaluate"]), {"WORLD_SIZE": "4"})
    assert not needs_launch(job_launch(training, one, ["evaluate"]), {})
    assert not needs_launch(job_launch(training, four, ["prepare"]), {})
    # a training job: evaluate runs on its ranks
    assert job_launch(training, one, ["train", "evaluate"]) == Launch("deepspeed", 8, 1, None)
    assert job_launch(training, OmegaConf.create({"num_gpus": 8}), ["train", "evaluate"]).num_gpus == 8
    with pytest.raises(ConfigError, match="evaluation.num_gpus=4 with training.num_gpus=8"):
        job_launch(training, four, ["train", "evaluate"])


# ---- backend configuration ----------------------------------------------------------------------------


def test_batch_sizes_as_lm_eval_takes_them_and_bad_ones_named():
    from evaluation.backend import BackendConfig, parse_batch_size

    assert [parse_batch_size(v) for v in (1, "8", "auto", "auto:4", "auto:2.5")] == [
        1,
        8,
        "auto",
        "auto:4",
        "auto:2.5",
    ]
    for bad in (0, "big", "auto:", "auto:x", True, 1.5, None):
        with pytest.raises(ConfigError, match="evaluation.batch_size="):
            parse_batch_size(bad)
    with pytest.raises(ConfigError, match="evaluation.backend=tgi"):
        BackendConfig(backend="tgi")
    with pytest.raises(
        ConfigError, match="evaluation.tensor_parallel_size=2 applies to evaluation.backend=vllm"
    ):
        BackendConfig(tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="evaluation.data_parallel_size=0"):
        BackendConfig(backend="vllm", data_parallel_size=0)


def test_batch_size_auto_reaches_hflm_and_is_detected_per_rank(make_cfg, tmp_path):
    """`evaluation.batch_size=auto` used to stop at int('auto'). lm-eval's HFLM takes the minimum of the
    ranks' detected sizes with a collective inside generate_until; ours detects per rank (a rank whose
    prompts all replay from its cache never reaches that collective)."""
    from evaluation.backend import BackendConfig, load_lm
    from evaluation.stage import check_config

    check_config(make_cfg("debug=tiny", "evaluation.batch_size=auto:2"))
    with pytest.raises(ConfigError, match="evaluation.batch_size=many"):
        check_config(make_cfg("debug=tiny", "evaluation.batch_size=many"))
    conf = BackendConfig(max_length=32, batch_size="auto:2", device="cpu")
    lm = load_lm("tiny_llama", Path.home() / ".cache" / "longattn", conf)
    assert (lm.batch_size, lm.batch_schedule, lm.rank, lm.world_size) == ("auto", 2.0, 0, 1)
    lm.max_batch_size = 4
    lm._world_size = 2  # as under two ranks, with no process group: a collective would fail
    assert lm._detect_batch_size() == 4 and lm.world_size == 2


def test_vllm_data_and_tensor_parallel_sizes_reach_lm_eval_and_one_process_is_required(make_cfg, monkeypatch):
    """vLLM is not installed here: the arguments built for lm-eval's VLLM are checked instead."""
    from evaluation import stage
    from evaluation.backend import BackendConfig, vllm_arguments

    conf = BackendConfig.from_conf(
        {"backend": "vllm", "max_length": 32768, "tensor_parallel_size": 2, "data_parallel_size": 4}
    )
    assert vllm_arguments("/models/llama", conf) == {
        "pretrained": "/models/llama",
        "max_length": 32768,
        "tensor_parallel_size": 2,
        "data_parallel_size": 4,
        "truncation_side": "middle",
        "dtype": "auto",
    }
    vllm = ["debug=tiny", "evaluation.backend=vllm", "evaluation.data_parallel_size=8"]
    stage.check_config(make_cfg(*vllm))
    with pytest.raises(ConfigError, match="evaluation.backend=vllm runs in one process"):
        stage.check_config(make_cfg(*vllm, "evaluation.num_gpus=2"))
    monkeypatch.setenv("WORLD_SIZE", "8")  # under training's 8-rank launch
    with pytest.raises(ConfigError, match="this job: 8"):
        stage.check_config(make_cfg(*vllm))


# ---- lm-eval's padding copies -------------------------------------------------------------------------


def _request(text, **gen):
    from lm_eval.api.instance import Instance

    return Instance("generate_until", {}, (text, {"until": [], **gen}), 0)


def test_padding_copies_of_a_greedy_request_are_generated_and_counted_once():
    """lm-eval pads a rank with fewer requests with copies of its last Instance; greedy copies get one
    generation, sampled repeats keep theirs."""
    from evaluation.backend import counting, first_copies

    generated = []

    class StandIn:
        max_length, max_gen_toks = 8, 4

        def tok_encode(self, text):
            return text.split()

        def generate_until(self, requests, disable_tqdm=False):
            generated.extend(requests)
            return [f"answer {r.args[0]}" for r in requests]

    a, b, sampled = _request("a"), _request("b b b b b"), _request("s", do_sample=True)
    requests = [a, b, b, b, sampled, sampled]
    assert first_copies(requests) == [0, 1, 1, 1, 4, 5]
    lm = counting(StandIn)()
    answers = lm.generate_until(requests)
    assert answers == ["answer a", *["answer b b b b b"] * 3, "answer s", "answer s"]
    assert [r.args[0] for r in generated] == ["a", "b b b b b", "s", "s"]
    assert (lm.generated_prompts, lm.truncated_prompts) == (4, 1)  # 5 words + 4 > 8, once


def test_padding_answers_are_dropped_from_the_logged_samples():
    from evaluation.parallel import drop_padding_copies

    rows = {
        "t": [
            {"doc_id": 3, "resps": [["x", "x", "x"]], "filtered_resps": ["x"]},
            {"doc_id": 1, "resps": [["y"]]},
        ]
    }
    out = drop_padding_copies(rows, {"t": {"repeats": 1}})
    assert out == {
        "t": [{"doc_id": 3, "resps": [["x"]], "filtered_resps": ["x"]}, {"doc_id": 1, "resps": [["y"]]}]
    }
    assert drop_padding_copies({"h": [{"resps": [["p", "q"]]}]}, {"h": {"repeats": 2}})["h"][0]["resps"] == [
        ["p", "q"]
    ]


# ---- two ranks, killed and resumed, against one process ----------------------------------------------

# Stops each rank (sleeping, its request cache committed) after its first generated RULER prompt, so the
# test can kill -9 the whole job mid-suite; logs every prompt each rank generates.
PROBE = """
import os, runpy, sys, time
from pathlib import Path
from lm_eval.api import model

probe, rank, counts = Path(os.environ["PROBE_DIR"]), os.environ["RANK"], {}
(probe / f"pid_rank{rank}").write_text(str(os.getpid()))
original = model.CacheHook.add_partial

def add_partial(self, attr, req, res):
    original(self, attr, req, res)
    suite = Path(self.dbdict.filename).name.split("_rank")[0]
    counts[suite] = counts.get(suite, 0) + 1
    with open(probe / f"generated_rank{rank}.txt", "a") as fh:
        fh.write(f"{suite} {model.hash_args(attr, req)}\\n")
    if suite == "ruler":
        (probe / f"stopped_rank{rank}").write_text(str(counts))
        while True:
            time.sleep(60)

model.CacheHook.add_partial = add_partial
sys.argv[0] = os.environ["RUN_PY"]
runpy.run_path(os.environ["RUN_PY"], run_name="__main__")
"""


def _longbench_rows(directory: Path) -> Path:
    """Four LongBench rows; the first two overflow a 1024-token window, one on each of two ranks
    (lm-eval deals the documents out in turn: 0 and 2 to rank 0, 1 and 3 to rank 1)."""
    directory.mkdir(parents=True, exist_ok=True)
    long = {"context": "Paris is the capital of France. " * 200}
    rows = [{**long, "question": "What is the capital?", "answers": ["Paris"]}]
    rows += [{**long, "question": "Which country is it?", "answers": ["France"]}]
    rows += [{"context": "short context", "question": f"Say {w}", "answers": [w]} for w in ("hi", "yo")]
    (directory / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def _sqlite_entries(path: Path) -> int:
    from sqlitedict import SqliteDict

    with SqliteDict(str(path), flag="r") as db:
        return len(db)


def _kill_mid_ruler(root: Path, overrides: list[str], probe_dir: Path) -> None:
    script = probe_dir / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in RUN_ENV_KEYS}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        LONGATTN_RUN_DIR=str(root / "run"),
        PROBE_DIR=str(probe_dir),
        RUN_PY=str(REPO / "run.py"),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)]
    with open(probe_dir / "job.log", "w") as log:
        job = subprocess.Popen(
            [*cmd, *overrides], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 600
            while not all((probe_dir / f"stopped_rank{r}").exists() for r in (0, 1)):
                assert job.poll() is None, (probe_dir / "job.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the two ranks never reached the RULER suite"
                time.sleep(0.5)
        finally:
            # the whole job at once, launcher and ranks: a power cut. torchrun starts its workers in
            # sessions of their own, so the launcher's process group does not hold them: kill them by pid.
            os.killpg(job.pid, signal.SIGKILL)
            for pid_file in probe_dir.glob("pid_rank*"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
            job.wait()


def _by_doc(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["doc_id"], r["filter"]))


@pytest.mark.slow
def test_two_ranks_killed_mid_suite_resume_and_match_one_process(make_cfg, tmp_path):
    """torchrun, 2 ranks on gloo: NIAH grid (9 cells: one rank gets a padding copy), RULER synthetic
    tasks, LongBench with two over-long prompts. kill -9 of the job in RULER; the rerun
    (`evaluation.num_gpus=2`, relaunched under torchrun) reuses the NIAH record, replays each rank's
    cached RULER answer and generates only the rest; its results and per-sample records equal a
    one-process run's, and the truncation counts and NIAH cells cover both ranks."""
    from experiments.pipeline import run_pipeline

    overrides = [
        "debug=tiny",
        "stages=[evaluate]",
        "evaluation.model=tiny_llama",
        "evaluation.device=cpu",
        "evaluation.suites=[niah,ruler,longbench]",
        "evaluation.niah.lengths=[256,384,512]",
        "evaluation.niah.depths=[0,50,100]",
        "evaluation.ruler.tasks=[niah_single_1,ruler_vt]",
        "evaluation.ruler.lengths=[1024]",  # lm-eval's VT generator loops forever at 512 (its example alone overflows)
        "evaluation.ruler.samples=2",
        "evaluation.longbench.tasks=[hotpotqa]",
        f"evaluation.longbench.data_dir={_longbench_rows(tmp_path / 'longbench')}",
    ]
    one = run_pipeline(make_cfg(*overrides, root=tmp_path / "one"))["evaluate"]
    one_dir = Path(json.loads((tmp_path / "one" / "run" / "artifacts.json").read_text())["evaluate"])

    root, probe = tmp_path / "two", tmp_path / "probe"
    probe.mkdir()
    _kill_mid_ruler(root, [*overrides, f"paths.root_dir={root}"], probe)
    [out] = (root / "artifacts" / "evaluate").iterdir()
    assert (out / "suites" / "niah.json").is_file() and not (out / "suites" / "ruler.json").exists()
    logs = {r: (probe / f"generated_rank{r}.txt").read_text().split() for r in (0, 1)}
    suites = {r: log[::2] for r, log in logs.items()}
    hashes = {r: log[1::2] for r, log in logs.items()}
    assert {r: s.count("niah") for r, s in suites.items()} == {0: 5, 1: 4}  # 9 cells, the copy generated once
    assert {r: s.count("ruler") for r, s in suites.items()} == {0: 1, 1: 1}
    assert not set(hashes[0]) & set(hashes[1])  # no prompt on both ranks
    assert [_sqlite_entries(out / "request_cache" / f"ruler_rank{r}.db") for r in (0, 1)] == [1, 1]

    done = run_cli(
        *overrides,
        "evaluation.num_gpus=2",
        f"paths.root_dir={root}",
        env={"LONGATTN_RUN_DIR": str(root / "run")},
    )
    assert "torch.distributed.run --nproc_per_node=2" in done.stdout
    two = json.loads((out / "manifest.json").read_text())
    assert two["world_size"] == 2
    ranks = {name: p["ranks"] for name, p in two["protocol"].items()}
    assert ranks["niah"]["generated_prompts"] == [5, 4]  # the record written before the kill
    assert ranks["ruler"]["generated_prompts"] == [1, 1]  # 2 per rank, 1 replayed from each rank's cache
    assert ranks["longbench"] == {"world_size": 2, "generated_prompts": [2, 2], "truncated_prompts": [1, 1]}
    assert two["truncated_prompts"] == one["truncated_prompts"] == 2

    results = {d: json.loads((d / "results.json").read_text()) for d in (one_dir, out)}
    for key in ("scores", "suites", "truncated_prompts", "max_length", "lm_eval_version"):
        assert results[out][key] == results[one_dir][key], key
    assert len(results[out]["suites"]["niah"]["grid"]) == 9  # every rank's cells in the heatmap's grid
    for name in ("niah", "ruler", "longbench"):
        for key in ("samples", "num_fewshot", "truncated_prompts"):
            assert results[out]["protocol"][name][key] == results[one_dir]["protocol"][name][key]
    for task in ("niah_grid", "niah_single_1", "ruler_vt", "longbench_hotpotqa"):
        assert _by_doc(sample_rows(out, task)) == _by_doc(sample_rows(one_dir, task)), task
    assert (out / "niah_grid.csv").read_text() == (one_dir / "niah_grid.csv").read_text()
    assert not (out / "request_cache").exists()
