"""Paper-format tables: our runs beside the published numbers (experiments/published/*.csv) and the
difference, each "ours" row saying what it measured (evaluation length, samples per task, prompts
truncated). A run the paper has no row for (another model, another budget) is shown beside the paper's
rows for the same method as a labelled reference, without a difference. Pure functions over plain
dicts, so the report stage is a thin I/O wrapper."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"

# table -> (paper caption, value columns)
TABLES: dict[str, tuple[str, list[str]]] = {
    "table1": ("Table 1: RULER NIAH", ["S1", "S2", "S3", "MK1", "MK2", "MK3", "MV", "MQ", "Avg"]),
    "table11": (
        "Table 11: RULER by category",
        ["Retr", "VT", "CWE", "FWE", "Aggr", "QA1", "QA2", "QA", "Avg"],
    ),
    "table2": ("Table 2: LongBench categories", ["SDQA", "MDQA", "Summ", "FewShot", "Synth", "Code", "Avg"]),
    "table3": ("Table 3: short-context suites", ["MMLU", "HellaSwag", "HumanEval", "OBQA", "Avg"]),
    "table4": ("Table 4: ablations, RULER-NIAH average", ["Avg"]),
}
NA = "n/a"
PAPER_LENGTH = 32768  # the paper evaluates RULER and LongBench at 32K
# which suite each table comes from, and whether the paper's evaluation length applies to it
TABLE_SUITES = {
    "table1": "ruler",
    "table11": "ruler",
    "table4": "ruler",
    "table2": "longbench",
    "table3": "short",
}
PROTOCOL_COLUMNS = ["length", "samples/task", "truncated"]


@dataclass(frozen=True)
class RunResult:
    """One evaluated run: how the paper would name it, and its paper-column values per table."""

    label: str
    method: str
    tokens: str
    tables: dict[str, dict[str, float | None]]
    ruler_length: int | None = None
    protocol: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per table: `length` (evaluation length, None where none applies), `samples` (per task, 'n' or
    'min-max'), `truncated` (prompts cut to fit)."""
    measured: str = ""
    """One line saying what was evaluated and how (model, suites, lengths, shots)."""
    niah_grid: dict[str, float] = field(default_factory=dict)
    """NIAH retrieval per cell, '<length>@<depth>' -> 0..1 (results.json suites.niah.grid)."""


def tokens_label(budget_tokens: float | None) -> str:
    """5e9 -> '5B' (the paper's row keys); other budgets in full."""
    if not budget_tokens:
        return "0"
    if budget_tokens >= 1e9 and float(budget_tokens) % 1e9 == 0:
        return f"{int(budget_tokens // 1e9)}B"
    return f"{int(budget_tokens):,}"


# Models evaluated without our training, as the paper names them (Table 3's untrained base row).
BASE_MODELS = {"meta-llama/Meta-Llama-3-8B": "LLaMA-3-Base"}


def base_model_label(name_or_path: str) -> str:
    return BASE_MODELS.get(name_or_path, str(name_or_path))


# `selection.method` -> the row name: the paper's (Random, ProLong) and the rivals it has no rows for
METHOD_LABELS = {
    "random": "Random",
    "prolong": "ProLong",
    "ladm": "LADM",
    "longppl": "LongPPL",
    "longfilter": "LongFilter",
    "ppl_gain": "PPL gain",
    "compression": "Compression",
}


def method_label(selection: Mapping[str, Any]) -> str:
    """The paper's method names: Random, ProLong, LongAttn-8 / -70 (+ Table 4 ablation suffixes); the
    other scorers' names (METHOD_LABELS); or the selection's own `label` (experiment=released_data_32k:
    LongAttn-70, the authors' released selection)."""
    if selection.get("label"):
        return str(selection["label"])
    method = selection.get("method")
    if method in METHOD_LABELS:
        return METHOD_LABELS[method]
    if method == "longattn":
        scorer = str((selection.get("scorer_model") or {}).get("name_or_path", ""))
        size = "70" if "70B" in scorer else "8" if "8B" in scorer else None
        label = f"LongAttn-{size}" if size else f"LongAttn ({scorer})"
        if selection.get("alpha", 0.5) != 0.5:
            label += f" alpha={selection['alpha']:g}"
        if selection.get("use_uniformity") is False:
            label += " w/o DU_T"
        if (selection.get("scoring") or {}).get("causal") is True:
            label += " causal"  # the paper's text; the default is the authors' non-causal code
        return label
    return str(method)


def reference_method(method: str, tokens: str) -> str:
    """The paper's method a run is compared with when the paper has no row for the run itself: a base
    model with the paper's base row, LongAttn with another scorer with LongAttn-8 (the paper's smaller
    scorer), any other method with itself."""
    if tokens == "0":
        return BASE_MODELS["meta-llama/Meta-Llama-3-8B"]
    if method.startswith("LongAttn (") or method.startswith("LongAttn-8 "):
        return "LongAttn-8"
    return method


