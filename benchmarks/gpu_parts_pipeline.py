"""The GPU suite's pipeline parts (benchmarks/gpu_suite.py): the score stage end to end, one training
step at 32K as the train stage reports it, and the evaluation mechanics at 8K-32K. Same contract as
benchmarks/gpu_parts.py: `part(mode, work, rec)`, results recorded as they come.

Models carry random weights in the real shapes (no weights travel to the device): SmolLM2-135M's shape
with its real tokenizer for scoring and evaluation, a 4-layer Llama-3-8B shape (128,256-token vocabulary,
SmolLM2's tokenizer ids are a subset) for training. In smoke mode (CPU) the embedded tiny_llama.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_parts import ROOT, Recorder, on_gpu

SCORE_METHODS = ("longattn", "ladm", "prolong", "random", "longppl", "longfilter", "ppl_gain", "compression")
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32}
LLAMA3_8B.update(num_key_value_heads=8, vocab_size=128256, rope_theta=5e5)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 16}
TINY.update(num_key_value_heads=2, vocab_size=49152, rope_theta=5e5)
# Sizes only differ between the device and the CPU smoke run: the configs and stages are the same.
SIZES = {
    "full": {
        "scorer": "smollm2_shaped",  # random weights, SmolLM2-135M's shape and tokenizer
        "score_window": 8192,
        "score_windows_per_domain": 8,
        "score_extra": [],
        "train_model": LLAMA3_8B,
        "train_layers": 4,
        "train_seq": 32768,
        "bench_step": ("8b", 4, 32768, 2),
        "bench_attn": ("sdpa", "flex_attention"),
        "eval_lengths": [8192, 16384, 32768],
        "eval_suites": "[niah,ruler]",
        "num_proc": 8,
    },
    "smoke": {
        "scorer": "tiny_llama",
        "score_window": 4608,  # the paper geometry needs more than 4096 (LongPPL's short context, PPL gain's chunk)
        "score_windows_per_domain": 2,
        # ProLong's 500 pairs of vocabulary-wide logits cost ~50 s per window on a CPU: 20 here
        "score_extra": ["+demo_scale={prolong_sample_pairs: 20}"],
        "train_model": TINY,
        "train_layers": 2,
        "train_seq": 512,
        "bench_step": ("tiny", None, 256, 1),
        "bench_attn": ("sdpa",),  # FlexAttention has no CPU backward
        "eval_lengths": [256, 512],
        "eval_suites": "[niah]",  # RULER's generators cost ~20 s and 1 GB to import: the device runs them
        "num_proc": 1,
    },
}


def compose(work: Path, overrides: list[str]):
    """The run's config as run.py composes it, with every path under `work` and tracking off."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(
            config_name="config", overrides=["logger=none", f"paths.root_dir={work}", *overrides]
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(work / "run")
    GlobalHydra.instance().clear()
    return cfg


