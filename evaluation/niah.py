"""Needle in a haystack over a length x depth grid: haystacks, samples, scoring, the heatmap and its CSV,
and the `niah` evaluation suite.

A needle ("The special magic number for <key> is: <7 digits>.") is inserted at a sentence boundary at
depth d (0 % = first sentence, 100 % = after the last) of a haystack filled to the context length; the
model is asked for the number. The prompt is budgeted with the model's tokenizer so prompt + generation
fits the length exactly: nothing is truncated, so the needle is always in what the model sees.

Haystacks (`evaluation.niah.haystack`): `paul_graham` (the essays RULER and Kamradt's test use, from the
Hub dataset lm-eval's RULER reads), `python_docs` (the demo corpus's English documentation, offline),
`repeat` (RULER's five repeated sentences: a near-trivial test), or `haystack_path` (a .txt file or a
directory of .txt files read in name order, as Kamradt's PaulGrahamEssays/).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from common.errors import ConfigError, UserError
from evaluation.tasks import SUITES, Suite, SuiteContext, require_hub_dataset, score_of

ESSAYS_DATASET = "baber/paul_graham_essays"  # lm-eval's RULER essay haystack (prepare_niah.get_haystack)
HAYSTACKS = ("paul_graham", "python_docs", "repeat")
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


def haystack_text(source: str, path: str | None = None) -> str:
    """The haystack's text: `path` (a file, or a directory of .txt files in name order) or a named source."""
    if path:
        where = Path(path).expanduser()
        if where.is_dir():
            files = sorted(where.glob("*.txt"))
            if not files:
                raise NiahError(f"evaluation.niah.haystack_path={path}: no .txt file in the directory")
            return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        if not where.is_file():
            raise NiahError(f"evaluation.niah.haystack_path={path}: no such file or directory")
        return where.read_text(encoding="utf-8", errors="replace")
    if source == "repeat":
        return REPEAT_HAYSTACK
    if source == "python_docs":
        from common.corpus import SourceSpec
        from common.demo_corpus import read_python_docs

        spec = SourceSpec(domain="docs", format="python_docs", options={"modules": []})
        return "\n\n".join(text for text, _ in read_python_docs(spec))  # the language-reference topics
    if source == "paul_graham":
        import datasets

        require_hub_dataset(ESSAYS_DATASET, None, "niah", "evaluation.niah.haystack_path")
        return " ".join(datasets.load_dataset(ESSAYS_DATASET, split="train")["text"])
    raise ConfigError(f"evaluation.niah.haystack={source}: choose one of {HAYSTACKS} (or set haystack_path)")


def haystack_sentences(source: str = "repeat", path: str | None = None) -> list[str]:
    """The haystack cut into sentences (the needle goes between two of them)."""
    sentences = _split(haystack_text(source, path))
    if not sentences:
        raise NiahError(f"evaluation.niah.haystack_path={path}: the haystack has no text")
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
    sentences: list[str],
    seed: int,
) -> list[dict[str, Any]]:
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


# ---- the suite ----------------------------------------------------------------------------------------


def niah_tasks(ctx: SuiteContext) -> list[dict[str, Any]]:
    haystack = str(ctx.conf.get("haystack") or "repeat")
    if haystack not in HAYSTACKS:
        raise ConfigError(f"evaluation.niah.haystack={haystack}: choose one of {HAYSTACKS}")
    samples = make_samples(
        ctx.tokenizer,
        ctx.conf["lengths"],
        ctx.conf["depths"],
        int(ctx.conf.get("samples_per_cell", 1)),
        int(ctx.conf.get("max_gen_toks", 16)),
        haystack_sentences(haystack, ctx.conf.get("haystack_path")),
        ctx.seed,
    )
    path = ctx.out_dir / "niah_samples.jsonl"
    atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in samples))
    return [
        {
            "task": "niah_grid",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{input}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": " ",
            "generation_kwargs": {
                "until": ["\n"],
                "max_gen_toks": int(ctx.conf.get("max_gen_toks", 16)),
                "do_sample": False,
            },
            "process_results": needle_retrieved,
            "metric_list": [{"metric": "retrieval", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
    ]


def niah_summary(
    ctx: SuiteContext, results: Mapping[str, Any], samples: Mapping[str, list], configs: Mapping[str, Any]
) -> dict[str, Any]:
    grid = grid_scores(samples.get("niah_grid", []))
    write_grid_csv(ctx.out_dir / "niah_grid.csv", grid)
    write_heatmap(ctx.out_dir / "niah_heatmap.png", grid, "Needle in a haystack: retrieval")
    return {
        "retrieval": score_of(results, "niah_grid", "retrieval"),
        "grid": {f"{length}@{depth:g}": score for (length, depth), score in grid.items()},
        "haystack": ctx.conf.get("haystack_path") or ctx.conf.get("haystack") or "repeat",
        "files": ["niah_grid.csv", "niah_heatmap.png"],
    }


SUITES.register("niah")(
    Suite(
        niah_tasks,
        niah_summary,
        limit=lambda ctx: None,
        lengths=lambda conf: [int(n) for n in conf.get("lengths") or []],
        length_key="evaluation.niah.lengths",
    )
)
