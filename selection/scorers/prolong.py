"""ProLong long-dependency score (LDS; Chen et al. 2024, SPEC section 3).

A window is cut into `chunk_size`-token chunks (at most window_tokens // chunk_size; more are sampled
keeping their order). single[i] = perplexity of chunk i alone; pair[i][j] (j < i) = perplexity of chunk i
after chunk j, for `sample_pairs` random pairs. delta[i][j] = (single[i] - pair[i][j]) / single[i].
Dependency entropy of row i: softmax over the row's RAW differences single[i] - pair[i][j] (sampled
pairs only), DE = clip((log n - H) / log n, 0, 1), 1 for a single entry. For each pair with
delta > threshold: LDS += (delta + clip((i - j) / (chunk_num - 1), 0, 1)) * DE[i].

The authors' code gives a document with fewer candidate pairs than `sample_pairs` NO pairs at all
(LDS 0); `few_pairs=all` uses every pair instead. Perplexities are batched: many chunk and pair
sequences per forward, logits kept only for the positions that are scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import ConfigError
from selection.scorers.registry import SCORERS, ScorerSetup, resolve_dtype, typed_options, window_rng

NO_PAIR = float("inf")


@dataclass
class ProLongOptions:
    chunk_size: int = 128
    delta_threshold: float = 0.1
    sample_pairs: int = 500
    """Pairs sampled per window; <= 0 uses every pair."""
    few_pairs: str = "authors"
    """authors: fewer candidate pairs than sample_pairs -> no pairs (LDS 0); all: use every pair."""
    seed: int = 11
    batch_size: int | str = "auto"
    """Sequences per forward (speed only); auto = 256 on CUDA (hundreds of 256-token pairs per forward),
    16 on CPU (the logits of a batch are batch x 128 x vocab floats)."""
    impl: str = "batched"
    """batched | reference (one forward per sequence, full logits, the authors' loss code)."""
    dtype: str = "auto"
    """auto = selection.scorer_model.dtype on CUDA (OPT-350M: float16, as the authors), float32 on CPU."""

    def __post_init__(self) -> None:
        if self.few_pairs not in ("authors", "all"):
            raise ConfigError(f"selection.scoring.few_pairs={self.few_pairs}: choose authors or all")
        if self.impl not in ("batched", "reference"):
            raise ConfigError(f"selection.scoring.impl={self.impl}: choose batched or reference")


def dependency_entropy(raw_deltas: Sequence[float]) -> float:
    """DE of one row, as the authors' compute_de (softmax of raw deltas; 1e-12 guard on exact zeros)."""
    x = np.asarray(raw_deltas, dtype=np.float64)
    if len(x) == 1:
        return 1.0
    e = np.exp(x - x.max())
    p = e / e.sum()
    if (p == 0).any():
        p = (p + 1e-12) / (p + 1e-12).sum()
    entropy = -np.sum(p * np.log(p))
    max_entropy = np.log(len(x))
    return float(np.clip((max_entropy - entropy) / max_entropy, 0, 1))


def long_dependency_score(
    single: Sequence[float], pair: np.ndarray, chunk_num: int, threshold: float = 0.1
) -> tuple[float, np.ndarray, np.ndarray]:
    """LDS from single perplexities and the pair matrix (NO_PAIR where a pair was not sampled).

    Returns (lds, delta matrix normalised by single[i], dependency entropy per row)."""
    n = len(single)
    single_a = np.asarray(single, dtype=np.float64)
    raw = single_a[:, None] - pair
    de = np.zeros(n)
    for i in range(n):
        row = [raw[i, j] for j in range(i) if pair[i, j] != NO_PAIR]
        if row:
            de[i] = dependency_entropy(row)
    delta = raw / single_a[:, None]
    dis_scale = 1.0 / (chunk_num - 1) if chunk_num > 1 else 0.0
    lds = 0.0
    for i in range(n):
        for j in range(i):
            if delta[i, j] > threshold:
                lds += (delta[i, j] + float(np.clip((i - j) * dis_scale, 0, 1))) * de[i]
    return (0.0 if math.isnan(lds) else lds), delta, de


def sample_chunks(n_chunks: int, chunk_num: int, rng: np.random.Generator) -> list[int]:
    """Indices of the chunks kept: all, or `chunk_num` sampled without replacement in document order."""
    if n_chunks <= chunk_num:
        return list(range(n_chunks))
    return sorted(rng.choice(n_chunks, size=chunk_num, replace=False).tolist())


def sample_pairs(
    n_chunks: int, sample_size: int, few_pairs: str, rng: np.random.Generator
) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(n_chunks) for j in range(i)]
    if sample_size <= 0 or len(pairs) == sample_size:
        return pairs
    if len(pairs) < sample_size:
        return [] if few_pairs == "authors" else pairs
    return [pairs[k] for k in sorted(rng.choice(len(pairs), size=sample_size, replace=False).tolist())]


