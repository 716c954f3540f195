"""The report stage: our evaluation results beside the paper's, as Markdown and CSV tables and plots.

It reads one run (the current one) or every run of a sweep (`report.sweep_dir`: each member's
`artifacts.json` and `.hydra/config.yaml`), labels each run as the paper does (method and training
tokens), and writes `report.md`, `<table>.csv`, `ruler_vs_tokens.png`, `score_distributions.png` and
the runs' NIAH heatmaps.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.atomic import atomic_write_text
from common.errors import MissingInputError
from common.stage import StageContext
from experiments.paper_tables import (
    PUBLISHED_DIR,
    TABLES,
    RunResult,
    base_model_label,
    csv_text,
    describe,
    load_notes,
    load_published,
    markdown,
    method_label,
    niah_rows,
    notes_for,
    run_protocol,
    run_tables,
    table_rows,
    tokens_label,
    unpublished_methods,
)

log = logging.getLogger(__name__)


def run_dirs(cfg: DictConfig) -> list[Path]:
    sweep = cfg.report.get("sweep_dir")
    if not sweep:
        return [Path(cfg.paths.output_dir)]
    found = sorted(p.parent for p in Path(sweep).expanduser().glob("**/artifacts.json"))
    if not found:
        raise MissingInputError(f"report.sweep_dir={sweep}: no run directory (artifacts.json) under it")
    return found


def _run_config(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        return OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    return OmegaConf.to_container(cfg, resolve=True)


def run_label(config: dict[str, Any], stage: str) -> tuple[str, str, str]:
    """(label, method, tokens) of one evaluate artifact of a run, as the paper names its rows."""
    if stage == "evaluate_base":  # the untrained model training starts from: the paper's base row
        method = base_model_label(str((config.get("model") or {}).get("name_or_path")))
        return f"{method} (untrained)", method, "0"
    published_as = (config.get("report") or {}).get("published_as")
    if published_as:  # a released model, compared with the paper's row for it
        return str(published_as["label"]), str(published_as["method"]), str(published_as["tokens"])
    evaluated = (config.get("evaluation") or {}).get("model")
    if evaluated:  # a model evaluated as it is (e.g. the base model): no selection, no training tokens
        method = base_model_label(str(evaluated))
        return method, method, "0"
    budget = (config.get("training") or {}).get("budget_tokens")
    method = method_label(config.get("selection") or {})
    return method, method, tokens_label(float(budget) if budget is not None else None)


def collect(cfg: DictConfig) -> list[tuple[RunResult, dict[str, str]]]:
    """Every evaluated model of every run (its trained model, and its base model when `evaluate_base`
    ran): a RunResult and the run's artifact index (with `evaluate` pointing at that evaluation)."""
    runs = []
    for run_dir in run_dirs(cfg):
        index = json.loads((run_dir / "artifacts.json").read_text())
        stages = [s for s in ("evaluate_base", "evaluate") if s in index]
        if not stages:
            log.info("report: %s has no evaluate artifact; skipped", run_dir)
        config = _run_config(run_dir, cfg)
        for stage in stages:
            results = json.loads((Path(index[stage]) / "results.json").read_text())
            tables, length = run_tables(results)
            label, method, tokens = run_label(config, stage)
            if cfg.report.get("sweep_dir"):
                label = f"{label} ({run_dir.name})"
            grid = ((results.get("suites") or {}).get("niah") or {}).get("grid", {})
            protocol = run_protocol(results, length)
            result = RunResult(label, method, tokens, tables, length, protocol, describe(results), grid)
            own = {**index, "evaluate": index[stage]} if stage == "evaluate" else {"evaluate": index[stage]}
            runs.append((result, own))
    return runs


def fingerprint_extras(cfg: DictConfig) -> list[Any]:
    """For a sweep: which results exist and when they were written (the report reads them all)."""
    if not cfg.report.get("sweep_dir"):
        return []
    out = []
    for run_dir in run_dirs(cfg):
        index = json.loads((run_dir / "artifacts.json").read_text())
        for stage in ("evaluate_base", "evaluate"):
            if stage in index:
                results = Path(index[stage]) / "results.json"
                out.append([str(results), results.stat().st_mtime if results.is_file() else None])
    return out