def _save_random(out: Path, config, dtype) -> str:
    """A model directory with seeded random weights of `config` and SmolLM2's tokenizer, built once."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from common.model_sources import default_cache_dir, smollm2_tokenizer_dir

    if (out / "config.json").is_file():
        return str(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu() else "cpu"):  # initialise where it is fast
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(default_cache_dir())).save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def scorer_model(work: Path, mode: str) -> str:
    return smollm2_shaped(work) if SIZES[mode]["scorer"] == "smollm2_shaped" else SIZES[mode]["scorer"]


def smollm2_shaped(work: Path) -> str:
    import torch
    from transformers import AutoConfig

    from common.model_sources import default_cache_dir, smollm2_tokenizer_dir

    config = AutoConfig.from_pretrained(smollm2_tokenizer_dir(default_cache_dir()))  # its config.json
    return _save_random(work / "smollm2_random", config, torch.float32)


def train_model(work: Path, mode: str) -> str:
    """A Llama-3-8B-shaped model (full: its width and 128,256-token vocabulary; smoke: tiny) with few
    layers, random bf16 weights and SmolLM2's tokenizer, whose ids are a subset of the vocabulary."""
    import torch
    from transformers import LlamaConfig

    sizes = SIZES[mode]
    config = LlamaConfig(
        **sizes["train_model"],
        num_hidden_layers=sizes["train_layers"],
        max_position_embeddings=sizes["train_seq"],
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_random(work / f"llama_{mode}_{sizes['train_layers']}layers_random", config, torch.bfloat16)


# ---- 5. the score stage end to end ----------------------------------------------------------------


def part_score_e2e(mode: str, work: Path, rec: Recorder) -> None:
    """`python run.py -m stages=[prepare,score] selection=<every scorer> ...` (one multirun: the members
    share the prepare artifact), windows/s per method from the score manifests."""
    import pyarrow.parquet as pq

    sizes = SIZES[mode]
    model = scorer_model(work, mode)
    root = work / "score_e2e"
    args = ["-m", "logger=none", f"paths.root_dir={root}", f"hydra.sweep.dir={root}/multirun"]
    args += ["stages=[prepare,score]", f"selection={','.join(SCORE_METHODS)}"]
    # the paper geometry: no experiment, so no demo_scale (LADM chunks of 128, ProLong 128 / 500 pairs)
    args += ["~experiment", f"model.name_or_path={model}", f"selection.scorer_model.name_or_path={model}"]
    args += [f"data.window_size={sizes['score_window']}", f"data.num_proc={sizes['num_proc']}"]
    args += [f"data.max_windows_per_domain={sizes['score_windows_per_domain']}", *sizes["score_extra"]]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT)
    rec.set("run", {"returncode": done.returncode, "seconds": time.perf_counter() - began, "args": args})
    methods = {}
    for manifest_path in sorted((root / "artifacts" / "score").glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        table = pq.read_table(manifest_path.parent / "scores.parquet")
        columns = [c for c in table.column_names if c not in ("id", "domain", "n_tokens")]
        finite = all(math.isfinite(v) for c in columns for v in table.column(c).to_pylist())
        seconds = manifest["score_seconds"]
        methods[manifest["method"]] = {
            "windows": manifest["windows"],
            "score_seconds": seconds,
            "windows_per_s": manifest["windows"] / seconds if seconds else None,
            "tokens_per_s": sum(table.column("n_tokens").to_pylist()) / seconds if seconds else None,
            "all_finite": finite,
        }
        if not finite:
            rec.fail(f"{manifest['method']}: non-finite scores")
    rec.set("methods", methods)
    if done.returncode != 0 or sorted(methods) != sorted(SCORE_METHODS):
        rec.fail(f"run.py exit {done.returncode}; scored {sorted(methods)}")


# ---- 6. one training step at 32K ------------------------------------------------------------------


def _train_overrides(mode: str, work: Path) -> list[str]:
    """cpt_32k as the paper runs it (bf16, ZeRO-2 here, dropout 0.1, chunked loss, activation checkpointing,
    ABF), at seq_len `train_seq`: 3 steps of 2 sequences drawn half from long windows, half from packed
    short documents (pydoc's topics, as the demo's wiki)."""
    seq = SIZES[mode]["train_seq"]
    return [
        "~experiment",
        "training=cpt_32k",
        "stages=[prepare,select,train]",
        "selection=all",
        f"model.name_or_path={train_model(work, mode)}",
        "data.sources=[{domain: code, format: python_code}]",
        f"data.window_size={seq}",
        "data.max_windows_per_domain=4",
        f"data.num_proc={SIZES[mode]['num_proc']}",
        "selection.mixture.long_share=0.5",
        "selection.mixture.short={wiki: 0.5, github: 0.0, web: 0.0}",
        "training.short_sources.wiki=[{format: python_docs, options: {modules: []}}]",
        f"training.seq_len={seq}",
        f"training.budget_tokens={6 * seq}",
        f"training.global_batch_tokens={2 * seq}",
        "training.log_every=1",
        "training.num_gpus=1",
        "training.deepspeed=zero2",
        "training.save_every=1000",
        "training.checkpoint_at_end=false",  # ~27 GB of optimizer state at this shape (arithmetic): no time
    ]


def part_train_step(mode: str, work: Path, rec: Recorder) -> None:
    """(a) the train stage on a 4-layer Llama-3-8B shape at 32,768 tokens, bf16, ZeRO-2, activation
    checkpointing, chunked loss, windows and packed short documents (cpt_32k's dropout 0.1: the attention
    `auto` picks is recorded); (b) benchmarks/bench_train.py's step on one 32K window with sdpa and with
    FlexAttention (dropout 0), no checkpoint writes."""
    from bench_train import measure_step

    from experiments.pipeline import run_pipeline
    from training.metrics import read_records

    root = work / "train_step"
    began = time.perf_counter()
    manifests = run_pipeline(compose(root, _train_overrides(mode, root)))
    train = manifests["train"]
    out = Path(train["model_dir"]).parent
    keys = (
        "attn_implementation",
        "steps",
        "zero_stage",
        "tokens_per_step",
        "grad_accumulation",
        "rope_theta",
    )
    rec.set("stage", {k: train.get(k) for k in keys} | {"seconds": time.perf_counter() - began})
    records = read_records(out)
    rec.set("steps", records)
    rec.set("pools", json.loads((out / "data" / "pools.json").read_text()))
    if not records or not all(math.isfinite(r["loss"]) for r in records):
        rec.fail(f"train stage: losses {[r.get('loss') for r in records]}")
    for attn in SIZES[mode]["bench_attn"]:
        try:
            rec.append("bench_step", measure_step(*SIZES[mode]["bench_step"], attn=attn))
        except Exception as exc:  # noqa: BLE001 - recorded; the next variant still runs
            rec.fail(f"bench_train step {attn}: {type(exc).__name__}: {str(exc)[:300]}")


# ---- 7. evaluation mechanics ----------------------------------------------------------------------


def part_eval(mode: str, work: Path, rec: Recorder) -> None:
    """The evaluate stage (HF backend) on a random SmolLM2-shaped model at each length: a NIAH cell and
    two RULER synthetic tasks (full) with one sample each; s/sample, peak memory, truncated prompts."""
    import torch

    from experiments.pipeline import run_pipeline

    sizes = SIZES[mode]
    model = scorer_model(work, mode)
    began = time.perf_counter()  # one-time imports out of the first length's timing: lm-eval, and the
    import lm_eval.models.huggingface  # noqa: F401  word list RULER's generators build on import (~20 s)

    if "ruler" in sizes["eval_suites"]:
        import lm_eval.tasks.ruler.prepare_niah  # noqa: F401
    rec.set("import_seconds", time.perf_counter() - began)
    for length in sizes["eval_lengths"]:
        overrides = [
            "~experiment",
            "stages=[evaluate]",
            f"evaluation.model={model}",
            f"evaluation.max_length={length}",
            f"evaluation.niah.lengths=[{length}]",
            "evaluation.niah.depths=[50]",
            f"evaluation.ruler.lengths=[{length}]",
            "evaluation.ruler.tasks=[niah_single_1,ruler_vt]",
            "evaluation.ruler.samples=1",
            f"evaluation.suites={sizes['eval_suites']}",
        ]
        if on_gpu():
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        evaluate = run_pipeline(compose(work / "eval", overrides))["evaluate"]
        seconds = time.perf_counter() - began
        samples = sum(sum(p["samples"].values()) for p in evaluate["protocol"].values())
        rec.append(
            "lengths",
            {
                "length": length,
                "seconds": seconds,
                "samples": samples,
                "seconds_per_sample": seconds / samples if samples else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu() else None,
                "truncated_prompts": evaluate["truncated_prompts"],
            },
        )
        if evaluate["truncated_prompts"]:
            rec.fail(f"length {length}: {evaluate['truncated_prompts']} prompts truncated")
