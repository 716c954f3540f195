"""Selection-quality proxy: do scorers rank coherent long windows above stitched ones?

Coherent window: W contiguous tokens of one long document. Stitched window: the same number of tokens
made of `--piece-tokens` pieces cut from many different documents and concatenated (the classic
"concatenated short documents have no long-range dependency" negative). Both kinds per domain, scored
by every method with its Hydra config (the same options the pipeline uses). Reports ROC-AUC of
coherent-over-stitched per domain and seconds per window.

    python benchmarks/selection_quality.py                               # demo corpus, SmolLM2
    python benchmarks/selection_quality.py --corpus books.jsonl --text-field text --window 2048 --count 50
    python benchmarks/selection_quality.py --methods longattn --layers all --exclude-sink-tokens 4

With `--layers`, LongAttn is scored at every listed layer in one forward pass; the table then has a row
per layer (DS alone and the min-max combined score), the cost per layer (forward through the layer,
pro rata, plus that layer's statistics) and `--plot` gets AUC against layer per domain.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence

import numpy as np

METHODS = ("longattn", "ladm", "prolong", "random")


def load_documents(corpus: str | None, text_field: str, tokenizer) -> dict[str, list[list[int]]]:
    from common.corpus import CorpusStats, SourceSpec, iter_documents

    if corpus:
        specs = [SourceSpec(domain="corpus", path=corpus, text_field=text_field)]
    else:
        specs = [
            SourceSpec(domain="code", format="python_code"),
            SourceSpec(domain="docs", format="python_docs"),
        ]
    docs: dict[str, list[list[int]]] = {}
    for doc in iter_documents(specs, "skip", CorpusStats()):
        docs.setdefault(doc["domain"], []).append(tokenizer(doc["text"], add_special_tokens=False).input_ids)
    return docs


def build_windows(
    docs: Sequence[list[int]], window: int, count: int, piece: int, rng: np.random.Generator
) -> tuple[list[list[int]], list[list[int]]]:
    """`count` coherent and `count` stitched windows of `window` tokens from one domain's documents."""
    long_docs = [d for d in docs if len(d) >= window]
    if not long_docs:
        raise ValueError(f"no document has {window} tokens; lower --window")
    coherent = []
    for _ in range(count):
        doc = long_docs[rng.integers(len(long_docs))]
        start = int(rng.integers(len(doc) - window + 1))
        coherent.append(doc[start : start + window])
    usable = [d for d in docs if len(d) >= piece]
    if len(usable) < 2:
        raise ValueError("stitching needs at least two documents of --piece-tokens tokens")
    stitched = []
    for _ in range(count):
        tokens, last = [], -1
        while len(tokens) < window:
            choice = int(rng.integers(len(usable)))
            if choice == last:
                continue
            doc = usable[choice]
            start = int(rng.integers(len(doc) - piece + 1))
            tokens += doc[start : start + piece]
            last = choice
        stitched.append(tokens[:window])
    return coherent, stitched


def method_config(method: str, window: int):
    """The method's selection config exactly as `python run.py selection=<method>` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    conf_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"selection={method}", f"data.window_size={window}", "logger=none"],
        )
    GlobalHydra.instance().clear()
    return cfg


def score_all(
    method: str, windows: list[list[int]], window: int, model: str | None, extra_options: dict | None = None
) -> tuple[list[dict], float, object]:
    from omegaconf import OmegaConf

    from common.model_sources import default_cache_dir
    from selection.scorers.registry import ScorerSetup, build_scorer

    cfg = method_config(method, window)
    options = {**(OmegaConf.to_container(cfg.selection.scoring, resolve=True) or {}), **(extra_options or {})}
    scorer_model = model or cfg.selection.scorer_model.name_or_path
    scorer = build_scorer(
        ScorerSetup(method, scorer_model, options, default_cache_dir(), "cpu", cfg.model.name_or_path)
    )
    start = time.perf_counter()
    rows = [scorer.score_batch([np.asarray(w)], [f"bench/{i}"])[0] for i, w in enumerate(windows)]
    return rows, (time.perf_counter() - start) / len(windows), scorer


def parse_layers(text: str | None, num_layers: int) -> list[int] | None:
    if not text:
        return None
    return list(range(num_layers)) if text == "all" else [int(x) for x in text.split(",")]


def layer_costs(scorer, seconds_per_window: float, n_windows: int) -> dict[int, float]:
    """Seconds per window to score at layer i alone: the forward through layers 0..i (pro rata of the
    measured forward time) plus layer i's statistics."""
    stats = {i: t / n_windows for i, t in scorer.stats_seconds.items()}
    forward = max(seconds_per_window - sum(stats.values()), 0.0)
    top = max(stats)
    return {i: forward * (i + 1) / (top + 1) + stats[i] for i in sorted(stats)}