class ProLongScorer:
    options_class = ProLongOptions
    columns = ["lds", "n_chunks", "n_pairs", "mean_delta", "frac_above_threshold"]
    requires_window_vocabulary = False  # text-based: windows are re-tokenized when the vocabularies differ

    def __init__(self, setup: ScorerSetup) -> None:
        from transformers import AutoModelForCausalLM

        from common.model_sources import load_tokenizer, resolve_model_path

        self.options = opts = typed_options(ProLongOptions, setup.options, "prolong")
        self.seed = opts.seed
        device = torch.device(setup.device)
        dtype = resolve_dtype(opts.dtype, setup.device, setup.model_dtype, "float16")
        path = resolve_model_path(setup.model, setup.cache_dir)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = device
        self.batch_size = (
            opts.batch_size if opts.batch_size != "auto" else (256 if device.type == "cuda" else 16)
        )
        self.tokenizer = load_tokenizer(setup.model, setup.cache_dir)
        self.windows_tokenizer = None
        if setup.windows_tokenizer and setup.windows_tokenizer != setup.model:
            other = load_tokenizer(setup.windows_tokenizer, setup.cache_dir)
            if other.get_vocab() != self.tokenizer.get_vocab():
                self.windows_tokenizer = other

    def _token_ids(self, window: np.ndarray) -> list[int]:
        if self.windows_tokenizer is None:
            return [int(t) for t in window]
        text = self.windows_tokenizer.decode([int(t) for t in window])
        # No BOS, as the authors (`add_bos_token=False`, `add_eos_token=False` on OPT's tokenizer, which
        # otherwise prepends `</s>`): the first chunk starts at the text's first token.
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def _perplexities(self, sequences: list[list[int]], scored: int) -> list[float]:
        """exp(mean CE) over each sequence's last `scored` - 1 predicted tokens (equal-length sequences)."""
        out: list[float] = []
        for b in range(0, len(sequences), self.batch_size):
            batch = torch.tensor(sequences[b : b + self.batch_size], device=self.device)
            logits = self.model(input_ids=batch, logits_to_keep=scored, use_cache=False).logits.float()
            targets = batch[:, -(scored - 1) :]
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            out += torch.exp(ce.mean(-1)).tolist()
        return out

    @torch.no_grad()
    def _perplexities_reference(self, sequences: list[list[int]], scored: int) -> list[float]:
        """The authors' compute_ppl: full logits, shift, CrossEntropyLoss, mean over the last `num` losses."""
        out = []
        for seq in sequences:
            inputs = torch.tensor([seq], device=self.device)
            labels = inputs.clone()
            labels[:, : len(seq) - scored + 1] = -100
            logits = self.model(input_ids=inputs, use_cache=False).logits.float()
            loss = torch.nn.CrossEntropyLoss(reduction="none")(
                logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1)
            ).view(1, -1)
            out.append(float(torch.exp(loss[0, -(scored - 1) :].mean())))
        return out

    def score_window(self, window: np.ndarray, window_id: str) -> dict[str, float]:
        opts, c = self.options, self.options.chunk_size
        rng = window_rng(self.seed, window_id)
        ids = self._token_ids(window)
        chunks = [ids[i : i + c] for i in range(0, len(ids) - c + 1, c)]
        chunk_num = len(window) // c
        chunks = [chunks[i] for i in sample_chunks(len(chunks), chunk_num, rng)]
        n = len(chunks)
        pairs = sample_pairs(n, opts.sample_pairs, opts.few_pairs, rng)
        ppl = self._perplexities_reference if opts.impl == "reference" else self._perplexities
        single = ppl(chunks, c)
        pair = np.full((n, n), NO_PAIR)
        for (i, j), value in zip(pairs, ppl([chunks[j] + chunks[i] for i, j in pairs], c)):
            pair[i, j] = value
        lds, delta, _ = long_dependency_score(single, pair, chunk_num, opts.delta_threshold)
        sampled = np.array([delta[i, j] for i, j in pairs]) if pairs else np.zeros(0)
        return {
            "lds": lds,
            "n_chunks": float(n),
            "n_pairs": float(len(pairs)),
            "mean_delta": float(sampled.mean()) if len(sampled) else 0.0,
            "frac_above_threshold": float((sampled > opts.delta_threshold).mean()) if len(sampled) else 0.0,
        }

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str]) -> list[dict[str, float]]:
        return [self.score_window(w, i) for w, i in zip(windows, ids)]


SCORERS.add("prolong", ProLongScorer)
