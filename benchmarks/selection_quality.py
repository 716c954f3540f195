"""Selection-quality proxy: do scorers rank coherent long windows above stitched ones?

Coherent window: W contiguous tokens of one long document. Stitched window: the same number of tokens
made of `--piece-tokens` pieces cut from many different documents and concatenated (the classic
"concatenated short documents have no long-range dependency" negative). Both kinds per domain, scored
by every method with its Hydra config (the same options the pipeline uses). Reports ROC-AUC of
coherent-over-stitched per domain with a seeded, stratified bootstrap 95 % interval, and seconds per
window. The cheap methods (LongAttn, random, compression) use `--count` windows per kind and domain;
the slow ones the first `--ladm-count` / `--prolong-count` / `--context-count` (LongPPL, LongFilter,
LongWanjuan's ppl_gain) of them (wider intervals, printed beside each AUC).

    python benchmarks/selection_quality.py                               # demo corpus, SmolLM2
    python benchmarks/selection_quality.py --corpus books.jsonl --text-field text --window 2048 --count 50
    python benchmarks/selection_quality.py --methods longattn --layers all --count 32 --exclude-sink-tokens 4

LongAttn is scored causal and non-causal (`--causal both`, the default: one forward pass, the statistics
twice), each with DS alone and the combined score (min-max and z-score within each domain, alpha 0.5).
With `--layers` it is scored at every listed layer in one forward pass; the table then has a row per
layer and mode, the cost per layer (forward through the layer, pro rata, plus that layer's statistics)
and `--plot` gets AUC against layer per domain.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence

import numpy as np

METHODS = ("longattn", "ladm", "prolong", "random", "longppl", "longfilter", "ppl_gain", "compression")
COLUMNS = {
    "ladm": "cds",
    "prolong": "lds",
    "random": "u",
    "longppl": "key_fraction",
    "longfilter": "kl_gain",
    "ppl_gain": "ppl_gain",
    "compression": "incompressibility",
}
CONTEXT_METHODS = ("longppl", "longfilter", "ppl_gain")
"""Long-vs-short context scorers: several forward passes per window, `--context-count` windows."""
MODES = {"true": (True,), "false": (False,), "both": (True, False)}


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


def build_scorer_for(method: str, window: int, model: str | None, extra_options: dict | None = None):
    """The method's scorer with its pipeline options (plus `extra_options`), on CPU."""
    from omegaconf import OmegaConf

    from common.model_sources import default_cache_dir
    from selection.scorers.registry import ScorerSetup, build_scorer

    cfg = method_config(method, window)
    options = {**(OmegaConf.to_container(cfg.selection.scoring, resolve=True) or {}), **(extra_options or {})}
    scorer_model = model or cfg.selection.scorer_model.name_or_path
    return build_scorer(
        ScorerSetup(method, scorer_model, options, default_cache_dir(), "cpu", cfg.model.name_or_path)
    )


def score_all(scorer, method: str, windows: list[list[int]], modes: Sequence[bool]) -> tuple[list, float]:
    """Rows per window (LongAttn: {(layer, causal): HeadStats}, both modes from one forward) and the
    seconds per window."""
    start = time.perf_counter()
    if method == "longattn":
        rows = [scorer.layer_stats(np.asarray(w), modes) for w in windows]
    else:
        rows = [scorer.score_batch([np.asarray(w)], [f"bench/{i}"])[0] for i, w in enumerate(windows)]
    return rows, (time.perf_counter() - start) / len(windows)


def parse_layers(text: str | None, num_layers: int) -> list[int] | None:
    if not text:
        return None
    return list(range(num_layers)) if text == "all" else [int(x) for x in text.split(",")]


