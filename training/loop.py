"""The training loop on a DeepSpeed engine: resume, steps, metrics, checkpoints, the final HF model."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.distributed import rank_info
from common.model_sources import load_tokenizer
from common.tracking import Tracker
from training import checkpoints, metrics
from training.config import TrainConfig
from training.data import MixtureSequences, rank_indices
from training.engine import (
    build_optimizer,
    build_scheduler,
    deepspeed_config,
    init_distributed,
    training_device,
    zero_stage,
)
from training.flops import flops_per_token, non_embedding_params
from training.model import ChunkedLossLM, load_causal_lm, rope_theta_of
from training.schedule import StepPlan

log = logging.getLogger(__name__)

MODEL_DIR = "model"


@dataclass
class TrainJob:
    conf: TrainConfig
    model_name: str
    cache_dir: Path
    sequences: MixtureSequences
    plan: StepPlan
    seed: int
    out_dir: Path
    tracker: Tracker


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout randomness per (step, rank): reproducible after a resume without saving RNG states."""
    return (seed * 1_000_003 + step * 1_009 + rank) % 2**63


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def _resume_step(job: TrainJob) -> int | None:
    if job.conf.resume == "never":
        return None
    return checkpoints.latest_complete(job.out_dir)


def _save_checkpoint(engine, job: TrainJob, step: int, state: dict[str, Any]) -> None:
    root = job.out_dir / checkpoints.CHECKPOINTS_DIR
    engine.save_checkpoint(str(root), tag=checkpoints.step_tag(step), client_state=state, save_latest=False)
    _barrier()
    if rank_info().is_main:
        checkpoints.mark_complete(job.out_dir, step, state)
        checkpoints.prune(job.out_dir, job.conf.keep_checkpoints)
    _barrier()


def _save_final_model(engine, lm, job: TrainJob, resolved_config: dict[str, Any]) -> Path:
    """A Hugging Face directory (weights, config with the ABF theta, tokenizer), written atomically."""
    if engine.zero_optimization_stage() == 3:
        # needs stage3_gather_16bit_weights_on_model_save; every rank takes part in the gather
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    target = job.out_dir / MODEL_DIR
    if rank_info().is_main:
        tmp = job.out_dir / f"{MODEL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lm_state = {k.removeprefix("lm."): v for k, v in state.items()}
        lm.config.use_cache = True  # off only for training; generation without a KV cache is quadratic
        lm.save_pretrained(tmp, state_dict=lm_state, safe_serialization=True)
        load_tokenizer(job.model_name, job.cache_dir).save_pretrained(tmp)
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(resolved_config), tmp / "training_config.yaml")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    _barrier()
    return target


def train(job: TrainJob, resolved_config: dict[str, Any]) -> dict[str, Any]:
    """Runs (or resumes) the job; returns the manifest on rank 0 and None elsewhere."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    conf, plan = job.conf, job.plan
    ranks = rank_info()
    device = training_device(conf.device, ranks)
    init_distributed(device, ranks)
    world = torch.distributed.get_world_size()
    ds_config = deepspeed_config(conf, plan)
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None  # ZeRO-3: partitioned load
    try:
        torch.manual_seed(job.seed)
        lm = load_causal_lm(job.model_name, job.cache_dir, conf, device)
        config = lm.config
        flops_tok = flops_per_token(
            non_embedding_params(lm), config.num_hidden_layers, config.hidden_size, conf.seq_len
        )
        model = ChunkedLossLM(lm, conf.loss_chunk_tokens)
        optimizer = build_optimizer(model, conf, ds_config, device)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            # a factory: DeepSpeed hands it the wrapped optimizer, whose groups ZeRO-3 may have rebuilt
            lr_scheduler=lambda wrapped: build_scheduler(wrapped, conf, plan.steps),
            config=ds_config,
        )
        start = 0
        resumed_from = _resume_step(job)
        if resumed_from is not None:
            engine.load_checkpoint(
                str(job.out_dir / checkpoints.CHECKPOINTS_DIR), tag=checkpoints.step_tag(resumed_from)
            )
            start = resumed_from
            log.info("train: resumed from %s", job.out_dir / checkpoints.CHECKPOINTS_DIR / f"step-{start}")
        if ranks.is_main:
            metrics.truncate_records(job.out_dir, start)
        last = min(plan.steps, conf.max_steps) if conf.max_steps else plan.steps
        peak = metrics.peak_flops_for(device, conf.peak_flops)
        sequences_per_step = plan.tokens_per_step // conf.seq_len
        if ranks.is_main:
            log.info(
                "train: %s; world size %d, grad accumulation %d",
                plan.describe(),
                world,
                plan.grad_accumulation,
            )
        engine.train()
        for step in range(start, last):
            torch.manual_seed(step_seed(job.seed, step, ranks.rank))
            began = time.perf_counter()
            lr = float(scheduler.get_last_lr()[0])  # the rate this step uses
            losses = []
            for micro in rank_indices(
                step, sequences_per_step, plan.grad_accumulation, conf.micro_batch, world, ranks.rank
            ):
                items = [job.sequences[k] for k in micro]
                batch = {key: torch.stack([it[key] for it in items]).to(device) for key in items[0]}
                loss = engine(**batch)
                engine.backward(loss)
                engine.step()
                losses.append(float(loss.detach()))
            done = step + 1
            elapsed = time.perf_counter() - began
            if done % conf.log_every == 0 or done == last:
                tokens_per_s = plan.tokens_per_step / elapsed / world
                grad = engine.get_global_grad_norm()
                record = {
                    "step": done,
                    "loss": _mean_over_ranks(sum(losses) / len(losses), device),
                    "lr": lr,
                    "grad_norm": None if grad is None else float(grad),
                    "tokens_seen": done * plan.tokens_per_step,
                    "tokens_per_s_per_device": tokens_per_s,
                    "mfu": None if peak is None else tokens_per_s * flops_tok / peak,
                    "memory_gib": metrics.peak_memory_gib(device),
                    "step_seconds": elapsed,
                }
                if ranks.is_main:
                    print(metrics.format_line(record, plan.steps), flush=True)
                    metrics.append_record(job.out_dir, record)
                    # no explicit wandb step: earlier stages already advanced it; plot against train/step
                    job.tracker.log_metrics({f"train/{k}": v for k, v in record.items()})
            if done % conf.save_every == 0 or done == last:
                state = {
                    "tokens_seen": done * plan.tokens_per_step,
                    "sequences_seen": done * sequences_per_step,
                }
                _save_checkpoint(engine, job, done, state)
        model_dir = _save_final_model(engine, lm, job, resolved_config)
    finally:
        if hf_ds is not None:
            unset_hf_deepspeed_config()  # else a later from_pretrained in this process builds empty ZeRO-3 weights
    if not ranks.is_main:
        return None
    records = metrics.read_records(job.out_dir)
    return {
        "model_dir": str(model_dir),
        "steps": last,
        "planned_steps": plan.steps,
        "tokens": last * plan.tokens_per_step,
        "tokens_per_step": plan.tokens_per_step,
        "grad_accumulation": plan.grad_accumulation,
        "world_size": world,
        "resumed_from_step": resumed_from,
        "rope_theta": rope_theta_of(config),
        "flops_per_token": flops_tok,
        "zero_stage": zero_stage(ds_config),
        "first_loss": records[0]["loss"] if records else None,
        "final_loss": records[-1]["loss"] if records else None,
        "mean_tokens_per_s_per_device": (
            sum(r["tokens_per_s_per_device"] for r in records) / len(records) if records else None
        ),
    }
