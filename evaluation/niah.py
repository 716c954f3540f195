"""Needle in a haystack over a length x depth grid: samples, scoring, the heatmap and its CSV.

A needle ("The special magic number for <key> is: <7 digits>.") is inserted at a sentence boundary at
depth d (0 % = first sentence, 100 % = after the last) of a haystack filled to the context length; the
model is asked for the number. The prompt is budgeted with the model's tokenizer so prompt + generation
fits the length exactly: nothing is truncated, so the needle is always in what the model sees.
"""

from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.errors import UserError

# RULER's "repeat" haystack: needs no data.
REPEAT_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEYS = ["apple", "river", "copper", "lantern", "meadow", "falcon", "violet", "harbor", "ember", "quartz"]
TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n{context}\n"
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)


class NiahError(UserError, ValueError):
    """A NIAH setting that cannot build its prompts (haystack file, lengths); names the key."""


def haystack_sentences(path: str | None) -> list[str]:
    """Sentences of a local text file (`evaluation.niah.haystack_path`), or the repeat haystack."""
    if path is None:
        return _split(REPEAT_HAYSTACK)
    file = Path(path).expanduser()
    if not file.is_file():
        raise NiahError(f"evaluation.niah.haystack_path={path}: no such file")
    sentences = _split(file.read_text(encoding="utf-8", errors="replace"))
    if not sentences:
        raise NiahError(f"evaluation.niah.haystack_path={path}: the file has no text")
    return sentences


def _split(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]


def build_prompt(sentences: list[str], n_sentences: int, needle: str, depth: float, key: str) -> str:
    body = [sentences[i % len(sentences)] for i in range(n_sentences)]
    body.insert(round(depth / 100 * len(body)), needle)
    return TEMPLATE.format(context=" ".join(body), key=key)


def make_sample(
    tokenizer, sentences: list[str], length: int, depth: float, max_gen_toks: int, rng: random.Random
) -> dict[str, Any]:
    """The longest prompt (whole sentences) with prompt tokens + max_gen_toks <= length."""
    key = rng.choice(KEYS)
    value = str(rng.randrange(1_000_000, 10_000_000))
    needle = f"The special magic number for {key} is: {value}."
    budget = length - max_gen_toks

    def size(n: int) -> int:
        return len(tokenizer(build_prompt(sentences, n, needle, depth, key))["input_ids"])

    if size(0) > budget:
        raise NiahError(
            f"evaluation.niah.lengths: {length} tokens cannot hold the question and the needle "
            f"({size(0)} tokens + {max_gen_toks} to generate)"
        )
    lo, hi = 0, 1
    while size(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # largest n with size(n) <= budget
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    prompt = build_prompt(sentences, lo, needle, depth, key)
    return {"input": prompt, "answer": value, "length": length, "depth": depth, "prompt_tokens": size(lo)}


def make_samples(
    tokenizer,
    lengths: Iterable[int],
    depths: Iterable[float],
    per_cell: int,
    max_gen_toks: int,
    haystack_path: str | None,
    seed: int,
) -> list[dict[str, Any]]:
    sentences = haystack_sentences(haystack_path)
    rng = random.Random(seed)
    return [
        make_sample(tokenizer, sentences, int(length), float(depth), max_gen_toks, rng)
        for length in lengths
        for depth in depths
        for _ in range(per_cell)
    ]


def needle_retrieved(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval process_results: 1 if the needle's number is in the generation."""
    return {"retrieval": float(str(doc["answer"]) in results[0])}


def grid_scores(samples: Iterable[Mapping[str, Any]]) -> dict[tuple[int, float], float]:
    """Mean retrieval per (length, depth) from lm-eval's logged samples."""
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for sample in samples:
        doc = sample["doc"]
        cells[(int(doc["length"]), float(doc["depth"]))].append(float(sample["retrieval"]))
    return {cell: sum(v) / len(v) for cell, v in sorted(cells.items())}


def write_grid_csv(path: Path, grid: Mapping[tuple[int, float], float]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["length", "depth", "retrieval"])
        for (length, depth), score in sorted(grid.items()):
            writer.writerow([length, depth, f"{score:.4f}"])


def write_heatmap(path: Path, grid: Mapping[tuple[int, float], float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({k[0] for k in grid})
    depths = sorted({k[1] for k in grid})
    values = np.array([[grid.get((length, d), np.nan) for length in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="retrieval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
