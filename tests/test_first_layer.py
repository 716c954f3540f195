"""First-layer q/k: equal to HF's own attention maps, loaded from the needed shards only."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.model_sources import resolve_model_path
from selection.scorers.attention_stats import blocked_head_stats, default_min_distance, reference_head_stats
from selection.scorers.first_layer import FirstLayerQK


def stats_from_attention_maps(attn_HLL: torch.Tensor, min_distance: int):
    length = attn_HLL.shape[-1]
    rows, cols = torch.arange(length)[:, None], torch.arange(length)[None]
    masked = attn_HLL.double() * (rows - cols >= min_distance)
    return masked.sum((-1, -2)) / length, masked.reshape(attn_HLL.shape[0], -1).var(-1)


@pytest.mark.slow
def test_smollm2_first_layer_equals_hf_eager_attention(smollm2_dir):
    """The whole chain (embeddings, RMSNorm, q/k, RoPE, GQA, softmax) against transformers itself."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (256,), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, num_hidden_layers=1, attn_implementation="eager"
    )
    with torch.no_grad():
        attn = model(ids[None], output_attentions=True).attentions[0][0]
    ds, var = stats_from_attention_maps(attn, default_min_distance(256))
    q, k = FirstLayerQK.from_pretrained(str(smollm2_dir))(ids)
    assert q.shape == (9, 256, 64) and k.shape == (3, 256, 64)
    for stats in (reference_head_stats(q, k), blocked_head_stats(q, k)):
        assert torch.allclose(stats.ds, ds, rtol=1e-4, atol=0)
        assert torch.allclose(stats.variance, var, rtol=1e-4, atol=0)


@pytest.fixture
def sharded_tiny(tmp_path, smollm2_dir):
    """tiny_llama re-saved as two shards: embeddings + layer 0 in one, everything else in the other."""
    src = resolve_model_path("tiny_llama", smollm2_dir.parent.parent)
    weights = load_file(f"{src}/model.safetensors")
    first = {
        n: t
        for n, t in weights.items()
        if n == "model.embed_tokens.weight" or n.startswith("model.layers.0.")
    }
    rest = {n: t for n, t in weights.items() if n not in first}
    out = tmp_path / "sharded"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(first, out / "model-00001-of-00002.safetensors")
    save_file(rest, out / "model-00002-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in rest}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src, out


def test_scores_with_the_later_shards_absent(sharded_tiny):
    full_dir, sharded = sharded_tiny
    (sharded / "model-00002-of-00002.safetensors").unlink()
    ids = torch.arange(2, 130)
    q1, k1 = FirstLayerQK.from_pretrained(str(sharded))(ids)
    q2, k2 = FirstLayerQK.from_pretrained(full_dir)(ids)
    assert torch.equal(q1, q2) and torch.equal(k1, k2)


def test_rope_theta_override_changes_scores(smollm2_dir):
    ids = torch.randint(0, 49152, (512,), generator=torch.Generator().manual_seed(1))
    base = FirstLayerQK.from_pretrained(str(smollm2_dir))
    assert base.config.rope_parameters["rope_theta"] == 100000.0
    abf = FirstLayerQK.from_pretrained(str(smollm2_dir), rope_theta=2.5e6)
    assert abf.config.rope_parameters["rope_theta"] == 2.5e6
    s_base = blocked_head_stats(*base(ids))
    s_abf = blocked_head_stats(*abf(ids))
    assert float((s_base.ds - s_abf.ds).abs().max()) > 1e-3
    q_b, _ = base(ids)
    q_a, _ = abf(ids)
    assert torch.equal(q_b[:, 0], q_a[:, 0])  # position 0 is not rotated: only RoPE differs


def test_chunked_projection_equals_one_piece(smollm2_dir):
    qk = FirstLayerQK.from_pretrained(str(smollm2_dir))
    ids = torch.randint(0, 49152, (300,), generator=torch.Generator().manual_seed(2))
    q1, k1 = qk(ids, chunk=64)
    q2, k2 = qk(ids, chunk=10**6)
    assert torch.allclose(q1, q2, rtol=1e-6, atol=1e-6) and torch.allclose(k1, k2, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ the scored sequence (scoring.sequence)


def their_pipeline(tok, window: list[int], length: int) -> tuple[list[int], list[int]]:
    """The authors' string pipeline as their scripts run it: the preprocessing decodes each window with
    `batch_decode` (DataProcess.py), the scoring encodes `bos_token + ' ' + content` with special tokens,
    padding to max_length with pad = eos, truncation to max_length (1_inference_dp.py)."""
    content = tok.batch_decode([window])[0]
    tok.pad_token = tok.eos_token
    batch = tok(
        [tok.bos_token + " " + content],
        add_special_tokens=True,
        padding="max_length",
        truncation=True,
        max_length=length,
    )
    return batch["input_ids"][0], batch["attention_mask"][0]


def document_ids(tok) -> list[int]:
    import inspect
    import textwrap

    text = inspect.getsource(textwrap) + "\n# naïve café, Grüße, 東京, ✓ — end\n" * 20
    return tok(text, add_special_tokens=False).input_ids


def longattn(model: str, cache, **options):
    from selection.scorers.registry import ScorerSetup, build_scorer

    return build_scorer(ScorerSetup("longattn", model, options, cache, "cpu", "tiny_llama"))


def test_authors_sequence_is_their_string_pipeline(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids, length = document_ids(tok), 512
    scorer = longattn("tiny_llama", smollm2_dir.parent.parent, sequence="authors")
    for start in (100, len(ids) - length):  # a window inside the document, and its last one (unicode)
        window = ids[start : start + length]
        expected, mask = their_pipeline(tok, window, length)
        assert sum(mask) == length  # full length: no padding, as their 32K windows
        got = scorer.sequence(np.array(window)).tolist()
        assert got == expected
        assert got[0] == tok.bos_token_id and got[1:] != window[: length - 1]  # ' ' + text re-tokenized
    bos = longattn("tiny_llama", smollm2_dir.parent.parent).sequence(np.array(window)).tolist()
    assert bos == [tok.bos_token_id, *window[:-1]]  # sequence=bos, the default


def test_authors_sequence_with_a_tokenizer_that_adds_its_own_bos(tmp_path, smollm2_dir):
    """Llama-3's tokenizer adds a BOS itself: their string then starts with two BOS tokens."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    model_dir = tmp_path / "with_bos"
    shutil.copytree(resolve_model_path("tiny_llama", smollm2_dir.parent.parent), model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    window = document_ids(tok)[200:456]
    expected, _ = their_pipeline(tok, window, 256)
    got = longattn(str(model_dir), None, sequence="authors").sequence(np.array(window)).tolist()
    assert got == expected and got[:2] == [tok.bos_token_id] * 2


def test_a_shorter_authors_sequence_is_scored_unpadded(smollm2_dir):
    """'a' and 'b' as separate tokens re-encode to far fewer tokens ('ab' merges): the sequence is
    scored at its own length, k from that length, no padding."""
    from transformers import AutoTokenizer

    from selection.scorers.attention_stats import head_stats

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    window = np.array([tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")] * 128)
    cache = smollm2_dir.parent.parent
    scorer = longattn("tiny_llama", cache, sequence="authors")
    sequence = scorer.sequence(window)
    assert len(sequence) < len(window)
    row = scorer.score_batch([window])[0]
    stats = head_stats(*FirstLayerQK.from_pretrained("tiny_llama", cache)(sequence), None, causal=False)
    assert row["ds"] == pytest.approx(stats.mean_ds, rel=1e-6) and row["ds"] > 0
