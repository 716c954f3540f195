"""RULER (Tables 1 and 11) through lm-eval's own 13 task YAMLs and sample generators, re-pointed to our
lengths and tokenizer, with local data where lm-eval would download it:

- the essay-haystack NIAH tasks read the Paul Graham essays from the Hub dataset lm-eval uses (offline:
  from the datasets cache) or `evaluation.ruler.haystack_path` (a text file or a directory of .txt files);
- QA1 / QA2 read SQuAD v2 dev / HotpotQA dev-distractor JSON, which lm-eval downloads with `requests` on
  every run, from `evaluation.ruler.qa_data_dir` when set (the same files, parsed by lm-eval's readers).

lm-eval appends each sample's `gen_prefix` ("... mentioned in the provided text is", "Answer:") to the
prompt after RULER's generator sized it without that prefix, so a 32K sample would overflow a 32K window
and be truncated. Each length is therefore checked with the model's tokenizer and, if any prompt +
prefix + generation budget overflows, generated again that many tokens shorter (keeping its length label).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.model_sources import default_cache_dir
from evaluation import columns, punkt_data
from evaluation.niah import ESSAYS_DATASET
from evaluation.tasks import (
    SUITES,
    EvaluationDataError,
    Suite,
    SuiteContext,
    builtin_task,
    hub_dataset_cached,
    offline,
    wanted_tasks,
)

RULER_FILES = {
    **{t: f"{t}.yaml" for t in columns.RULER_NIAH.values()},
    "ruler_vt": "vt.yaml",
    "ruler_cwe": "cwe.yaml",
    "ruler_fwe": "fwe.yaml",
    "ruler_qa_squad": "qa_squad.yaml",
    "ruler_qa_hotpot": "qa_hotpot.yaml",
}
# lm-eval's niah_utils settings for the tasks that use the essay haystack (RULER's own parameters).
ESSAY_NEEDLES = {
    "niah_single_2": {"type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_single_3": {"type_needle_k": "words", "type_needle_v": "uuids"},
    "niah_multikey_1": {"type_needle_k": "words", "type_needle_v": "numbers", "num_needle_k": 4},
    "niah_multivalue": {"type_needle_k": "words", "type_needle_v": "numbers", "num_needle_v": 4},
    "niah_multiquery": {"type_needle_k": "words", "type_needle_v": "numbers", "num_needle_q": 4},
}
# QA task -> (lm-eval's reader in qa_utils, the file name it downloads: SQuAD v2.0 dev, HotpotQA dev distractor)
QA_FILES = {
    "ruler_qa_squad": ("read_squad", "dev-v2.0.json"),
    "ruler_qa_hotpot": ("read_hotpotqa", "hotpot_dev_distractor_v1.json"),
}
SYNTHETIC = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe"]
QA_SAMPLES = 500  # lm-eval's qa_utils.get_dataset
QA_TOKENS_TO_GENERATE = 32


def essay_words(haystack_path: str) -> list[str]:
    """A local essay haystack as RULER splits it (whitespace-separated words): a file, or a directory of
    .txt files in name order."""
    where = Path(haystack_path).expanduser()
    files = sorted(where.glob("*.txt")) if where.is_dir() else [where]
    text = " ".join(f.read_text(encoding="utf-8") for f in files)
    return re.sub(r"\s+", " ", text).split(" ")


def essay_dataset_from_path(task: str, haystack_path: str, **kwargs: Any) -> dict[str, Any]:
    """lm-eval's RULER generator with its template and this task's needle settings, over a local text
    instead of the Hub's Paul Graham essays (it needs at least as many words as the length has tokens)."""
    from lm_eval.tasks.ruler import niah_utils
    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name
    from lm_eval.tasks.ruler.prepare_niah import generate_samples

    lengths = kwargs.pop("max_seq_lengths", DEFAULT_SEQ_LENGTHS)
    tokenizer = get_tokenizer(resolve_tokenizer_name(kwargs))
    words = essay_words(haystack_path)
    return niah_utils.download_dataset(
        generate_samples(
            words,
            max_seq_length=length,
            template=niah_utils.TEMPLATE,
            type_haystack="essay",
            num_samples=500,
            TOKENIZER=tokenizer,
            **ESSAY_NEEDLES[task],
        )
        for length in lengths
    )


