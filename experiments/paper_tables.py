"""Paper-format tables: our runs beside the published numbers (experiments/published/*.csv) and the
difference. Pure functions over plain dicts, so the report stage is a thin I/O wrapper."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RunResult:
    """One evaluated run: how the paper would name it, and its paper-column values per table."""

    label: str
    method: str
    tokens: str
    tables: dict[str, dict[str, float | None]]
    ruler_length: int | None = None


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


def method_label(selection: Mapping[str, Any]) -> str:
    """The paper's method names: Random, ProLong, LongAttn-8 / -70 (+ Table 4 ablation suffixes), or the
    selection's own `label` (experiment=released_data_32k: LongAttn-70, the authors' released selection)."""
    if selection.get("label"):
        return str(selection["label"])
    method = selection.get("method")
    if method == "random":
        return "Random"
    if method == "prolong":
        return "ProLong"
    if method == "ladm":
        return "LADM"
    if method == "longattn":
        scorer = str((selection.get("scorer_model") or {}).get("name_or_path", ""))
        size = "70" if "70B" in scorer else "8" if "8B" in scorer else None
        label = f"LongAttn-{size}" if size else f"LongAttn ({scorer})"
        if selection.get("alpha", 0.5) != 0.5:
            label += f" alpha={selection['alpha']:g}"
        if selection.get("use_uniformity") is False:
            label += " w/o DU_T"
        return label
    return str(method)


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


def table_rows(
    name: str,
    runs: Sequence[RunResult],
    published: Mapping[str, Mapping[tuple[str, str], Mapping[str, float]]],
) -> list[list[str]]:
    """Header + for every run that has this table: its row, the published row, and ours - published."""
    columns = TABLES[name][1]
    rows = [["tokens", "method", "source", *columns]]
    for run in runs:
        ours = run.tables.get(name)
        if ours is None or (name == "table4" and not run.method.startswith("LongAttn")):
            continue  # Table 4 is LongAttn's ablation table
        paper = published.get(name, {}).get((run.tokens, run.method))
        rows.append([run.tokens, run.label, "ours", *(_fmt(ours.get(c)) for c in columns)])
        rows.append(
            [run.tokens, run.method, "paper", *(_fmt(paper.get(c)) if paper else NA for c in columns)]
        )
        diffs = []
        for c in columns:
            a, b = ours.get(c), (paper or {}).get(c)
            diffs.append(NA if a is None or b is None else f"{a - b:+.1f}")
        rows.append([run.tokens, run.method, "ours - paper", *diffs])
    return rows


def markdown(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
