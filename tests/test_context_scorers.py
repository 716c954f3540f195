"""Long-vs-short context scorers (LongPPL, LongFilter, LongWanjuan coherence) and the compression baseline:
the geometry and statistics by hand, the chunked head against full logits, LongPPL against the `longppl`
package, LongWanjuan against a transcription of its script, and the score/select stages."""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import selection.score
from common.chunked_loss import chunked_token_statistics, token_cross_entropy, token_kl
from experiments.pipeline import run_pipeline
from selection.scorers.compression import compression_columns
from selection.scorers.context_contrast import (
    Span,
    TokenContrast,
    adds_bos,
    chunk_spans,
    forward_groups,
    scored_positions,
    sliding_spans,
)
from selection.scorers.longfilter import information_gain_columns
from selection.scorers.longppl import LongPPLOptions, key_token_columns
from selection.scorers.ppl_gain import coherence_columns
from selection.scorers.registry import ScorerSetup, build_scorer

NEW_METHODS = ("longppl", "longfilter", "ppl_gain", "compression")

# ---------------------------------------------------------------- geometry and statistics by hand


def test_sliding_spans_follow_find_key_token():
    long, short = sliding_spans(10, 4, 3)
    assert long == [Span(0, 10, 6)]
    assert short == [Span(0, 7, 3), Span(3, 10, 3)]
    # the last pass shrinks to what is left (the reference's `sliding_window = max_len-start-trunc_len`)
    long, short = sliding_spans(9, 4, 3)
    assert short == [Span(0, 7, 3), Span(3, 9, 2)]
    assert scored_positions(long) == scored_positions(short) == [4, 5, 6, 7, 8]
    assert forward_groups(short, lambda length: 8) == [[Span(0, 7, 3)], [Span(3, 9, 2)]]
    assert forward_groups(sliding_spans(20, 4, 2)[1], lambda length: 3) == [
        [Span(0, 6, 2), Span(2, 8, 2), Span(4, 10, 2)],
        [Span(6, 12, 2), Span(8, 14, 2), Span(10, 16, 2)],
        [Span(12, 18, 2), Span(14, 20, 2)],
    ]


def test_chunk_spans_follow_longwanjuan():
    long, short = chunk_spans(10, 4, 3, 2)  # two chunks; the last 2 tokens are dropped
    assert long == [Span(0, 4, 2), Span(4, 8, 2)]
    assert short == [Span(1, 4, 2), Span(5, 8, 2)]
    assert scored_positions(long) == [2, 3, 6, 7]


def test_longppl_statistics_by_hand():
    """Tokens 4, 5, 6 of a 7-token sequence: only token 4 gains > 2 nats AND has loss_full < 2."""
    contrast = TokenContrast(
        torch.tensor([4, 5, 6]), torch.tensor([1.0, 3.0, 0.5]), torch.tensor([3.5, 6.0, 2.0])
    )
    cols = key_token_columns(contrast, 7, LongPPLOptions())
    assert cols["n_key"] == 1 and cols["n_scored"] == 3 and cols["key_fraction"] == pytest.approx(1 / 3)
    # LongCE: targets 1..6; 1, 2, 3 unscored (weight 1), exp(2.5) and exp(3) capped at 5, exp(1.5)
    assert cols["longce_weight"] == pytest.approx((3 + 5 + 5 + math.exp(1.5)) / 6)


def test_longfilter_and_ppl_gain_statistics_by_hand():
    contrast = TokenContrast(
        torch.tensor([2, 3, 6, 7]),
        torch.log(torch.tensor([2.0, 2.0, 4.0, 4.0])),
        torch.log(torch.tensor([4.0, 4.0, 8.0, 8.0])),
        torch.tensor([0.1, 0.2, 0.3, 0.6]),
    )
    gain = information_gain_columns(contrast)
    assert gain["kl_gain"] == pytest.approx(0.3) and gain["ce_gain"] == pytest.approx(math.log(2))
    # chunks of 2: perplexities 2 and 4 with the long context (mean 3), 4 and 8 with the short (mean 6)
    cols = coherence_columns(contrast, scored_len=2)
    assert cols["ppl_long"] == pytest.approx(3.0) and cols["ppl_short"] == pytest.approx(6.0)
    assert cols["ppl_gain"] == pytest.approx((6 - 3) / (6 + 1e-5)) and cols["n_chunks"] == 2