def read_local_qa(task: str, path: Path) -> tuple[list[dict], list[str]]:
    """(questions, documents) from a local SQuAD / HotpotQA file, parsed by lm-eval's own reader: its
    only download call is swapped for reading the file while the reader runs."""
    from lm_eval.tasks.ruler import qa_utils

    reader, _ = QA_FILES[task]
    data = json.loads(path.read_text(encoding="utf-8"))
    download = qa_utils.download_json
    qa_utils.download_json = lambda url: data
    try:
        return getattr(qa_utils, reader).__wrapped__()  # uncached: the file, not an earlier download
    finally:
        qa_utils.download_json = download


def qa_dataset_from_file(task: str, path: str, samples: int | None, **kwargs: Any) -> dict[str, Any]:
    """lm-eval's RULER QA generator (template, document packing, 32 tokens to generate) over a local file."""
    import datasets
    from lm_eval.tasks.ruler import qa_utils
    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name

    lengths = kwargs.pop("max_seq_lengths", DEFAULT_SEQ_LENGTHS)
    tokenizer = get_tokenizer(resolve_tokenizer_name(kwargs))
    qas, docs = read_local_qa(task, Path(path))
    n = min(samples or QA_SAMPLES, QA_SAMPLES, len(qas))
    rows = [
        row
        for length in lengths
        for row in qa_utils.generate_samples(
            tokenizer,
            docs,
            qas,
            max_seq_length=length,
            num_samples=n,
            tokens_to_generate=QA_TOKENS_TO_GENERATE,
        )
    ]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def prompt_tokens(tokenizer: Any, row: Mapping[str, Any]) -> int:
    """Tokens of the prompt lm-eval sends for a RULER sample: input, delimiter, gen_prefix (no chat template)."""
    from lm_eval.api.utils import requires_delimiter

    text, prefix = row["input"], row.get("gen_prefix") or ""
    if prefix:
        text += (" " if requires_delimiter(text, prefix) else "") + prefix
    return len(tokenizer(text)["input_ids"])


def sized_dataset(
    make: Callable[..., dict], samples: int | None, max_gen_toks: int, **kwargs: Any
) -> dict[str, Any]:
    """RULER's generator per length, keeping the first `samples` of each (lm-eval's `limit` would take the
    first rows overall, i.e. all from the first length), with prompt + gen_prefix + max_gen_toks within
    the length: an overflowing length is generated again shorter by the overflow, and relabelled."""
    import datasets
    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name

    lengths = [int(n) for n in kwargs.pop("max_seq_lengths", DEFAULT_SEQ_LENGTHS)]
    tokenizer = get_tokenizer(resolve_tokenizer_name(kwargs))
    parts = []
    for length in lengths:
        target = length
        for _ in range(4):
            test = make(max_seq_lengths=[target], **kwargs)["test"]
            if samples is not None:
                test = test.select(range(min(samples, len(test))))
            overflow = max(prompt_tokens(tokenizer, row) for row in test) + max_gen_toks - length
            if overflow <= 0:
                break
            target -= overflow
        else:
            raise RuntimeError(
                f"RULER samples at {length} still overflow by {overflow} tokens after resizing"
            )
        parts.append(test.map(lambda row, n=length: {"max_length": n}))  # the metric's length key
    return {"test": datasets.concatenate_datasets(parts)}


