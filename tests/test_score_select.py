"""Score and select stages on the tiny model: contract, resume, ranks, determinism, cache reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import selection.score
from common.artifacts import artifact_for
from common.stage import StageContext
from experiments.pipeline import run_pipeline, stage_fingerprints
from selection.scorers.attention_stats import blocked_head_stats
from selection.scorers.first_layer import FirstLayerQK
from selection.scorers.longattn import LongAttnScorer

SMALL = (
    "data.sources=[{domain: code, format: python_code, options: {packages: [json, tomllib]}},"
    "{domain: docs, format: python_docs, options: {modules: [json, textwrap, difflib], reference_topics: false}}]"
)
TINY = [
    "debug=tiny",
    SMALL,
    "data.max_windows_per_domain=10",
    "selection.flush_every=3",
    "selection.batch_size=2",
]


def artifacts(cfg) -> dict[str, Path]:
    return {
        k: Path(v) for k, v in json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text()).items()
    }


def read(path: Path):
    return pq.read_table(path).to_pylist()


@pytest.fixture
def scored(make_cfg):
    cfg = make_cfg(*TINY, "stages=[prepare,score,select]")
    manifests = run_pipeline(cfg)
    return cfg, manifests, artifacts(cfg)


def test_scores_follow_the_contract_and_the_maths(scored, smollm2_dir):
    cfg, manifests, arts = scored
    rows = read(arts["score"] / "scores.parquet")
    assert manifests["score"]["windows"] == len(rows) == 20
    assert list(rows[0]) == ["id", "domain", "n_tokens", "ds", "variance"]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert manifests["score"]["scoring"]["attention"].startswith("non-causal: softmax over all L keys")
    assert manifests["score"]["scoring"]["sequence"] == "bos"
    # Recompute one window by hand: [BOS] + window[:L-1] through the tiny model's first layer, with the
    # default non-causal statistics (the authors' released code).
    window = next(r for r in read(arts["prepare"] / "windows-00000.parquet") if r["id"] == rows[0]["id"])
    qk = FirstLayerQK.from_pretrained("tiny_llama", smollm2_dir.parent.parent)
    ids = torch.tensor([qk.config.bos_token_id] + window["input_ids"][:-1])
    stats = blocked_head_stats(*qk(ids), causal=False)
    assert rows[0]["ds"] == pytest.approx(stats.mean_ds, rel=1e-6)
    assert rows[0]["variance"] == pytest.approx(stats.mean_variance, rel=1e-6)
    assert abs(blocked_head_stats(*qk(ids)).mean_ds - stats.mean_ds) > 1e-4  # causal would differ


def test_selection_contract_and_analysis(scored):
    cfg, manifests, arts = scored
    sel = read(arts["select"] / "selection.parquet")
    assert list(sel[0]) == ["id", "domain", "score", "rank", "n_tokens"]
    assert manifests["select"]["per_domain"] == {
        "code": {"windows": 5, "tokens": 1280, "scored": 10},
        "docs": {"windows": 5, "tokens": 1280, "scored": 10},
    }
    for domain in ("code", "docs"):
        mine = [r for r in sel if r["domain"] == domain]
        assert [r["rank"] for r in mine] == [1, 2, 3, 4, 5]
        assert all(a["score"] >= b["score"] for a, b in zip(mine, mine[1:]))
        assert (arts["select"] / f"hist_{domain}.png").stat().st_size > 1000
    assert "| code |" in (arts["select"] / "analysis.md").read_text()
    examples = (arts["select"] / "examples.md").read_text()
    assert examples.count("## code: best") == 1 and examples.count("### `") == 12
    mixture = json.loads((arts["select"] / "mixture.json").read_text())
    assert mixture["long"] == {"code": 0.45, "docs": 0.45} and mixture["selected_tokens"] == {
        "code": 1280,
        "docs": 1280,
    }


def top_half(scores: list[dict], scope: str) -> dict[str, float]:
    """Per domain, the top half by norm(ds) - 0.5 norm(variance), min-max within the domain or globally:
    {id: combined score}."""

    def min_max(v):
        return (v - v.min()) / (v.max() - v.min())

    expected = {}
    for domain in ("code", "docs"):
        idx = [i for i, r in enumerate(scores) if r["domain"] == domain]
        pool = idx if scope == "domain" else list(range(len(scores)))
        ds = np.array([scores[i]["ds"] for i in pool])
        var = np.array([scores[i]["variance"] for i in pool])
        combined = dict(zip(pool, min_max(ds) - 0.5 * min_max(var)))
        idx.sort(key=lambda i: (-combined[i], scores[i]["id"]))
        expected |= {scores[i]["id"]: combined[i] for i in idx[:5]}
    return expected


def test_selected_are_the_top_half_by_per_domain_min_max(scored, make_cfg):
    cfg, manifests, arts = scored
    scores = read(arts["score"] / "scores.parquet")
    chosen = {r["id"]: r["score"] for r in read(arts["select"] / "selection.parquet")}
    assert chosen == pytest.approx(top_half(scores, "domain"), abs=1e-12)
    glob = make_cfg(
        *TINY,
        "stages=[prepare,score,select]",
        "selection.normalization_scope=global",
        root=Path(cfg.paths.root_dir),
    )
    again = run_pipeline(glob)
    assert again["score"]["fingerprint"] == manifests["score"]["fingerprint"]  # scores reused
    rows = {r["id"]: r["score"] for r in read(artifacts(glob)["select"] / "selection.parquet")}
    assert rows == pytest.approx(top_half(scores, "global"), abs=1e-12)
    assert rows != pytest.approx(chosen, abs=1e-6)  # the same windows may win, with other scores


def test_alpha_sweep_reuses_the_scores(make_cfg):
    a = stage_fingerprints(make_cfg(*TINY, "selection.alpha=0.5"), ["select"])
    b = stage_fingerprints(make_cfg(*TINY, "selection.alpha=1.0", "selection.batch_size=7"), ["select"])
    assert a["score"] == b["score"] and a["select"] != b["select"]
    c = stage_fingerprints(make_cfg(*TINY, "selection.scoring.rope_theta=2500000"), ["select"])
    assert c["score"] != a["score"]
    scope = stage_fingerprints(make_cfg(*TINY, "selection.normalization_scope=global"), ["select"])
    assert scope["score"] == a["score"] and scope["select"] != a["select"]
    for key in ("selection.scoring.causal=true", "selection.scoring.sequence=authors"):
        other = stage_fingerprints(make_cfg(*TINY, key), ["select"])
        assert other["score"] != a["score"] and other["prepare"] == a["prepare"], key
    dtype = stage_fingerprints(make_cfg(*TINY, "selection.scorer_model.dtype=float16"), ["select"])
    assert dtype["score"] != a["score"]


def test_scorer_model_dtype_is_honoured_on_cuda_only(make_cfg, monkeypatch, smollm2_dir):
    import selection.scorers.longattn as longattn_module
    from selection.score import ScoreConfig
    from selection.scorers.registry import ScorerSetup, build_scorer, resolve_dtype

    assert resolve_dtype("auto", "cuda:0", "float16") == torch.float16  # the scorer model's dtype
    assert resolve_dtype("auto", "cuda", None) == torch.bfloat16  # none given
    assert resolve_dtype("auto", "cpu", "float16") == torch.float32  # CPU: always float32
    assert resolve_dtype("bfloat16", "cpu", "float16") == torch.bfloat16  # an explicit scoring.dtype wins
    with pytest.raises(ValueError, match="selection.scorer_model.dtype=half"):
        resolve_dtype("auto", "cuda", "half")
    assert ScoreConfig.from_cfg(make_cfg("experiment=longattn_32k")).scorer_dtype == "float16"
    assert ScoreConfig.from_cfg(make_cfg("experiment=ladm_32k")).scorer_dtype == "float16"
    seen = []
    monkeypatch.setattr(
        longattn_module, "resolve_dtype", lambda *args: seen.append(args) or resolve_dtype(*args)
    )
    setup = ScorerSetup("longattn", "tiny_llama", {}, smollm2_dir.parent.parent, "cpu", model_dtype="float16")
    build_scorer(setup)
    assert seen == [("auto", "cpu", "float16")]


def test_budget_selection(make_cfg, scored):
    cfg = make_cfg(
        *TINY,
        "stages=[prepare,score,select]",
        "selection.budget_tokens=1024",
        "selection.domain_ratios={code: 3, docs: 1}",
        root=Path(scored[0].paths.root_dir),
    )
    manifest = run_pipeline(cfg)["select"]
    assert manifest["per_domain"]["code"]["tokens"] == 768 and manifest["per_domain"]["docs"]["tokens"] == 256


def test_interrupted_scoring_resumes_to_the_same_result(make_cfg, tmp_path, monkeypatch):
    reference = run_pipeline(make_cfg(*TINY, "stages=[prepare,score]", root=tmp_path / "clean"))
    clean = read(
        Path(reference["score"]["inputs"]["prepare"]).parent.parent
        / "score"
        / reference["score"]["fingerprint"]
        / "scores.parquet"
    )

    calls = {"n": 0}
    original = LongAttnScorer.score_batch

    def dying(self, windows, ids=()):
        calls["n"] += 1
        if calls["n"] > 5:  # 5 batches of 2 = 10 windows scored; flushes at 4 and 8 (>= flush_every=3)
            raise KeyboardInterrupt("killed")
        return original(self, windows, ids)

    monkeypatch.setattr(LongAttnScorer, "score_batch", dying)
    cfg = make_cfg(*TINY, "stages=[prepare,score]", root=tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    parts = sorted((tmp_path / "killed" / "artifacts" / "score").glob("*/parts/rank-*.parquet"))
    assert len(parts) == 2 and not list(parts[0].parent.parent.glob("manifest.json"))
    monkeypatch.setattr(LongAttnScorer, "score_batch", original)
    resumed = run_pipeline(cfg)
    assert resumed["score"]["scored_this_run_rank0"] == 20 - 8  # the 2 unflushed windows are redone
    assert read(artifacts(cfg)["score"] / "scores.parquet") == clean


def test_two_ranks_score_disjoint_shards_and_merge(make_cfg, tmp_path, monkeypatch):
    single = run_pipeline(make_cfg(*TINY, "stages=[prepare,score]", root=tmp_path / "one"))
    cfg = make_cfg(*TINY, "stages=[prepare]", root=tmp_path / "two")
    run_pipeline(cfg)
    fps = stage_fingerprints(cfg, ["score"])
    prep = artifact_for(tmp_path / "two" / "artifacts", "prepare", fps["prepare"])
    out = artifact_for(tmp_path / "two" / "artifacts", "score", fps["score"])
    out.path.mkdir(parents=True)
    ctx = StageContext(out_dir=out.path, inputs={"prepare": prep}, cache_dir=Path(cfg.paths.cache_dir))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29511")
    monkeypatch.setenv("RANK", "1")
    assert selection.score.run(cfg, ctx) is None  # rank 1 scores its half and leaves the merge to rank 0
    rank1 = [r for part in sorted((out.path / "parts").glob("rank-0001-*.parquet")) for r in read(part)]
    assert len({r["id"] for r in rank1}) == 10
    monkeypatch.setenv("RANK", "0")
    manifest = selection.score.run(cfg, ctx)
    assert (
        manifest["windows"] == 20 and manifest["world_size"] == 2 and manifest["scored_this_run_rank0"] == 10
    )
    merged = read(out.path / "scores.parquet")
    one = read(tmp_path / "one" / "artifacts" / "score" / single["score"]["fingerprint"] / "scores.parquet")
    assert merged == one


def test_same_config_same_selection(make_cfg, tmp_path):
    def selection_rows(root):
        cfg = make_cfg(*TINY, "stages=[prepare,score,select]", root=root)
        run_pipeline(cfg)
        return (artifacts(cfg)["select"] / "selection.parquet").read_bytes()

    assert selection_rows(tmp_path / "a") == selection_rows(tmp_path / "b")


@pytest.mark.slow
def test_torchrun_two_processes_end_to_end(tmp_path):
    """Two real ranks: prepare and select on rank 0 (rank 1 waits), score sharded, one merged artifact."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    env = {**os.environ, "LONGATTN_RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29547",
        str(root / "run.py"),
        "stages=[prepare,score,select]",
        "debug=tiny",
        "data.sources=[{domain: code, format: python_code, options: {packages: [json]}}]",
        f"paths.root_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((tmp_path / "run" / "artifacts.json").read_text())
    manifest = json.loads((Path(index["score"]) / "manifest.json").read_text())
    assert (
        manifest["world_size"] == 2 and manifest["windows"] == 12 and manifest["scored_this_run_rank0"] == 6
    )
    parts = sorted(p.name for p in (Path(index["score"]) / "parts").glob("*.parquet"))
    assert parts == ["rank-0000-000000.parquet", "rank-0001-000000.parquet"]
    assert len(read(Path(index["select"]) / "selection.parquet")) == 6