def test_compression_is_zlib_level_9():
    text = "long context " * 50 + "ünïcode"
    raw = text.encode("utf-8")
    packed = zlib.compress(raw, level=9)
    cols = compression_columns(text)
    assert cols["compression_ratio"] == len(raw) / len(packed)  # ZIP's get_compression_ratio
    assert cols["incompressibility"] == len(packed) / len(raw) and cols["text_bytes"] == len(raw)
    assert compression_columns("a" * 4000)["incompressibility"] < cols["incompressibility"]


def test_token_kl_by_hand_and_chunked_statistics_equal_unchunked():
    p, q = torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2)  # p = (1/4, 3/4), q = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(token_kl(p, q)) == pytest.approx(expected) and float(token_kl(q, q)) == 0.0
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=gen)
    a, b = torch.randn(11, 8, generator=gen), torch.randn(11, 8, generator=gen)
    targets = torch.randint(0, 40, (11,), generator=gen)

    def statistic(la, lb, targets):
        return {"ce": token_cross_entropy(la, targets), "kl": token_kl(la, lb)}

    head = lambda h: F.linear(h, weight)  # noqa: E731
    full = statistic(head(a), head(b), targets)
    assert torch.allclose(
        full["kl"],
        F.kl_div(
            F.log_softmax(head(b), -1), F.log_softmax(head(a), -1), log_target=True, reduction="none"
        ).sum(-1),
        atol=1e-6,
    )
    for chunk in (1, 4, 100):
        out = chunked_token_statistics(head, [a, b], statistic, chunk, targets=targets)
        for key in ("ce", "kl"):
            assert torch.allclose(out[key], full[key], atol=1e-6)
    with pytest.raises(ValueError, match="row-aligned"):
        chunked_token_statistics(head, [a, b[:5]], statistic, 4, targets=targets)


def test_bad_options_and_too_short_windows_name_the_key():
    from common.errors import ConfigError
    from selection.scorers.ppl_gain import PplGainOptions

    for bad, key in (
        ({"bos": "maybe"}, "bos"),
        ({"passes_per_forward": 0}, "passes_per_forward"),
        ({"stride": 0}, "stride"),
        ({"head_chunk_tokens": 0}, "head_chunk_tokens"),
    ):
        with pytest.raises(ConfigError, match=key):
            LongPPLOptions(**bad)
    with pytest.raises(ConfigError, match="scored_len"):
        PplGainOptions(short_len=4096)
    with pytest.raises(ConfigError, match="short_len below the window length"):
        sliding_spans(256, 256, 32)
    with pytest.raises(ConfigError, match="chunk_len"):
        chunk_spans(1024, 4096, 2048, 1024)


def test_each_scorer_ranks_by_its_rank_column_higher_first():
    import pyarrow as pa

    from selection.scorers.registry import scorer_class
    from selection.select import SCORE_RULES, SelectConfig

    for method in NEW_METHODS:
        cls = scorer_class(method)
        assert cls.rank_column == cls.columns[0]
        table = pa.table({c: [float(i + k) for i in range(3)] for k, c in enumerate(cls.columns)})
        ranked = SCORE_RULES.get(method)(table, SelectConfig(method=method))
        assert ranked.tolist() == table.column(cls.rank_column).to_pylist()


# ---------------------------------------------------------------- the models: literal references


@pytest.fixture(scope="module")
def tiny_setup(smollm2_dir):
    return lambda method, **opts: ScorerSetup(
        method, "tiny_llama", opts, smollm2_dir.parent.parent, "cpu", "tiny_llama"
    )


