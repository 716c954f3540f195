"""Training data and plumbing without DeepSpeed: pools, mixture order, rank sharding, checkpoints,
DeepSpeed config filling, the launcher command, document masking and the chunked-loss wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_packed_lm
from datasets import Dataset

from common.errors import ConfigError
from training import checkpoints
from training.config import TrainConfig
from training.data import (
    MixtureSequences,
    TrainingDataError,
    _write_pool,
    plan_mixture,
    rank_indices,
    short_rows,
)
from training.engine import deepspeed_config, offloads_optimizer, zero_stage
from training.schedule import plan_steps


def _pool(tmp_path: Path, name: str, n: int, seq_len: int = 4) -> Dataset:
    path = tmp_path / f"{name}.arrow"
    rows = [{"input_ids": [i] * seq_len, "position_ids": list(range(seq_len))} for i in range(n)]
    assert _write_pool(path, rows, batch=3) == n
    return Dataset.from_file(str(path))


def test_plan_mixture_drops_zero_shares_and_rejects_name_clashes():
    plan = plan_mixture(
        {"long": {"code": 0.45, "docs": 0.45}, "short": {"wiki": 0.1, "web": 0.0}}, 1000, seed=3
    )
    assert plan.schedule.names == ["code", "docs", "wiki"]
    assert sum(plan.demand.values()) == 1000
    assert abs(plan.demand["wiki"] / 1000 - 0.1) < 0.03
    with pytest.raises(TrainingDataError, match="also long domains"):
        plan_mixture({"long": {"code": 1.0}, "short": {"code": 0.1}}, 10, seed=0)


def test_mixture_sequences_visit_every_pool_row_once_per_pass(tmp_path):
    pools = {"a": _pool(tmp_path, "a", 5), "b": _pool(tmp_path, "b", 3)}
    plan = plan_mixture({"long": {"a": 0.5, "b": 0.5}, "short": {}}, 40, seed=11)
    seqs = MixtureSequences(pools, plan, seed=11)
    rows_by_source: dict[str, list[int]] = {"a": [], "b": []}
    for k in range(len(seqs)):
        name, row = seqs.locate(k)
        rows_by_source[name].append(row)
        assert int(seqs[k]["input_ids"][0]) == row  # the pool row's content comes back
    for name, rows in rows_by_source.items():
        size = len(pools[name])
        full_passes = len(rows) // size
        assert full_passes >= 2
        for p in range(full_passes):
            assert sorted(rows[p * size : (p + 1) * size]) == list(range(size))
        # successive passes use different permutations
        assert rows[:size] != rows[size : 2 * size] or size < 3
    # the same seed gives the same order; another seed another
    again = MixtureSequences(pools, plan, seed=11)
    assert [again.locate(k) for k in range(40)] == [seqs.locate(k) for k in range(40)]
    other = MixtureSequences(pools, plan_mixture({"long": {"a": 0.5, "b": 0.5}, "short": {}}, 40, 12), 12)
    assert [other.locate(k) for k in range(40)] != [seqs.locate(k) for k in range(40)]


@pytest.mark.parametrize(("world", "micro"), [(1, 1), (2, 1), (4, 2), (8, 1)])
def test_rank_indices_partition_each_step_whatever_the_world_size(world, micro):
    per_step = 8
    accumulation = per_step // (world * micro)
    for step in (0, 3):
        taken = [
            k
            for rank in range(world)
            for mb in rank_indices(step, per_step, accumulation, micro, world, rank)
            for k in mb
        ]
        assert sorted(taken) == list(range(step * per_step, (step + 1) * per_step))
        assert all(
            len(mb) == micro
            for rank in range(world)
            for mb in rank_indices(step, per_step, accumulation, micro, world, rank)
        )


def test_short_rows_pack_with_eos_and_stop_at_the_demand(tmp_path, smollm2_tokenizer):
    from common.corpus import SourceSpec

    docs = tmp_path / "wiki.jsonl"
    docs.write_text("".join(f'{{"text": "document number {i} says hello"}}\n' for i in range(40)))
    spec = SourceSpec(domain="wiki", path=str(docs), format="jsonl")
    rows = list(short_rows([spec], smollm2_tokenizer, seq_len=32, limit=3, on_bad_record="error"))
    assert len(rows) == 3
    eos = smollm2_tokenizer.eos_token_id
    first_doc = smollm2_tokenizer("document number 0 says hello", add_special_tokens=False)["input_ids"]
    assert rows[0]["input_ids"][: len(first_doc) + 1] == [*first_doc, eos]
    assert rows[0]["position_ids"][: len(first_doc) + 2] == [*range(len(first_doc) + 1), 0]
    assert all(len(r["input_ids"]) == 32 == len(r["position_ids"]) for r in rows)


def test_short_source_missing_from_training_config_names_the_key(make_cfg):
    from training.train import short_specs

    conf = TrainConfig.from_cfg(make_cfg())
    with pytest.raises(TrainingDataError, match=r"training.short_sources has no 'web' entry"):
        short_specs(conf, "web", 0.04)


def test_a_short_source_the_mixture_never_draws_need_not_exist(make_cfg, tmp_path):
    """cpt_32k lists wiki, github and web; with github and web at share 0 only wiki's files are read."""
    from common.corpus import CorpusError
    from training.train import fingerprint_extras

    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text('{"text": "a short page"}\n')
    sources = ["training=cpt_32k", f"training.short_sources.wiki=[{{path: '{wiki}'}}]"]  # github, web: absent
    unused = make_cfg(*sources, "selection.mixture.short={wiki: 0.1, github: 0.0, web: 0.0}")
    assert list(fingerprint_extras(unused)) == ["wiki"]
    drawn = make_cfg(*sources, "selection.mixture.short={wiki: 0.05, github: 0.05, web: 0.0}")
    with pytest.raises(CorpusError, match="short/github: matches no file"):
        fingerprint_extras(drawn)


