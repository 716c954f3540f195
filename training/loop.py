"""The training loop on a DeepSpeed engine: resume, steps, metrics, checkpoints, the final HF model."""

from __future__ import annotations

import json
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
    apply_determinism,
    build_optimizer,
    build_scheduler,
    deepspeed_config,
    init_distributed,
    training_device,
    zero_stage,
)
from training.flops import flops_per_token, mfu, non_embedding_params, squared_document_lengths, step_flops
from training.model import ChunkedLossLM, load_causal_lm, rope_theta_of, with_legacy_rope_fields
from training.schedule import StepPlan
from training.targets import count_targets, micro_batch_loss_scale, next_token_labels

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
        config_file = tmp / "config.json"  # readable with the right RoPE base by transformers 4 too (vLLM)
        config_file.write_text(
            json.dumps(with_legacy_rope_fields(json.loads(config_file.read_text())), indent=2)
        )
        load_tokenizer(job.model_name, job.cache_dir).save_pretrained(tmp)
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(resolved_config), tmp / "training_config.yaml")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    _barrier()
    return target


@dataclass
class Model:
    """The DeepSpeed engine and what the loop reads from the model."""

    engine: Any
    scheduler: Any
    lm: Any
    ds_config: dict[str, Any]
    non_embedding: int
    device: torch.device

    def flops(self, tokens: int, squared_doc_lengths: float) -> float:
        config = self.lm.config
        return step_flops(
            self.non_embedding, config.num_hidden_layers, config.hidden_size, tokens, squared_doc_lengths
        )