def test_longfilter_equals_full_logits_pass_by_pass(tiny_setup):
    """Batched short passes and the chunked head against one plain forward per pass with full logits."""
    scorer = build_scorer(
        tiny_setup(
            "longfilter", short_len=64, stride=32, bos="false", passes_per_forward=2, head_chunk_tokens=50
        )
    )
    window = np.random.default_rng(0).integers(3, 49152, size=200)
    ids = torch.as_tensor(window)
    model = scorer.lm.model
    with torch.no_grad():
        full = model(ids[None]).logits[0].float()
        kls, gains = [], []
        for start in range(0, 200 - 64, 32):
            width = min(32, 200 - start - 64)
            short = model(ids[None, start : start + 64 + width]).logits[0, 63 : 63 + width].float()
            long = full[start + 63 : start + 63 + width]
            targets = ids[start + 64 : start + 64 + width]
            log_p, log_q = F.log_softmax(long, -1), F.log_softmax(short, -1)
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
            gains.append(
                F.cross_entropy(short, targets, reduction="none")
                - F.cross_entropy(long, targets, reduction="none")
            )
    row = scorer.score_batch([window])[0]
    assert row["n_scored"] == 136
    assert row["kl_gain"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-5)
    assert row["ce_gain"] == pytest.approx(float(torch.cat(gains).mean()), rel=1e-4, abs=1e-6)


def longwanjuan_transcription(model, tokens: list[int], pad_token_id: int, vocab_size: int) -> dict:
    """OpenLMLab/LongWanjuan coherence/get_en_coherence.py lines 65-143 for one document, as written
    (chunk lengths scaled: 256 / 128 / 64 instead of 4096 / 2048 / 1024; CPU instead of .cuda())."""
    max_context, med_context, min_context = 256, 128, 64
    batch_size = 8
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=pad_token_id, reduction="none")
    with torch.no_grad():
        input_ids_list = tokens
        chunk_num = len(input_ids_list) // max_context
        batch_num = int(np.ceil(chunk_num / batch_size))
        input_ids_list = torch.tensor(input_ids_list[: chunk_num * max_context])
        input_ids = input_ids_list.reshape((chunk_num, max_context)).to(dtype=torch.int64)
        attention_mask = input_ids != pad_token_id
        ppl_wi = []
        for i in range(batch_num):
            logits = model(
                input_ids=input_ids[i * batch_size : (i + 1) * batch_size, :],
                attention_mask=attention_mask[i * batch_size : (i + 1) * batch_size, :],
            ).get("logits")[:, -min_context - 1 : -1]
            labels = input_ids[i * batch_size : (i + 1) * batch_size, -min_context:]
            loss = loss_fn(logits.reshape(-1, vocab_size), labels.reshape(-1))
            loss = torch.mean(loss.reshape((-1, min_context)).float(), dim=-1)
            ppl_wi.append(torch.exp(loss))
        ppl_wi = torch.mean(torch.cat(ppl_wi, dim=0)).item()
        input_ids = input_ids_list.reshape((chunk_num, max_context))[:, -med_context:].to(dtype=torch.int64)
        attention_mask = input_ids != pad_token_id
        ppl_wo = []
        for i in range(batch_num):
            logits = model(
                input_ids=input_ids[i * batch_size : (i + 1) * batch_size, :],
                attention_mask=attention_mask[i * batch_size : (i + 1) * batch_size, :],
            ).get("logits")[:, -min_context - 1 : -1]
            labels = input_ids[i * batch_size : (i + 1) * batch_size, -min_context:]
            loss = loss_fn(logits.reshape(-1, vocab_size), labels.reshape(-1))
            loss = torch.mean(loss.reshape((-1, min_context)).float(), dim=-1)
            ppl_wo.append(torch.exp(loss))
        ppl_wo = torch.mean(torch.cat(ppl_wo, dim=0)).item()
    return {"ppl_wi": ppl_wi, "ppl_wo": ppl_wo, "ratio": (ppl_wo - ppl_wi) / (ppl_wo + 1e-5)}


def test_ppl_gain_equals_a_transcription_of_longwanjuan(tiny_setup):
    scorer = build_scorer(
        tiny_setup("ppl_gain", chunk_len=256, short_len=128, scored_len=64, passes_per_forward=1)
    )
    pad = scorer.lm.model.config.pad_token_id
    window = np.random.default_rng(1).integers(pad + 1, 49152, size=2 * 256 + 100)  # no pad ids (see README)
    theirs = longwanjuan_transcription(scorer.lm.model, window.tolist(), pad, 49152)
    ours = scorer.score_batch([window])[0]
    assert ours["n_chunks"] == 2  # the last 100 tokens are dropped, as theirs
    assert ours["ppl_long"] == pytest.approx(theirs["ppl_wi"], rel=1e-5)
    assert ours["ppl_short"] == pytest.approx(theirs["ppl_wo"], rel=1e-5)
    assert ours["ppl_gain"] == pytest.approx(theirs["ratio"], rel=1e-4, abs=1e-7)