def paper_row(
    name: str, run: RunResult, published: Mapping[str, Mapping[tuple[str, str], Mapping[str, float]]]
) -> tuple[tuple[str, str] | None, bool]:
    """((tokens, method) of the published row to show, whether it is the run's own row) or (None, False).
    Without its own row, a run is shown beside its method's row at the smallest published budget (or,
    failing that, the row of the method it is compared with, `reference_method`)."""
    rows = published.get(name, {})
    if (run.tokens, run.method) in rows:
        return (run.tokens, run.method), True
    for method in (run.method, reference_method(run.method, run.tokens)):
        budgets = sorted((t for t, m in rows if m == method), key=_tokens_value)
        if budgets:
            return (budgets[0], method), False
    return None, False


def unpublished_methods(
    runs: Sequence[RunResult], published: Mapping[str, Mapping[tuple[str, str], Mapping[str, float]]]
) -> list[str]:
    """Methods of runs that no published table has a row for, not even as a reference (LADM, LongPPL,
    LongFilter, PPL gain, Compression: not in the LongAttn paper)."""
    return sorted(
        {run.method for run in runs if all(paper_row(name, run, published)[0] is None for name in TABLES)}
    )


def _tokens_value(tokens: str) -> float:
    return float(tokens.rstrip("B")) * 1e9 if tokens.endswith("B") else float(tokens.replace(",", ""))


def _samples_text(counts: Iterable[int]) -> str:
    counts = sorted(set(counts))
    if not counts:
        return NA
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"


def run_tables(evaluation: Mapping[str, Any]) -> tuple[dict[str, dict[str, float | None]], int | None]:
    """Our values per table from an evaluate results.json (RULER: the longest evaluated length)."""
    suites = evaluation.get("suites", {})
    tables: dict[str, dict[str, float | None]] = {}
    length = None
    ruler = suites.get("ruler") or {}
    if ruler:
        length = max(int(n) for n in ruler)
        tables["table1"] = dict(ruler[str(length)]["table1"])
        tables["table11"] = dict(ruler[str(length)]["table11"])
        tables["table4"] = {"Avg": tables["table1"].get("Avg")}
    if "longbench" in suites:
        tables["table2"] = dict(suites["longbench"]["table2"])
    if "short" in suites:
        tables["table3"] = dict(suites["short"]["table3"])
    return tables, length


def run_protocol(evaluation: Mapping[str, Any], ruler_length: int | None) -> dict[str, dict[str, Any]]:
    """Per table, what the run measured: length, samples per task, prompts truncated (results.json)."""
    protocols = evaluation.get("protocol", {})
    out: dict[str, dict[str, Any]] = {}
    for table, suite in TABLE_SUITES.items():
        if suite not in evaluation.get("suites", {}):
            continue
        protocol = protocols.get(suite, {})
        counts = dict(protocol.get("samples", {}))
        length: int | None = None
        if suite == "ruler":
            length = ruler_length
            counts = evaluation["suites"]["ruler"].get(str(ruler_length), {}).get("samples", counts)
        elif suite == "longbench":
            length = evaluation.get("max_length")
        elif suite == "short":  # MMLU's 57 subjects count as one task
            counts = {t: p["samples"] for t, p in evaluation["suites"]["short"].get("protocol", {}).items()}
        out[table] = {
            "length": length,
            "samples": _samples_text(counts.values()),
            "truncated": protocol.get("truncated_prompts"),
        }
    return out