def _build(job: TrainJob, device: torch.device, ds_config: dict[str, Any]) -> Model:
    import deepspeed

    conf, plan = job.conf, job.plan
    torch.manual_seed(job.seed)
    lm = load_causal_lm(job.model_name, job.cache_dir, conf, device)
    non_embedding = non_embedding_params(lm)
    model = ChunkedLossLM(lm, conf.loss_chunk_tokens)
    optimizer = build_optimizer(model, conf, ds_config, device)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # a factory: DeepSpeed hands it the wrapped optimizer, whose groups ZeRO-3 may have rebuilt
        lr_scheduler=lambda wrapped: build_scheduler(wrapped, conf, plan.steps),
        config=ds_config,
    )
    return Model(engine, scheduler, lm, ds_config, non_embedding, device)


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _micro_batches(job: TrainJob, step: int, world: int, rank: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the step, with labels (document starts ignored when configured)."""
    conf = job.conf
    batches = []
    for micro in rank_indices(
        step, job.plan.sequences_per_step, job.plan.grad_accumulation, conf.micro_batch, world, rank
    ):
        items = [job.sequences[k] for k in micro]
        batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
        batch["labels"] = next_token_labels(
            batch["input_ids"], batch["position_ids"], conf.ignore_boundary_targets
        )
        batches.append(batch)
    return batches


def _train_step(model: Model, job: TrainJob, step: int) -> dict[str, float]:
    """One optimizer step: every token of the step weighs the same (training/targets.py). Returns the
    step's loss (mean over all its valid targets, all ranks) and its model FLOPs over all ranks."""
    world, rank = torch.distributed.get_world_size(), rank_info().rank
    batches = _micro_batches(job, step, world, rank)
    local = [
        float(sum(count_targets(b["labels"]) for b in batches)),
        float(sum(squared_document_lengths(b["position_ids"]) for b in batches)),
    ]
    device = model.device
    targets, squared_docs = _sum_over_ranks(local, device)
    scale = micro_batch_loss_scale(world, int(targets))
    loss_sum = 0.0
    for batch in batches:
        summed = model.engine(**{k: v.to(device) for k, v in batch.items()})
        model.engine.backward(summed * scale, scale_wrt_gas=False)
        model.engine.step()
        loss_sum += float(summed.detach())
    (total,) = _sum_over_ranks([loss_sum], device)
    return {"loss": total / targets, "flops": model.flops(job.plan.tokens_per_step, squared_docs)}


def _resume(model: Model, job: TrainJob) -> int | None:
    resumed_from = _resume_step(job)
    if resumed_from is not None:
        root = job.out_dir / checkpoints.CHECKPOINTS_DIR
        model.engine.load_checkpoint(str(root), tag=checkpoints.step_tag(resumed_from))
        log.info("train: resumed from %s", root / checkpoints.step_tag(resumed_from))
    return resumed_from


def _log_step(
    job: TrainJob, model: Model, done: int, result: dict[str, float], lr: float, elapsed: float, peak
) -> None:
    """One record: console line, metrics.jsonl and the tracker (rank 0). MFU counts packed documents'
    attention per document (training/flops.py)."""
    world = torch.distributed.get_world_size()
    grad = model.engine.get_global_grad_norm()
    tokens_per_s = job.plan.tokens_per_step / elapsed / world
    record = {
        "step": done,
        "loss": result["loss"],
        "lr": lr,
        "grad_norm": None if grad is None else float(grad),
        "tokens_seen": done * job.plan.tokens_per_step,
        "tokens_per_s_per_device": tokens_per_s,
        "mfu": None if peak is None else mfu(tokens_per_s, result["flops"] / job.plan.tokens_per_step, peak),
        "memory_gib": metrics.peak_memory_gib(model.device),
        "step_seconds": elapsed,
    }
    if rank_info().is_main:
        print(metrics.format_line(record, job.plan.steps), flush=True)
        metrics.append_record(job.out_dir, record)
        # no explicit wandb step: earlier stages already advanced it; plot against train/step
        job.tracker.log_metrics({f"train/{k}": v for k, v in record.items()})


def train(job: TrainJob, resolved_config: dict[str, Any]) -> dict[str, Any]:
    """Runs (or resumes) the job; returns the manifest on rank 0 and None elsewhere."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    conf, plan = job.conf, job.plan
    ranks = rank_info()
    apply_determinism(conf.deterministic)
    device = training_device(conf.device, ranks)
    init_distributed(device, ranks)
    ds_config = deepspeed_config(conf, plan)
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None  # ZeRO-3: partitioned load
    try:
        model = _build(job, device, ds_config)
        resumed_from = _resume(model, job)
        metrics.reset_peak_memory(device)
        start = resumed_from or 0
        if ranks.is_main:
            metrics.truncate_records(job.out_dir, start)
            log.info("train: %s", plan.describe())
        last = min(plan.steps, conf.max_steps) if conf.max_steps else plan.steps
        peak = metrics.peak_flops_for(device, conf.peak_flops)
        model.engine.train()
        for step in range(start, last):
            torch.manual_seed(step_seed(job.seed, step, ranks.rank))
            began = time.perf_counter()
            lr = float(model.scheduler.get_last_lr()[0])  # the rate this step uses
            result = _train_step(model, job, step)
            done = step + 1
            if done % conf.log_every == 0 or done == last:
                _log_step(job, model, done, result, lr, time.perf_counter() - began, peak)
            if done % conf.save_every == 0 or (done == last and conf.checkpoint_at_end):
                state = {
                    "tokens_seen": done * plan.tokens_per_step,
                    "sequences_seen": done * plan.sequences_per_step,
                }
                _save_checkpoint(model.engine, job, done, state)
        model_dir = _save_final_model(model.engine, model.lm, job, resolved_config)
        manifest = _manifest(job, model, model_dir, last, resumed_from) if ranks.is_main else None
        if hasattr(model.engine, "destroy"):  # hooks and optimizer buffers: free the GPU for later stages
            model.engine.destroy()
    finally:
        if hf_ds is not None:
            unset_hf_deepspeed_config()  # else a later from_pretrained in this process builds empty ZeRO-3 weights
    return manifest


def _manifest(
    job: TrainJob, model: Model, model_dir: Path, last: int, resumed_from: int | None
) -> dict[str, Any]:
    plan, config = job.plan, model.lm.config
    records = metrics.read_records(job.out_dir)
    return {
        "model_dir": str(model_dir),
        "steps": last,
        "planned_steps": plan.steps,
        "tokens": last * plan.tokens_per_step,
        "tokens_per_step": plan.tokens_per_step,
        "grad_accumulation": plan.grad_accumulation,
        "world_size": plan.world_size,
        "resumed_from_step": resumed_from,
        "rope_theta": rope_theta_of(config),
        # an unpacked seq_len sequence: the upper bound (packed documents are counted per document in MFU)
        "flops_per_token": flops_per_token(
            model.non_embedding, config.num_hidden_layers, config.hidden_size, job.conf.seq_len
        ),
        "zero_stage": zero_stage(model.ds_config),
        # as the DeepSpeed engine resolved them (fp32 by default: training.grad_accum_dtype / grad_reduce_dtype)
        "grad_accum_dtype": str(model.engine.get_data_types()[1]).removeprefix("torch."),
        "grad_reduce_dtype": str(model.engine.communication_data_type).removeprefix("torch."),
        "attn_implementation": config._attn_implementation,
        "first_loss": records[0]["loss"] if records else None,
        "final_loss": records[-1]["loss"] if records else None,
        "mean_tokens_per_s_per_device": (
            sum(r["tokens_per_s_per_device"] for r in records) / len(records) if records else None
        ),
    }