def demo_window(domain: str, tokenizer, document: int, start: int) -> np.ndarray:
    """A 1024-token window of the demo corpus, cut at one of Algorithm 1's starts."""
    from common.corpus import CorpusStats, SourceSpec, iter_documents
    from selection.windows import window_starts

    spec = {
        "code": SourceSpec(domain="code", format="python_code", options={"packages": ["json"]}),
        "docs": SourceSpec(
            domain="docs", format="python_docs", options={"modules": ["textwrap"], "reference_topics": False}
        ),
    }[domain]
    docs = list(iter_documents([spec], "skip", CorpusStats()))
    ids = tokenizer(docs[document]["text"], add_special_tokens=False).input_ids
    assert start in window_starts(len(ids), 1024)
    return np.array(ids[start : start + 1024])


@pytest.mark.slow
def test_longppl_key_tokens_are_the_reference_packages(smollm2_dir, smollm2_tokenizer):
    """`longppl.find_key_token` (0.3.0) on demo windows' text with SmolLM2 finds the same key tokens at the
    same positions: without a BOS (SmolLM2's tokenizer adds none) and with one (a tokenizer that adds it,
    as Llama-3's does, against bos=true; on the last 511 tokens of a window, to save time). A BOS plus a
    whole window would crash the reference ("iteration over a 0-d tensor") where its last short pass scores
    a single token: 1 + 1024 tokens at 256/128 (README)."""
    import longppl.longppl as reference
    from transformers import AutoTokenizer

    from selection.scorers.longppl import key_token_mask

    def reference_positions(text, tokenizer, model) -> list[int]:
        """The key tokens' positions in the reference's encoding: the offsets it hands to merge_intervals."""
        seen = {}
        original = reference.merge_intervals

        def capture(rows):
            seen["rows"] = rows.clone()
            return original(rows)

        reference.merge_intervals = capture
        try:
            reference.find_key_token(text, model, tokenizer, trunc_len=256, sliding_window=128)
        finally:
            reference.merge_intervals = original
        offsets = [tuple(o) for o in tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]
        return [offsets.index(tuple(r.tolist())) for r in seen["rows"]]

    with_bos = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True)
    assert not adds_bos(smollm2_tokenizer) and adds_bos(with_bos)
    opts = LongPPLOptions(short_len=256, stride=128)
    for domain, tokenizer, bos in (("code", smollm2_tokenizer, "auto"), ("docs", with_bos, "true")):
        window = demo_window(domain, smollm2_tokenizer, *((0, 1024) if domain == "code" else (0, 911)))
        if bos == "true":
            window = window[-511:]
        text = smollm2_tokenizer.decode(window.tolist())
        setup = ScorerSetup(
            "longppl",
            "smollm2_135m",
            {"short_len": 256, "stride": 128, "bos": bos},
            smollm2_dir.parent.parent,
        )
        scorer = build_scorer(setup)
        sequence = window.tolist() if bos == "auto" else [scorer.bos, *window.tolist()]
        assert tokenizer(text).input_ids == sequence  # the reference scores exactly our sequence
        contrast, n = scorer.token_contrast(window)
        ours = contrast.positions[key_token_mask(contrast, opts.alpha, opts.beta)].tolist()
        theirs = reference_positions(text, tokenizer, scorer.lm.model)
        assert len(ours) > 5 and ours == theirs, domain
        row = key_token_columns(contrast, n, opts)
        assert row["n_key"] == len(theirs) and row["n_scored"] == n - 256 == (768 if bos == "auto" else 256)


# ---------------------------------------------------------------- through the score and select stages

SMALL = (
    "data.sources=[{domain: code, format: python_code, options: {packages: [json, tomllib]}},"
    "{domain: docs, format: python_docs, options: {modules: [json, textwrap, difflib], reference_topics: false}}]"
)
TINY = ["debug=tiny", SMALL, "data.max_windows_per_domain=6", "selection.flush_every=3"]