def load_published(directory: Path = PUBLISHED_DIR) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
    """{table: {(tokens, method): {column: value}}} from the CSV files."""
    out: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
    for name in TABLES:
        rows: dict[tuple[str, str], dict[str, float]] = {}
        with open(directory / f"{name}.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                key = (row.pop("tokens"), row.pop("method"))
                rows[key] = {k: float(v) for k, v in row.items()}
        out[name] = rows
    return out


def _fmt(value: float | None) -> str:
    return NA if value is None else f"{value:.1f}"


def _protocol_cells(name: str, protocol: Mapping[str, Any] | None) -> list[str]:
    if protocol is None:
        return [NA] * len(PROTOCOL_COLUMNS)
    length, truncated = protocol.get("length"), protocol.get("truncated")
    return [
        "-" if length is None else f"{int(length):,}",
        str(protocol.get("samples", NA)),
        NA if truncated is None else f"{int(truncated):,}",
    ]


def _paper_cells(name: str) -> list[str]:
    return ["-" if name == "table3" else f"{PAPER_LENGTH:,}", "-", "-"]


def table_rows(
    name: str,
    runs: Sequence[RunResult],
    published: Mapping[str, Mapping[tuple[str, str], Mapping[str, float]]],
) -> list[list[str]]:
    """Header + for every run that has this table: its row (with what it measured), the published row
    (its own, or the same method's as a labelled reference; none if the paper has no such method), and
    ours - published for its own row."""
    columns = TABLES[name][1]
    rows = [["tokens", "method", "source", *PROTOCOL_COLUMNS, *columns]]
    for run in runs:
        ours = run.tables.get(name)
        if ours is None or (name == "table4" and not run.method.startswith("LongAttn")):
            continue  # Table 4 is LongAttn's ablation table
        key, own = paper_row(name, run, published)
        paper = published.get(name, {}).get(key) if key else None
        cells = _protocol_cells(name, run.protocol.get(name))
        rows.append([run.tokens, run.label, "ours", *cells, *(_fmt(ours.get(c)) for c in columns)])
        if paper is None:  # the paper has no row for this method in this table
            continue
        if not own:
            tokens, method = key
            rows.append(
                [tokens, method, "paper (reference, not this run's row)", *_paper_cells(name)]
                + [_fmt(paper.get(c)) for c in columns]
            )
            continue
        rows.append(
            [run.tokens, run.method, "paper", *_paper_cells(name), *(_fmt(paper.get(c)) for c in columns)]
        )
        length = (run.protocol.get(name) or {}).get("length")
        source = "ours - paper"
        if length is not None and name != "table3" and int(length) != PAPER_LENGTH:
            source += f" (at {int(length):,}, not {PAPER_LENGTH:,} tokens)"
        diffs = []
        for c in columns:
            a, b = ours.get(c), paper.get(c)
            diffs.append(NA if a is None or b is None else f"{a - b:+.1f}")
        rows.append([run.tokens, run.method, source, "", "", "", *diffs])
    return rows


def describe(evaluation: Mapping[str, Any]) -> str:
    """What an evaluation measured, in one line: model, window, and per suite its settings."""
    suites = evaluation.get("suites", {})
    protocols = evaluation.get("protocol", {})
    parts = [f"model `{evaluation.get('model')}`, window {evaluation.get('max_length', NA)} tokens"]
    if "niah" in suites:
        grid = suites["niah"].get("grid", {})
        lengths = sorted({int(k.split("@")[0]) for k in grid})
        parts.append(
            f"NIAH {len(grid)} cells at {', '.join(f'{n:,}' for n in lengths)} tokens, haystack "
            f"`{suites['niah'].get('haystack', 'repeat')}`"
        )
    if "ruler" in suites:
        lengths = ", ".join(f"{int(n):,}" for n in sorted(suites["ruler"], key=int))
        counts = [c for n in suites["ruler"].values() for c in n.get("samples", {}).values()]
        tasks = {t for n in suites["ruler"].values() for t in n.get("samples", {})}
        parts.append(
            f"RULER {len(tasks)} task(s) at {lengths} tokens, {_samples_text(counts)} sample(s) each"
        )
    if "longbench" in suites:
        counts = protocols.get("longbench", {}).get("samples", {})
        parts.append(f"LongBench {len(counts)} task(s), {_samples_text(counts.values())} sample(s) each")
    if "short" in suites:
        shots = [
            f"{task} {p['num_fewshot']}-shot {p['metric']} (n={p['samples']:,})"
            for task, p in suites["short"].get("protocol", {}).items()
        ]
        parts.append("short: " + ", ".join(shots))
    truncated = evaluation.get("truncated_prompts")
    parts.append(f"{truncated if truncated is not None else NA} prompt(s) truncated")
    return "; ".join(parts)


def niah_rows(runs: Sequence[RunResult]) -> list[list[str]]:
    """Header + per run with a NIAH grid: retrieval (percent) per length, averaged over depths, and overall."""
    lengths = sorted({int(k.split("@")[0]) for r in runs for k in r.niah_grid})
    rows = [["model", *(f"{n:,}" for n in lengths), "mean"]]
    for run in runs:
        if not run.niah_grid:
            continue
        by_length = {n: [v for k, v in run.niah_grid.items() if int(k.split("@")[0]) == n] for n in lengths}
        cells = [f"{100 * sum(v) / len(v):.0f}" if v else NA for v in by_length.values()]
        everything = list(run.niah_grid.values())
        rows.append([run.label, *cells, f"{100 * sum(everything) / len(everything):.0f}"])
    return rows


def load_notes(directory: Path = PUBLISHED_DIR) -> list[dict[str, str]]:
    """Remarks on published numbers (notes.csv: table, tokens, method, column, note)."""
    path = directory / "notes.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def notes_for(name: str, rows: Sequence[Sequence[str]], notes: Sequence[Mapping[str, str]]) -> list[str]:
    """The notes on published rows that a table shows."""
    shown = {(r[0], r[1]) for r in rows[1:] if r[2].startswith("paper")}
    return [
        f"Published {n['tokens']} {n['method']}, {n['column']}: {n['note']}"
        for n in notes
        if n["table"] == name and (n["tokens"], n["method"]) in shown
    ]


def markdown(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