def _check_data(ctx: SuiteContext, wanted: list[str]) -> tuple[str | None, Path | None]:
    """The local haystack and QA directory, after checking that every wanted task can get its data."""
    haystack, qa_dir = ctx.conf.get("haystack_path"), ctx.conf.get("qa_data_dir")
    if haystack and not Path(haystack).expanduser().exists():
        raise EvaluationDataError(f"evaluation.ruler.haystack_path={haystack}: no such file or directory")
    if qa_dir:
        qa_dir = Path(qa_dir).expanduser()
        for task in set(wanted) & set(QA_FILES):
            if not (qa_dir / QA_FILES[task][1]).is_file():
                raise EvaluationDataError(
                    f"evaluation.ruler.qa_data_dir={qa_dir}: no {QA_FILES[task][1]} for {task} (the file "
                    "lm-eval's RULER downloads: SQuAD v2.0 dev-v2.0.json, HotpotQA hotpot_dev_distractor_v1.json)"
                )
    if not offline():
        return haystack, qa_dir
    blocked = [t for t in wanted if t in QA_FILES and not qa_dir]
    if not haystack and set(wanted) & set(ESSAY_NEEDLES) and not hub_dataset_cached(ESSAYS_DATASET):
        blocked += [t for t in wanted if t in ESSAY_NEEDLES]
    if blocked:
        raise EvaluationDataError(
            f"evaluation suite 'ruler': tasks {blocked} need data that is not available offline: the essay "
            f"tasks read the Hub dataset {ESSAYS_DATASET} (not in the datasets cache) unless "
            "evaluation.ruler.haystack_path is set; QA1/QA2 download SQuAD / HotpotQA unless "
            f"evaluation.ruler.qa_data_dir is set. Set those keys, run online once, or set "
            f"evaluation.ruler.tasks to the synthetic ones ({SYNTHETIC})."
        )
    return haystack, qa_dir


def ruler_tasks(ctx: SuiteContext) -> list[dict[str, Any]]:
    wanted = wanted_tasks(ctx, "ruler", columns.RULER_TASKS)
    haystack, qa_dir = _check_data(ctx, wanted)
    # every RULER task imports lm-eval's prepare_niah, which downloads punkt_tab unless NLTK finds it
    punkt_data.ensure_punkt_tab(ctx.cache_dir or default_cache_dir())
    lengths = [int(n) for n in ctx.conf["lengths"]]
    samples = ctx.conf.get("samples")
    configs = []
    for task in wanted:
        config = builtin_task(f"ruler/{RULER_FILES[task]}")
        config["metadata"] = {
            **config.get("metadata", {}),
            "max_seq_lengths": lengths,
            "tokenizer": ctx.model_path,
        }
        make = config["custom_dataset"]
        if task in ESSAY_NEEDLES and haystack:
            make = functools.partial(essay_dataset_from_path, task, haystack)
        if task in QA_FILES and qa_dir:
            make = functools.partial(qa_dataset_from_file, task, str(qa_dir / QA_FILES[task][1]), samples)
        max_gen_toks = int(config["generation_kwargs"]["max_gen_toks"])
        config["custom_dataset"] = functools.partial(sized_dataset, make, samples, max_gen_toks)
        config["metric_list"] = [m for m in config["metric_list"] if int(m["metric"]) in lengths] or [
            {
                "metric": str(n),
                "aggregation": config["metric_list"][0]["aggregation"],
                "higher_is_better": True,
            }
            for n in lengths
        ]
        configs.append(config)
    return configs


def ruler_summary(
    ctx: SuiteContext, results: Mapping[str, Any], samples: Mapping[str, list], configs: Mapping[str, Any]
) -> dict[str, Any]:
    out = {}
    for length in ctx.conf["lengths"]:
        scores = columns.ruler_task_scores(results, int(length))
        counts = {
            task: sum(int(row["doc"]["max_length"]) == int(length) for row in rows)
            for task, rows in samples.items()
        }
        out[str(length)] = {"tasks": scores, **columns.ruler_columns(scores), "samples": counts}
    return out


SUITES.register("ruler")(
    Suite(
        ruler_tasks,
        ruler_summary,
        limit=lambda ctx: None,
        lengths=lambda conf: [int(n) for n in conf.get("lengths") or []],
        length_key="evaluation.ruler.lengths",
    )
)