def test_training_config_rejects_unknown_keys_and_bad_values(make_cfg):
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_cfg(make_cfg("+training.learning_rate=1"))
    with pytest.raises(ValueError, match="training.precision=fp8"):
        TrainConfig.from_cfg(make_cfg("training.precision=fp8"))
    with pytest.raises(ValueError, match="training.deepspeed=zero9"):
        TrainConfig.from_cfg(make_cfg("training.deepspeed=zero9")).deepspeed_path()


@pytest.mark.parametrize(
    ("name", "stage", "offload"), [("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)]
)
def test_deepspeed_templates_are_filled_from_the_training_config(make_cfg, name, stage, offload):
    conf = TrainConfig.from_cfg(make_cfg("experiment=longattn_32k", f"training.deepspeed={name}"))
    plan = plan_steps(
        conf.budget_tokens, conf.global_batch_tokens, conf.seq_len, conf.micro_batch, world_size=4
    )
    ds = deepspeed_config(conf, plan)
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 16  # the paper's 64 sequences over 4 ranks
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    # bf16 weights, but gradients accumulated and reduced in fp32 (as Megatron)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert zero_stage(ds) == stage and offloads_optimizer(ds) is offload
    assert "auto" not in repr(ds)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_reads_the_fp32_gradient_keys(make_cfg):
    """The keys are the ones DeepSpeed 0.19 parses (DeepSpeedConfig), and bf16 stays selectable."""
    from deepspeed.runtime.config import DeepSpeedConfig

    conf = TrainConfig.from_cfg(make_cfg("training.grad_reduce_dtype=bf16"))
    ds = deepspeed_config(conf, plan_steps(conf.budget_tokens, conf.global_batch_tokens, conf.seq_len))
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    parsed = DeepSpeedConfig(ds)
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.bfloat16
    with pytest.raises(ValueError, match="training.grad_accum_dtype=fp16"):
        TrainConfig.from_cfg(make_cfg("training.grad_accum_dtype=fp16"))


def test_checkpoints_resume_only_from_complete_ones_and_prune(tmp_path):
    base = tmp_path / checkpoints.CHECKPOINTS_DIR
    for step in (2, 4, 6, 8):
        (base / f"step-{step}").mkdir(parents=True)
    for step in (2, 4, 6):
        checkpoints.mark_complete(tmp_path, step, {"tokens_seen": step * 10})
    # step-8 was being written when the run died
    assert checkpoints.latest_complete(tmp_path) == 6
    assert checkpoints.read_state(tmp_path, 6) == {"step": 6, "tokens_seen": 60}
    assert checkpoints.prune(tmp_path, keep=2) == [2]
    assert sorted(p.name for p in base.iterdir()) == ["step-4", "step-6", "step-8"]
    (base / "step-5").mkdir()  # an incomplete one older than the newest complete: left by a killed save
    assert checkpoints.prune(tmp_path, keep=2) == [5]


def test_launcher_commands():
    from omegaconf import OmegaConf

    from experiments.launch import Launch, job_launch, launch_command, needs_launch

    def launch(num_gpus, stages):
        training = OmegaConf.create({"launcher": "torchrun", "num_gpus": num_gpus, "num_nodes": 1})
        return job_launch(training, OmegaConf.create({"num_gpus": 1}), stages)

    assert needs_launch(launch(8, ["train"]), {}) and not needs_launch(launch(1, ["train"]), {})
    assert not needs_launch(launch(8, ["prepare", "score"]), {})
    assert not needs_launch(launch(8, ["train"]), {"WORLD_SIZE": "8"})  # already under a launcher
    cmd = launch_command(Launch("torchrun", 8), "run.py", ["experiment=longattn_32k"], {})
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=8",
        "--standalone",
        "run.py",
        "experiment=longattn_32k",
    ]
    ds = launch_command(Launch("deepspeed", 4), "run.py", ["a=b"], {})
    assert ds == ["deepspeed", "--num_gpus=4", "--num_nodes=1", "--no_local_rank", "run.py", "a=b"]


def test_torchrun_on_two_nodes_is_one_command_per_node_joined_by_a_rendezvous():
    """The same command on both nodes (SLURM: one task per node); the c10d rendezvous assigns node ranks."""
    from experiments.launch import Launch, launch_command

    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "29600", "LONGATTN_RUN_DIR": "/shared/runs/a"}
    cmd = launch_command(Launch("torchrun", 8, 2), "run.py", ["experiment=longattn_32k"], env)
    run_id = launch_command(Launch("torchrun", 8, 2), "run.py", [], env)[-2].split("=")[1]
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=8",
        "--nnodes=2",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29600",
        f"--rdzv_id={run_id}",
        "run.py",
        "experiment=longattn_32k",
    ]
    assert run_id.startswith("run-")  # the run directory's hash: the same on every node
    slurm = launch_command(Launch("torchrun", 8, 2), "run.py", [], {**env, "SLURM_JOB_ID": "77"})
    assert "--rdzv_id=slurm-77" in slurm
    default_port = launch_command(Launch("torchrun", 8, 2), "run.py", [], {**env, "MASTER_PORT": ""})
    assert "--rdzv_endpoint=node0:29500" in default_port
    with pytest.raises(ConfigError, match="set MASTER_ADDR and LONGATTN_RUN_DIR on every node"):
        launch_command(Launch("torchrun", 8, 2), "run.py", [], {})


