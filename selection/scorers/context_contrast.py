"""Long-vs-short context machinery shared by the LongPPL, LongFilter and LongWanjuan-coherence scorers.

Per window, a scorer names two lists of model passes (`Span`s), `long` and `short`. A span runs the
causal LM on sequence[start:end] (a fresh input: positions restart at 0) and scores its last `scored`
tokens, each predicted from the tokens before it inside the span. Both lists score the same tokens in
the same order, so row i of the two streams is one token predicted with a long and with a short context:
- `sliding_spans` (LongPPL's geometry): one pass over the whole sequence; short passes of `short_len`
  tokens plus the next `stride` tokens, each scoring those `stride` tokens;
- `chunk_spans` (LongWanjuan's): per chunk, the whole chunk vs its last `short_len` tokens, scoring its
  last `scored_len`.

The model's backbone gives hidden states (no logits); only the rows that predict a scored token are
kept, and the LM head runs over them in chunks (common/chunked_loss.py), so T x vocabulary logits never
exist. Short passes of one length go through the model together (`passes_per_forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.chunked_loss import chunked_token_statistics, token_cross_entropy, token_kl
from common.errors import ConfigError
from selection.scorers.registry import ScorerSetup, resolve_dtype

TOKENS_PER_FORWARD = 16384
"""passes_per_forward=auto: as many equal-length passes per forward as fit this many tokens."""
BOS_CHOICES = ("auto", "true", "false")


@dataclass(frozen=True)
class Span:
    """Run the model on sequence[start:end]; score its last `scored` tokens."""

    start: int
    end: int
    scored: int

    def __post_init__(self) -> None:
        if not 1 <= self.scored < self.end - self.start:
            raise ValueError(f"{self}: need 1 <= scored < end - start (a scored token needs a context)")

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def positions(self) -> range:
        return range(self.end - self.scored, self.end)


def sliding_spans(n: int, short_len: int, stride: int) -> tuple[list[Span], list[Span]]:
    """LongPPL's passes (longppl 0.3.0 `find_key_token`, longppl.py lines 34-42; LongCE's `loss_weight`,
    finetune.py lines 31-40): the long pass is the whole sequence, scoring positions short_len..n-1; short
    pass k starts at k * stride, holds short_len + w tokens and scores its last w = min(stride,
    n - start - short_len) (only the last pass is shorter). Token t is thus predicted from between
    short_len and short_len + stride - 1 preceding tokens in the short passes."""
    if short_len < 1 or stride < 1:
        raise ConfigError(f"selection.scoring: short_len={short_len} and stride={stride} must be >= 1")
    if n <= short_len:
        raise ConfigError(
            f"a {n}-token sequence has no token after a {short_len}-token short context; lower "
            "selection.scoring.short_len below the window length"
        )
    short = []
    for start in range(0, n - short_len, stride):
        scored = min(stride, n - start - short_len)
        short.append(Span(start, start + short_len + scored, scored))
    return [Span(0, n, n - short_len)], short


def chunk_spans(n: int, chunk_len: int, short_len: int, scored_len: int) -> tuple[list[Span], list[Span]]:
    """LongWanjuan's coherence passes (OpenLMLab/LongWanjuan `coherence/get_en_coherence.py` lines 96-128):
    the first n // chunk_len chunks of chunk_len tokens (the rest is dropped); per chunk, the long pass is
    the whole chunk and the short pass its last short_len tokens, both scoring its last scored_len."""
    if not 1 <= scored_len < short_len < chunk_len:
        raise ConfigError(
            f"selection.scoring: need 1 <= scored_len ({scored_len}) < short_len ({short_len}) < chunk_len "
            f"({chunk_len})"
        )
    if n < chunk_len:
        raise ConfigError(
            f"a {n}-token window holds no {chunk_len}-token chunk; lower selection.scoring.chunk_len"
        )
    starts = range(0, (n // chunk_len) * chunk_len, chunk_len)
    long = [Span(s, s + chunk_len, scored_len) for s in starts]
    short = [Span(s + chunk_len - short_len, s + chunk_len, scored_len) for s in starts]
    return long, short


def scored_positions(spans: Sequence[Span]) -> list[int]:
    return [p for span in spans for p in span.positions]


def forward_groups(spans: Sequence[Span], batch_size: Callable[[int], int]) -> list[list[Span]]:
    """Consecutive spans of one shape (length, scored), at most batch_size(length) per group: each group
    is one batched forward without padding, and the groups keep the spans' order."""
    groups: list[list[Span]] = []
    for span in spans:
        last = groups[-1] if groups else None
        same = last and (last[0].length, last[0].scored) == (span.length, span.scored)
        if same and len(last) < batch_size(span.length):
            last.append(span)
        else:
            groups.append([span])
    return groups