def layer_costs(
    stats_seconds: dict[tuple[int, bool], float], seconds_per_window: float, n_windows: int
) -> dict[tuple[int, bool], float]:
    """Seconds per window to score at layer i alone in one attention mode: the forward through layers
    0..i (pro rata of the measured forward time, i.e. the total minus every statistics call) plus that
    layer's statistics in that mode."""
    stats = {key: t / n_windows for key, t in stats_seconds.items()}
    forward = max(seconds_per_window - sum(stats.values()), 0.0)
    top = max(layer for layer, _ in stats)
    return {key: forward * (key[0] + 1) / (top + 1) + stats[key] for key in sorted(stats)}


def auc_interval(
    pos: np.ndarray, neg: np.ndarray, counts_pos: np.ndarray, counts_neg: np.ndarray
) -> tuple[float, float, float]:
    """ROC-AUC and its stratified bootstrap 95 % percentile interval. `counts_*` [B, n] say how often
    each positive / negative window is drawn in each of B resamples (multinomial, drawn once per domain
    so every method is resampled identically)."""
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(wins.mean())
    boot = ((counts_pos @ wins) * counts_neg).sum(-1) / (len(pos) * len(neg))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return auc, float(lo), float(hi)


class AucJudge:
    """AUC of coherent over stitched per domain, with seeded bootstrap intervals."""

    def __init__(self, labels: Sequence[tuple[str, str]], boots: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.domains = sorted({d for d, _ in labels})
        self.index, self.counts = {}, {}
        for d in self.domains:
            for kind in ("coherent", "stitched"):
                idx = np.array([i for i, lab in enumerate(labels) if lab == (d, kind)])
                self.index[d, kind] = idx
                self.counts[d, kind] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=boots)

    def __call__(self, values: Sequence[float]) -> dict[str, tuple[float, float, float]]:
        v = np.asarray(values, dtype=np.float64)
        return {
            d: auc_interval(
                v[self.index[d, "coherent"]],
                v[self.index[d, "stitched"]],
                self.counts[d, "coherent"],
                self.counts[d, "stitched"],
            )
            for d in self.domains
        }


def window_labels(domains: Sequence[str], count: int) -> list[tuple[str, str]]:
    return [(d, kind) for d in domains for kind in ("coherent", "stitched") for _ in range(count)]