def plot_auc_vs_layer(path: str, per_layer: dict[str, dict[int, dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(next(iter(next(iter(per_layer.values())).values())))
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for label, by_layer in per_layer.items():
            layers = sorted(by_layer)
            ax.plot(layers, [by_layer[i][domain] for i in layers], marker="o", label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{domain}: coherent vs stitched")
        ax.set_xlabel("layer")
        ax.set_ylabel("ROC-AUC")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    from common.model_sources import default_cache_dir, load_tokenizer
    from selection.analysis import roc_auc
    from selection.ranking import longattn_score

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", help="a JSONL file (one domain); default: the demo corpus (code, docs)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument(
        "--count", type=int, default=24, help="coherent and stitched windows per domain, each"
    )
    parser.add_argument("--piece-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", help="scorer model for every method (default: each method's config)")
    parser.add_argument(
        "--layers", help="LongAttn layers: all | comma-separated indices (default: config's [0])"
    )
    parser.add_argument(
        "--exclude-sink-tokens", type=int, default=0, help="LongAttn: keys < n leave the far region"
    )
    parser.add_argument(
        "--plot", default="benchmarks/auc_vs_layer.png", help="AUC-vs-layer PNG (with --layers)"
    )
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model or "smollm2_135m", default_cache_dir())
    docs = load_documents(args.corpus, args.text_field, tokenizer)
    rng = np.random.default_rng(args.seed)
    sets = {
        d: build_windows(ds, args.window, args.count, args.piece_tokens, rng)
        for d, ds in sorted(docs.items())
    }
    domains = list(sets)
    table: list[tuple[str, dict[str, float], float]] = []
    for method in args.methods.split(","):
        windows = [w for d in domains for w in sets[d][0] + sets[d][1]]
        extra = {}
        if method == "longattn":
            from common.checkpoint import load_config

            scorer_model = (
                args.model or method_config(method, args.window).selection.scorer_model.name_or_path
            )
            layers = parse_layers(
                args.layers, load_config(scorer_model, default_cache_dir()).num_hidden_layers
            )
            extra = {
                "exclude_sink_tokens": args.exclude_sink_tokens,
                **({"layers": layers} if layers else {}),
            }
        rows, seconds, scorer = score_all(method, windows, args.window, args.model, extra)
        labels = [(d, kind) for d in domains for kind in ("coherent", "stitched") for _ in range(args.count)]

        def auc_of(values, rows=rows, labels=labels):
            values = np.asarray(values)
            return {
                d: roc_auc(
                    [v for v, (dd, k) in zip(values, labels) if dd == d and k == "coherent"],
                    [v for v, (dd, k) in zip(values, labels) if dd == d and k == "stitched"],
                )
                for d in domains
            }

        if method == "longattn" and not scorer.first_layer_only:
            costs = layer_costs(scorer, seconds, len(windows))
            per_layer = {"DS only": {}, "min_max combined": {}}
            for i in scorer.options.layers:
                ds = np.array([r[f"ds_l{i}"] for r in rows])
                var = np.array([r[f"variance_l{i}"] for r in rows])
                per_layer["DS only"][i] = auc_of(ds)
                per_layer["min_max combined"][i] = auc_of(longattn_score(ds, var, 0.5, "min_max"))
                table.append((f"longattn layer {i} DS only", per_layer["DS only"][i], costs[i]))
                table.append((f"longattn layer {i} min_max", per_layer["min_max combined"][i], costs[i]))
            plot_auc_vs_layer(args.plot, per_layer)
            print(f"plot: {args.plot}")
        elif method == "longattn":
            ds = np.array([r["ds"] for r in rows])
            var = np.array([r["variance"] for r in rows])
            table.append(("longattn DS only", auc_of(ds), seconds))
            table.append(
                ("longattn min_max (alpha 0.5)", auc_of(longattn_score(ds, var, 0.5, "min_max")), seconds)
            )
            table.append(
                ("longattn zscore (alpha 0.5)", auc_of(longattn_score(ds, var, 0.5, "zscore")), seconds)
            )
        else:
            column = {"ladm": "cds", "prolong": "lds", "random": "u"}[method]
            table.append((method, auc_of([r[column] for r in rows]), seconds))
        print(f"{method}: done ({seconds:.3f} s/window)", flush=True)

    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; window {args.window}; {args.count} coherent + "
        f"{args.count} stitched per domain; pieces of {args.piece_tokens} tokens; seed {args.seed}; "
        f"corpus {args.corpus or 'demo'}; LongAttn sink tokens excluded: {args.exclude_sink_tokens}\n"
    )
    print("| method | " + " | ".join(f"AUC {d}" for d in domains) + " | s/window |")
    print("|---|" + "---|" * (len(domains) + 1))
    for name, aucs, seconds in table:
        print(f"| {name} | " + " | ".join(f"{aucs[d]:.3f}" for d in domains) + f" | {seconds:.3f} |")


if __name__ == "__main__":
    main()