def test_deepspeed_runner_needs_a_hostfile_and_gets_the_job_environment(tmp_path):
    import stat

    from experiments.launch import Launch, launch_command, write_deepspeed_env

    with pytest.raises(ConfigError, match="needs training.hostfile"):
        launch_command(Launch("deepspeed", 8, 2), "run.py", [], {})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    cmd = launch_command(Launch("deepspeed", 8, 2, str(hostfile)), "run.py", ["a=b"], {})
    assert cmd == [
        "deepspeed",
        "--num_gpus=8",
        "--num_nodes=2",
        f"--hostfile={hostfile}",
        "--no_local_rank",
        "run.py",
        "a=b",
    ]
    env = {
        "LONGATTN_RUN_DIR": "/shared/run",
        "HF_HOME": "/shared/hf",
        "WANDB_MODE": "offline",
        "TORCH_EXTENSIONS_DIR": "/shared/ext",
        "HOME": "/home/me",
        "MULTI": "a\nb",
    }
    path = write_deepspeed_env(tmp_path / "run", env)
    assert path.read_text().splitlines() == [
        "HF_HOME=/shared/hf",
        "LONGATTN_RUN_DIR=/shared/run",
        "TORCH_EXTENSIONS_DIR=/shared/ext",
        "WANDB_MODE=offline",
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # may hold HF_TOKEN / WANDB_API_KEY


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(attn):
    """Position ids restarting at a document start give a block-diagonal causal mask."""
    lm = tiny_packed_lm(attn)
    doc_a, doc_b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.tensor([[*range(5), *range(7)]])
    with torch.no_grad():
        together = lm.base_model(input_ids=packed, position_ids=positions).last_hidden_state
        alone = lm.base_model(input_ids=doc_b, position_ids=torch.arange(7)[None]).last_hidden_state
        unmasked = lm.base_model(input_ids=packed).last_hidden_state
    assert torch.allclose(together[:, 5:], alone, atol=1e-5)
    assert not torch.allclose(unmasked[:, 5:], alone, atol=1e-3)  # without the reset, doc b sees doc a


def test_chunked_loss_model_sums_what_the_hf_loss_averages():
    from training.model import ChunkedLossLM
    from training.targets import count_targets, next_token_labels

    lm = tiny_packed_lm()
    ids = torch.randint(0, 64, (2, 13))
    positions = torch.arange(13).expand(2, 13)
    labels = next_token_labels(ids, positions)  # one document per row: only position 0, never a target
    assert count_targets(labels) == 24
    wrapped = ChunkedLossLM(lm, chunk_tokens=5)
    ours = wrapped(input_ids=ids, position_ids=positions, labels=labels) / 24
    theirs = lm(input_ids=ids, labels=ids).loss
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours.backward()
    grad_ours = lm.model.embed_tokens.weight.grad.clone()
    lm.zero_grad()
    lm(input_ids=ids, labels=ids).loss.backward()
    assert torch.allclose(grad_ours, lm.model.embed_tokens.weight.grad, atol=1e-6)


def test_training_model_config_sets_abf_theta_dropout_and_positions(tmp_path):
    from common.model_sources import resolve_model_path
    from training.model import rope_theta_of, training_config

    conf = TrainConfig(seq_len=65536, budget_tokens=1, global_batch_tokens=65536, rope_theta=8e6, dropout=0.1)
    path = resolve_model_path("tiny_llama", None)
    config = training_config(path, None, conf)
    assert rope_theta_of(config) == 8e6
    assert config.attention_dropout == 0.1
    assert config.max_position_embeddings == 65536
    assert config.use_cache is False