def longattn_table(rows, labels, modes, layers, judge, costs) -> tuple[list, dict]:
    """Table rows (name, attention, AUCs, s/window) per layer and mode, and AUC-vs-layer curves."""
    from selection.ranking import longattn_score

    domains = [d for d, _ in labels]
    table, curves = [], {}
    for layer in layers:
        for causal in modes:
            attention = "causal" if causal else "non-causal"
            ds = np.array([r[layer, causal].mean_ds for r in rows])
            var = np.array([r[layer, causal].mean_variance for r in rows])
            scores = {
                "DS only": ds,
                "min_max (alpha 0.5)": longattn_score(ds, var, 0.5, "min_max", groups=domains),
            }
            if len(layers) == 1:
                scores["zscore (alpha 0.5)"] = longattn_score(ds, var, 0.5, "zscore", groups=domains)
            for name, values in scores.items():
                aucs = judge(values)
                table.append((f"longattn layer {layer} {name}", attention, aucs, costs[layer, causal]))
                curves.setdefault(f"{attention} {name}", {})[layer] = {d: a[0] for d, a in aucs.items()}
    return table, curves


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", help="a JSONL file (one domain); default: the demo corpus (code, docs)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument(
        "--count",
        type=int,
        default=80,
        help="coherent and stitched windows per domain, each (LongAttn, random)",
    )
    parser.add_argument("--ladm-count", type=int, default=24, help="LADM's windows per kind and domain")
    parser.add_argument("--prolong-count", type=int, default=12, help="ProLong's windows per kind and domain")
    parser.add_argument(
        "--context-count",
        type=int,
        default=12,
        help="windows per kind and domain of longppl, longfilter, ppl_gain",
    )
    parser.add_argument("--piece-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="windows and bootstrap resamples")
    parser.add_argument("--boots", type=int, default=2000, help="bootstrap resamples per AUC")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", help="scorer model for every method (default: each method's config)")
    parser.add_argument(
        "--causal", choices=sorted(MODES), default="both", help="LongAttn attention: true | false | both"
    )
    parser.add_argument(
        "--layers", help="LongAttn layers: all | comma-separated indices (default: config's [0])"
    )
    parser.add_argument(
        "--exclude-sink-tokens", type=int, default=0, help="LongAttn: keys < n leave the far region"
    )
    parser.add_argument(
        "--plot", default="benchmarks/auc_vs_layer.png", help="AUC-vs-layer PNG (with --layers)"
    )
    return parser.parse_args()


def method_count(method: str, args: argparse.Namespace) -> int:
    counts = {"ladm": args.ladm_count, "prolong": args.prolong_count}
    counts.update(dict.fromkeys(CONTEXT_METHODS, args.context_count))
    return counts.get(method, args.count)


def run_method(method, args, sets, domains, modes) -> list:
    """Score `method`'s windows (its count per kind and domain: the first ones of each set) and return
    its table rows."""
    count = min(method_count(method, args), args.count)
    windows = [w for d in domains for kind in (0, 1) for w in sets[d][kind][:count]]
    labels = window_labels(domains, count)
    judge = AucJudge(labels, args.boots, args.seed)
    extra = {}
    if method == "longattn":
        from common.checkpoint import load_config
        from common.model_sources import default_cache_dir

        scorer_model = args.model or method_config(method, args.window).selection.scorer_model.name_or_path
        layers = parse_layers(args.layers, load_config(scorer_model, default_cache_dir()).num_hidden_layers)
        extra = {"exclude_sink_tokens": args.exclude_sink_tokens, **({"layers": layers} if layers else {})}
    scorer = build_scorer_for(method, args.window, args.model, extra)
    rows, seconds = score_all(scorer, method, windows, modes)
    print(f"{method}: done ({seconds:.3g} s/window, {len(windows)} windows)", flush=True)
    if method != "longattn":
        return [(method, "", judge([r[COLUMNS[method]] for r in rows]), seconds, count)]
    costs = layer_costs(scorer.stats_seconds, seconds, len(windows))
    table, curves = longattn_table(rows, labels, modes, scorer.options.layers, judge, costs)
    if len(scorer.options.layers) > 1:
        plot_auc_vs_layer(args.plot, curves)
        print(f"plot: {args.plot}")
    return [(*row, count) for row in table]


def main() -> None:
    from common.model_sources import default_cache_dir, load_tokenizer

    args = parse_args()
    tokenizer = load_tokenizer(args.model or "smollm2_135m", default_cache_dir())
    docs = load_documents(args.corpus, args.text_field, tokenizer)
    rng = np.random.default_rng(args.seed)
    sets = {
        d: build_windows(ds, args.window, args.count, args.piece_tokens, rng)
        for d, ds in sorted(docs.items())
    }
    domains = list(sets)
    table = []
    for method in args.methods.split(","):
        table += run_method(method, args, sets, domains, MODES[args.causal])
    spans = {d: sum(len(doc) // args.window for doc in ds) for d, ds in sorted(docs.items())}
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; window {args.window}; pieces of "
        f"{args.piece_tokens} tokens; seed {args.seed}; {args.boots} bootstrap resamples; corpus "
        f"{args.corpus or 'demo'} (disjoint windows available per domain: {spans}); LongAttn sink tokens "
        f"excluded: {args.exclude_sink_tokens}\n"
    )
    print(
        "| method | attention | "
        + " | ".join(f"AUC {d} [95% CI]" for d in domains)
        + " | s/window | windows per kind and domain |"
    )
    print("|---|---|" + "---|" * (len(domains) + 2))
    for name, attention, aucs, seconds, count in table:
        cells = " | ".join(f"{a:.3f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in (aucs[d] for d in domains))
        print(f"| {name} | {attention} | {cells} | {seconds:.3g} | {count} |")


if __name__ == "__main__":
    main()