@dataclass
class TokenContrast:
    """The scored tokens of one window: sequence positions, cross-entropy (nats) with the long and with
    the short context, and KL(p(.|long) || p(.|short)) when asked for. float32 tensors on the CPU."""

    positions: torch.Tensor
    loss_long: torch.Tensor
    loss_short: torch.Tensor
    kl: torch.Tensor | None = None


def adds_bos(tokenizer) -> bool:
    """Whether encoding text with the tokenizer's defaults puts its BOS first (Llama-3: yes; SmolLM2: no),
    as `find_key_token`'s `evaluator_tokenizer(text, ...)` call does."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def with_bos(window: np.ndarray, bos_token_id: int | None) -> torch.Tensor:
    """The window's ids as int64, behind the BOS when one is given (the sequence grows by one token)."""
    ids = torch.as_tensor(np.asarray(window, dtype=np.int64))
    return ids if bos_token_id is None else torch.cat([torch.tensor([bos_token_id]), ids])


def check_speed_keys(passes_per_forward: int | str, head_chunk_tokens: int) -> None:
    if passes_per_forward != "auto" and (not isinstance(passes_per_forward, int) or passes_per_forward < 1):
        raise ConfigError(
            f"selection.scoring.passes_per_forward={passes_per_forward}: an integer >= 1 or auto"
        )
    if head_chunk_tokens < 1:
        raise ConfigError(f"selection.scoring.head_chunk_tokens={head_chunk_tokens}: must be >= 1")