def test_scorer_with_another_vocabulary_is_refused(make_cfg, tmp_path, smollm2_dir):
    import shutil

    from transformers import AutoTokenizer

    from common.model_sources import resolve_model_path

    other = tmp_path / "other_vocab"
    shutil.copytree(resolve_model_path("tiny_llama", smollm2_dir.parent.parent), other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<brand-new-token>"])
    tok.save_pretrained(other)
    cfg = make_cfg(*TINY, "stages=[prepare,score]", f"selection.scorer_model.name_or_path={other}")
    with pytest.raises(ValueError, match="has a different vocabulary"):
        run_pipeline(cfg)


def test_rank_blocks_cover_every_window_once():
    from common.distributed import RankInfo
    from selection.score import rank_slice

    ids = [f"w{i:03d}" for i in range(23)]
    for world in (1, 2, 3, 8, 30):
        blocks = [rank_slice(ids, RankInfo(r, world, r)) for r in range(world)]
        assert [i for b in blocks for i in b] == ids  # contiguous, in order, no overlap, nothing lost
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_select_all_keeps_every_prepared_window_without_scoring(make_cfg):
    """selection=all (experiment=released_data_32k on the demo corpus): the score stage is skipped, select
    keeps every window of the prepare artifact, in the selection contract, with the training mixture."""
    cfg = make_cfg(*TINY, "experiment=released_data_32k", "stages=[prepare,score,select]")
    manifests = run_pipeline(cfg)
    arts = artifacts(cfg)
    assert set(arts) == {"prepare", "select"} and "score" not in manifests
    windows = [r for shard in sorted(arts["prepare"].glob("windows-*.parquet")) for r in read(shard)]
    rows = read(arts["select"] / "selection.parquet")
    assert sorted(r["id"] for r in rows) == sorted(w["id"] for w in windows) and len(rows) == 20
    assert {r["score"] for r in rows} == {0.0}
    for domain in ("code", "docs"):  # ranks follow the ids
        mine = [r for r in rows if r["domain"] == domain]
        assert [r["rank"] for r in mine] == list(range(1, len(mine) + 1))
        assert [r["id"] for r in mine] == sorted(r["id"] for r in mine)
    assert manifests["select"]["method"] == "all" and manifests["select"]["inputs"] == {
        "prepare": str(arts["prepare"])
    }
    mixture = json.loads((arts["select"] / "mixture.json").read_text())
    assert mixture["long"] == {"code": 0.45, "docs": 0.45} and mixture["short"]["wiki"] == 0.1