def stage_dirs(cfg) -> dict[str, Path]:
    return {
        k: Path(v) for k, v in json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text()).items()
    }


def test_new_methods_run_prepare_score_select_on_one_prepare_artifact(make_cfg, tmp_path):
    """debug=tiny, one root as a `selection=...` multirun: every method reuses the one prepare artifact,
    scores every window, and its selection keeps the top half of each domain by its rank column, higher
    first."""
    from selection.scorers.registry import scorer_class

    prepared = set()
    for method in NEW_METHODS:
        # a random 2-layer model predicts no token well (loss ~ log 49152 = 10.8): LongPPL's thresholds
        # are widened so that key tokens exist and vary
        wide = ["selection.scoring.alpha=0.0", "selection.scoring.beta=-20.0"] if method == "longppl" else []
        cfg = make_cfg(*TINY, f"selection={method}", "stages=[prepare,score,select]", *wide, root=tmp_path)
        manifests = run_pipeline(cfg)
        prepared.add(stage_dirs(cfg)["prepare"])
        column = scorer_class(method).rank_column
        assert manifests["score"]["columns"] == ["id", "domain", "n_tokens", *scorer_class(method).columns]
        scores = pq.read_table(stage_dirs(cfg)["score"] / "scores.parquet").to_pylist()
        assert len(scores) == 12 and all(np.isfinite(r[column]) for r in scores)
        assert len({r[column] for r in scores}) > 1, method
        chosen = pq.read_table(stage_dirs(cfg)["select"] / "selection.parquet").to_pylist()
        for domain in ("code", "docs"):
            mine = sorted((r for r in scores if r["domain"] == domain), key=lambda r: (-r[column], r["id"]))
            assert [r["id"] for r in chosen if r["domain"] == domain] == [r["id"] for r in mine[:3]]
    assert len(prepared) == 1


def test_longppl_scoring_resumes_and_shards_like_the_others(make_cfg, monkeypatch):
    """Killed after two flushed parts, the same command finishes the rest; two ranks merge; both give the
    uninterrupted scores exactly."""
    from common.artifacts import artifact_for
    from common.stage import StageContext
    from experiments.pipeline import stage_fingerprints
    from selection.scorers.longppl import LongPPLScorer

    opts = ["selection=longppl", "stages=[prepare,score]"]
    cfg = make_cfg(*TINY, *opts)
    run_pipeline(cfg)
    score_dir = stage_dirs(cfg)["score"]
    clean = pq.read_table(score_dir / "scores.parquet").to_pylist()
    shutil.rmtree(score_dir)  # the prepare artifact stays and is reused below

    calls, original = {"n": 0}, LongPPLScorer.score_batch

    def dying(self, windows, ids=()):
        calls["n"] += 1
        if calls["n"] > 7:  # 7 windows scored, 6 of them flushed (flush_every=3)
            raise KeyboardInterrupt("killed")
        return original(self, windows, ids)

    monkeypatch.setattr(LongPPLScorer, "score_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    assert len(list((score_dir / "parts").glob("rank-*.parquet"))) == 2
    monkeypatch.setattr(LongPPLScorer, "score_batch", original)
    assert run_pipeline(cfg)["score"]["scored_this_run_rank0"] == 12 - 6
    assert pq.read_table(score_dir / "scores.parquet").to_pylist() == clean

    shutil.rmtree(score_dir)
    fps = stage_fingerprints(cfg, ["score"])
    artifacts_dir = Path(cfg.paths.artifacts_dir)
    prep = artifact_for(artifacts_dir, "prepare", fps["prepare"])
    out = artifact_for(artifacts_dir, "score", fps["score"])
    out.path.mkdir(parents=True)
    ctx = StageContext(out_dir=out.path, inputs={"prepare": prep}, cache_dir=Path(cfg.paths.cache_dir))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29517")
    for rank in (1, 0):  # rank 1 scores its half; rank 0 its own and merges
        monkeypatch.setenv("RANK", str(rank))
        manifest = selection.score.run(cfg, ctx)
    assert manifest["world_size"] == 2 and manifest["scored_this_run_rank0"] == 6
    assert pq.read_table(out.path / "scores.parquet").to_pylist() == clean