def plot_ruler_vs_tokens(path: Path, runs: list[RunResult], published: dict) -> None:
    """Figure 1b style: RULER-NIAH average vs training tokens per method; ours solid, paper dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for (tokens, method), row in published["table1"].items():
        by_method.setdefault(method, []).append((float(tokens.rstrip("B")), row["Avg"]))
    for i, (method, points) in enumerate(sorted(by_method.items())):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "--", marker="o", color=f"C{i}", alpha=0.6, label=f"{method} (paper)")
    ours: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        avg = run.tables.get("table1", {}).get("Avg")
        if avg is not None and run.tokens.endswith("B"):
            ours.setdefault(run.method, []).append((float(run.tokens.rstrip("B")), avg))
    for i, (method, points) in enumerate(sorted(ours.items())):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "-", marker="s", color=f"C{len(by_method) + i}", label=f"{method} (ours)")
    ax.set_xlabel("training tokens (B)")
    ax.set_ylabel("RULER NIAH average at 32K")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_score_distributions(path: Path, runs: list[tuple[RunResult, dict[str, str]]]) -> bool:
    """Histogram of the selected windows' scores, one panel per run (scales differ by method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    panels = [(r, Path(i["select"]) / "selection.parquet") for r, i in runs if "select" in i]
    panels = [(r, p) for r, p in panels if p.is_file()]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (run, file) in zip(axes[0], panels):
        table = pq.read_table(file, columns=["domain", "score"])
        domains = table.column("domain").to_pylist()
        scores = table.column("score").to_numpy()
        for domain in sorted(set(domains)):
            ax.hist([s for s, d in zip(scores, domains) if d == domain], bins=20, alpha=0.6, label=domain)
        ax.set_title(run.label, fontsize=8)
        ax.set_xlabel("score (selected windows)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    published_dir = Path(cfg.report.get("published_dir") or PUBLISHED_DIR)
    published = load_published(published_dir)
    notes = load_notes(published_dir)
    collected = collect(cfg)
    runs = [r for r, _ in collected]
    out = ctx.out_dir
    sections = [
        "# LongAttn reproduction report\n",
        f"Evaluated models: {len(runs)}. Published numbers: `{published_dir}` (arXiv 2502.16860). For each "
        "model, the row `ours` with what it measured (`length`: RULER's length, LongBench's window; "
        "`samples/task`; `truncated`: prompts cut to fit the window), then the paper's row for the same "
        "method and training tokens and `ours - paper`. Where the paper has no such row (another model or "
        "token budget, as in the demo) the paper's row for the same method is shown as a labelled "
        "reference, without a difference: the numbers are not comparable, only indicative. RULER columns "
        "come from the longest length each run evaluated; the paper evaluated at 32,768 tokens, and a "
        "difference at another length says so.\n",
        "## What was evaluated\n\n" + "".join(f"- **{r.label}**: {r.measured}\n" for r in runs),
    ]
    unpublished = unpublished_methods(runs, published)
    if unpublished:
        sections.append(
            f"Not in the LongAttn paper: {', '.join(unpublished)}. No published numbers exist for these "
            "methods, so their rows stand beside the paper's methods without a paper row or a difference.\n"
        )
    written: dict[str, int] = {}
    for name, (caption, _) in TABLES.items():
        rows = table_rows(name, runs, published)
        if len(rows) == 1:
            continue
        atomic_write_text(out / f"{name}.csv", csv_text(rows))
        remarks = "".join(f"\n> {line}\n" for line in notes_for(name, rows, notes))
        sections.append(f"## {caption}\n\n{markdown(rows)}{remarks}")
        written[name] = len(rows) - 1
        ctx.tracker.log_table(f"report/{name}", rows[0], rows[1:])  # the W&B summary table
    plot_ruler_vs_tokens(out / "ruler_vs_tokens.png", runs, published)
    sections.append("## RULER-NIAH average vs training tokens\n\n![](ruler_vs_tokens.png)\n")
    if plot_score_distributions(out / "score_distributions.png", collected):
        sections.append("## Score distributions of the selected windows\n\n![](score_distributions.png)\n")
    heatmaps = []
    for i, (run_result, index) in enumerate(collected):
        source = Path(index["evaluate"]) / "niah_heatmap.png"
        if source.is_file():
            name = f"niah_{i:02d}.png"
            shutil.copyfile(source, out / name)
            heatmaps.append(f"### {run_result.label}\n\n![]({name})\n")
    if heatmaps:
        summary = markdown(niah_rows(runs))
        sections.append(
            "## Needle in a haystack\n\nRetrieval (%) per context length, averaged over the needle depths "
            f"(the paper shows this test as a heatmap only).\n\n{summary}\n" + "\n".join(heatmaps)
        )
    atomic_write_text(out / "report.md", "\n".join(sections))
    log.info("report: %d run(s), tables %s -> %s", len(runs), sorted(written), out / "report.md")
    return {"runs": [r.label for r in runs], "tables": written}


def stage_inputs(cfg: DictConfig) -> tuple[str, ...]:
    """One run: after its evaluate stage (and evaluate_base when the run has it). A sweep: reads the
    members' artifacts, needs nothing upstream."""
    if cfg.report.get("sweep_dir"):
        return ()
    return ("evaluate", "evaluate_base") if "evaluate_base" in cfg.stages else ("evaluate",)
