"""What a researcher looks at after selection: per-domain statistics (paper Table 10 layout), score
histograms, and the opening text of the best and worst windows of each domain."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from common.atomic import atomic_write


def domain_statistics(
    domains: Sequence[str], columns: dict[str, np.ndarray]
) -> dict[str, dict[str, dict[str, float]]]:
    """{domain: {column: {min, max, mean}}}."""
    doms = np.asarray(domains)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for domain in sorted(set(domains)):
        mask = doms == domain
        out[domain] = {
            name: {"min": float(v[mask].min()), "max": float(v[mask].max()), "mean": float(v[mask].mean())}
            for name, v in columns.items()
        }
    return out


def statistics_markdown(stats: dict[str, dict[str, dict[str, float]]]) -> str:
    names = list(next(iter(stats.values())).keys()) if stats else []
    header = "| domain | " + " | ".join(f"{n} min | {n} max | {n} mean" for n in names) + " |"
    lines = [header, "|" + "---|" * (1 + 3 * len(names))]
    for domain, cols in stats.items():
        cells = [f"{cols[n][k]:.4g}" for n in names for k in ("min", "max", "mean")]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_histograms(
    out_dir: Path, domains: Sequence[str], columns: dict[str, np.ndarray], selected: np.ndarray
) -> list[str]:
    """One PNG per domain: a histogram per column, all windows vs the selected ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = np.asarray(domains)
    names = []
    for domain in sorted(set(domains)):
        mask = doms == domain
        fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.2), squeeze=False)
        for ax, (name, values) in zip(axes[0], columns.items()):
            bins = np.histogram_bin_edges(values[mask], bins=30)
            ax.hist(values[mask], bins=bins, alpha=0.5, label="all")
            ax.hist(values[mask & selected], bins=bins, alpha=0.7, label="selected")
            ax.set_title(f"{domain}: {name}")
            ax.legend()
        fig.tight_layout()
        name = f"hist_{domain}.png"
        atomic_write(out_dir / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=90))
        plt.close(fig)
        names.append(name)
    return names


def examples_markdown(
    best_worst: dict[str, tuple[list[tuple[str, float]], list[tuple[str, float]]]],
    decode: Callable[[str], str],
    chars: int = 400,
) -> str:
    """For each domain, the opening `chars` characters of its best and worst windows."""
    parts = ["# Best and worst windows per domain\n"]
    for domain, (best, worst) in sorted(best_worst.items()):
        for label, rows in (("best", best), ("worst", worst)):
            parts.append(f"\n## {domain}: {label}\n")
            for window_id, score in rows:
                text = decode(window_id)[:chars].replace("```", "'''")
                parts.append(f"\n### `{window_id}` (score {score:.4f})\n\n```\n{text}\n```\n")
    return "".join(parts)


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half
    (the Mann-Whitney U statistic over n_pos * n_neg)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("roc_auc needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