class ContrastModel:
    """A causal LM split into backbone and LM head, scoring tokens under long and short contexts."""

    def __init__(
        self,
        setup: ScorerSetup,
        dtype: str = "auto",
        passes_per_forward: int | str = "auto",
        head_chunk_tokens: int = 1024,
    ) -> None:
        from transformers import AutoModelForCausalLM

        from common.model_sources import resolve_model_path

        check_speed_keys(passes_per_forward, head_chunk_tokens)
        self.device = torch.device(setup.device)
        torch_dtype = resolve_dtype(dtype, setup.device, setup.model_dtype)
        path = resolve_model_path(setup.model, setup.cache_dir)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        self.backbone = self.model.base_model
        self.head = self.model.get_output_embeddings()
        self.passes_per_forward = passes_per_forward
        self.head_chunk_tokens = head_chunk_tokens
        self._check_head(setup.model)

    @torch.no_grad()
    def _check_head(self, name: str) -> None:
        """The chunked path computes head(backbone(x)); a model whose forward does more to its logits
        (soft-capping, logit scaling) would be scored wrongly, so it is refused."""
        ids = torch.arange(8, device=self.device)[None] % self.model.config.vocab_size
        theirs = self.model(input_ids=ids, use_cache=False).logits.float()
        ours = self.head(self.backbone(input_ids=ids, use_cache=False).last_hidden_state).float()
        if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3):
            raise ConfigError(
                f"selection.scorer_model={name}: its forward transforms the LM head's logits (e.g. "
                "soft-capping), which the chunked head does not reproduce; choose another scorer model"
            )

    def _batch_size(self, length: int) -> int:
        if self.passes_per_forward == "auto":
            return max(1, TOKENS_PER_FORWARD // length)
        return int(self.passes_per_forward)

    @torch.no_grad()
    def hidden_rows(self, ids_T: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
        """[sum of scored, D]: for each span in order, the hidden states that predict its scored tokens."""
        rows: list[torch.Tensor] = []
        for group in forward_groups(spans, self._batch_size):
            length, scored = group[0].length, group[0].scored
            batch = torch.stack([ids_T[s.start : s.end] for s in group]).to(self.device)
            hidden = self.backbone(input_ids=batch, use_cache=False).last_hidden_state
            rows.append(hidden[:, length - scored - 1 : length - 1].reshape(-1, hidden.shape[-1]))
        return torch.cat(rows)

    def contrast(
        self, ids_T: torch.Tensor, long: Sequence[Span], short: Sequence[Span], kl: bool = False
    ) -> TokenContrast:
        """Cross-entropy of every scored token with its long and its short context (and their KL)."""
        positions = scored_positions(long)
        if positions != scored_positions(short):
            raise ValueError("long and short passes must score the same tokens in the same order")
        targets = ids_T[positions].to(self.device)

        def statistic(logits_long, logits_short, targets):
            out = {
                "loss_long": token_cross_entropy(logits_long, targets),
                "loss_short": token_cross_entropy(logits_short, targets),
            }
            if kl:
                out["kl"] = token_kl(logits_long, logits_short)
            return out

        stats = chunked_token_statistics(
            self.head,
            [self.hidden_rows(ids_T, long), self.hidden_rows(ids_T, short)],
            statistic,
            self.head_chunk_tokens,
            targets=targets,
        )
        stats = {k: v.float().cpu() for k, v in stats.items()}
        return TokenContrast(
            torch.tensor(positions), stats["loss_long"], stats["loss_short"], stats.get("kl")
        )


@dataclass
class ContextOptions:
    """`selection.scoring` keys shared by the sliding long-vs-short scorers (LongPPL, LongFilter)."""

    short_len: int = 4096
    """Tokens of truncated context before each short pass's scored tokens (LongPPL: 4096 at 32K)."""
    stride: int = 1024
    """Tokens scored per short pass (LongPPL's sliding_window: 1024)."""
    bos: str = "auto"
    """auto: put the BOS first when the scorer's tokenizer adds one to text (as find_key_token's encoding
    of the window's text); true | false: always | never."""
    passes_per_forward: int | str = "auto"
    """Short passes per forward (speed only); auto = as many as fit 16,384 tokens."""
    head_chunk_tokens: int = 1024
    """Scored tokens per LM-head chunk (memory only): 1024 x 128K vocabulary = 0.5 GB of fp32 logits."""
    dtype: str = "auto"
    """auto = selection.scorer_model.dtype on CUDA, float32 on CPU."""

    def __post_init__(self) -> None:
        self.bos = str(self.bos).lower()
        if self.bos not in BOS_CHOICES:
            raise ConfigError(f"selection.scoring.bos={self.bos}: choose one of {BOS_CHOICES}")
        if self.short_len < 1 or self.stride < 1:
            raise ConfigError(
                f"selection.scoring.short_len={self.short_len}, stride={self.stride}: both must be >= 1"
            )
        check_speed_keys(self.passes_per_forward, self.head_chunk_tokens)


class SlidingContrastScorer:
    """Base of LongPPL and LongFilter: the window (behind the BOS per `bos`) scored by `sliding_spans`;
    a subclass turns the tokens' `TokenContrast` into its columns in `score_window`."""

    requires_window_vocabulary = True
    with_kl = False

    def __init__(self, setup: ScorerSetup, opts: ContextOptions) -> None:
        self.options = opts
        self.lm = ContrastModel(setup, opts.dtype, opts.passes_per_forward, opts.head_chunk_tokens)
        self.bos = self._bos_id(setup, opts.bos)

    def _bos_id(self, setup: ScorerSetup, choice: str) -> int | None:
        if choice == "false":
            return None
        bos = self.lm.model.config.bos_token_id
        if choice == "auto":
            from common.model_sources import load_tokenizer

            tokenizer = load_tokenizer(setup.model, setup.cache_dir)
            return tokenizer.bos_token_id if adds_bos(tokenizer) else None
        if bos is None:
            raise ConfigError(f"model {setup.model} has no bos_token_id; set selection.scoring.bos=false")
        return int(bos)

    def token_contrast(self, window: np.ndarray) -> tuple[TokenContrast, int]:
        """The window's scored tokens and the scored sequence's length."""
        ids = with_bos(window, self.bos)
        long, short = sliding_spans(len(ids), self.options.short_len, self.options.stride)
        return self.lm.contrast(ids, long, short, kl=self.with_kl), len(ids)

    def score_batch(self, windows: Sequence[np.ndarray], ids: Sequence[str] = ()) -> list[dict[str, float]]:
        return [self.score_window(w) for w in windows]
