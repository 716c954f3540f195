"""The evaluate stage: run the configured suites through lm-eval on one model and write
`results.json` ({suite: {task: score}} plus paper-column summaries), suite plots, the task configs
used, and lm-eval's own files (EvaluationTracker: aggregated results with the lm-eval version, config
and task hashes, and every sample per task) under `lm_eval/<suite>/`.

The model is `evaluation.model` (HF directory, Hub id or embedded name) or, when that is null, the
train stage's `model/` directory. The `evaluate_base` stage runs the same evaluation on the model training
started from (`model.name_or_path`): the paper's untrained-base row, and the demo's "before".
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from common.atomic import atomic_write_json
from common.distributed import rank_info
from common.errors import ConfigError
from common.model_sources import load_tokenizer, resolve_model_path
from common.stage import Progress, StageContext
from evaluation import parallel
from evaluation.backend import BackendConfig, load_lm
from evaluation.suites import SUITES, SuiteContext, task_manager

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
LM_EVAL_DIR = "lm_eval"
SUITE_RECORDS_DIR = "suites"  # one JSON per finished suite: what a resumed run reuses
REQUEST_CACHE_DIR = "request_cache"  # lm-eval's per-request SQLite caches, removed once all suites finish


def _sample_files(folder: Path, task: str, within: str = "") -> list[Path]:
    """lm-eval names them samples_<task>_<ISO time>.jsonl; the time pattern keeps `hotpotqa` from also
    matching LongBench's `hotpotqa_e`."""
    name = re.compile(rf"samples_{re.escape(task)}_\d{{4}}-\d\d-\d\dT[\d.-]+\.jsonl")
    return sorted(p for p in folder.glob(f"{within}samples_{task}_*.jsonl") if name.fullmatch(p.name))


def sample_rows(out_dir: Path, task: str) -> list[dict[str, Any]]:
    """The per-sample records lm-eval's EvaluationTracker wrote for `task` in an evaluate artifact."""
    paths = _sample_files(Path(out_dir) / LM_EVAL_DIR, task, "*/*/")
    if len(paths) != 1:
        raise FileNotFoundError(f"{out_dir}/{LM_EVAL_DIR}: {len(paths)} sample files for task {task!r}")
    return [json.loads(line) for line in paths[0].read_text(encoding="utf-8").splitlines()]


def _save_lm_eval_files(tracker: Any, out: dict[str, Any], samples: dict[str, list]) -> None:
    """lm-eval's own result and sample files; its tracker only logs a warning when a write fails, so
    the files are checked here (a silent gap would be found only when someone looks for them)."""
    tracker.save_results_aggregated(results=out, samples=samples)
    for task, rows in samples.items():
        tracker.save_results_samples(task_name=task, samples=rows)
    folder = Path(tracker.output_path) / tracker.general_config_tracker.model_name_sanitized
    missing = [f"samples_{t}" for t in samples if not _sample_files(folder, t)]
    if not list(folder.glob("results_*.json")) or missing:
        raise OSError(f"lm-eval's EvaluationTracker did not write {missing or 'results'} under {folder}")


def model_under_test(cfg: DictConfig, ctx: StageContext) -> str:
    if cfg.evaluation.get("model"):
        return str(cfg.evaluation.model)
    if "train" not in ctx.inputs:
        raise ConfigError(
            "evaluation.model is null and no train artifact was given: set evaluation.model=<dir or id>"
        )
    return str(ctx.inputs["train"].path / "model")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "__name__", repr(o))))


def check_lengths(conf: dict[str, Any]) -> None:
    """Every length a suite builds must fit the model's window, or its prompts would be cut in the middle
    (a needle at ~50 % depth lost) without anyone asking for it."""
    max_length = int(conf["max_length"])
    for name in conf["suites"]:
        suite = SUITES.get(name)  # unknown names fail before the model loads
        if too_long := [n for n in suite.lengths(conf.get(name) or {}) if n > max_length]:
            raise ConfigError(
                f"{suite.length_key}={too_long} exceeds evaluation.max_length={max_length} (prompt + generation): "
                f"lower {suite.length_key} or raise evaluation.max_length to at least {max(too_long)}"
            )


def check_processes(conf: dict[str, Any], world_size: int) -> None:
    """`evaluation.num_gpus` is a process count; vLLM runs in one process (its own data and tensor
    parallelism start their workers), so it is refused under a multi-process launch."""
    num_gpus = conf.get("num_gpus", 1)
    if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
        raise ConfigError(f"evaluation.num_gpus={num_gpus}: an integer >= 1")
    backend = BackendConfig.from_conf(conf)
    if backend.backend == "vllm" and max(world_size, num_gpus) > 1:
        raise ConfigError(
            f"evaluation.backend=vllm runs in one process (this job: {max(world_size, num_gpus)}): spread it "
            "over GPUs with evaluation.data_parallel_size / tensor_parallel_size, and run the evaluate stage "
            "in its own single-process command (stages=[evaluate], evaluation.num_gpus=1, no torchrun), or "
            "use evaluation.backend=hf, which runs one model per rank"
        )


def check_config(cfg: DictConfig) -> None:
    """Fail on an unknown suite, a length over `evaluation.max_length`, a bad batch size or process
    count before any stage runs."""
    conf = OmegaConf.to_container(cfg.evaluation, resolve=True)
    check_lengths(conf)
    check_processes(conf, rank_info().world_size)


def check_generation_budgets(tasks: dict[str, list[dict[str, Any]]], max_length: int) -> None:
    """A task whose generation budget fills the window leaves no room for its prompt (lm-eval would stop
    with an assertion after the model has loaded)."""
    for suite, configs in tasks.items():
        for config in configs:
            budget = int((config.get("generation_kwargs") or {}).get("max_gen_toks", 0))
            if budget >= max_length:
                raise ConfigError(
                    f"evaluation.max_length={max_length}: task {config.get('task')} ({suite}) generates up to "
                    f"{budget} tokens, leaving no room for its prompt; raise evaluation.max_length"
                )


def protocol(record: dict[str, Any]) -> dict[str, Any]:
    """What a suite measured, for the report: samples per task, shots per task, prompts truncated, and
    per rank the prompts generated and truncated (a record from before ranks were kept has none)."""
    return {
        "samples": record.get("samples", {}),
        "num_fewshot": record.get("num_fewshot", {}),
        "truncated_prompts": record["truncated_prompts"],
        "ranks": record.get("ranks"),
    }


def _suite_contexts(conf: dict[str, Any], model: str, ctx: StageContext) -> dict[str, SuiteContext]:
    model_path = resolve_model_path(model, ctx.cache_dir)
    tokenizer = load_tokenizer(model, ctx.cache_dir)
    return {
        name: SuiteContext(
            conf.get(name) or {},
            tokenizer,
            model_path,
            ctx.out_dir,
            int(conf.get("seed", 1234)),
            Path(ctx.cache_dir),
        )
        for name in conf["suites"]
    }


def _load(model: str, ctx: StageContext, conf: dict[str, Any]) -> Any:
    return load_lm(model, ctx.cache_dir, BackendConfig.from_conf(conf))


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any] | None:
    """Every rank runs it (the HF backend under a multi-process launch: lm-eval shards each suite's
    requests over the ranks and gathers them on rank 0); rank 0 writes the records and results and
    returns the manifest, the other ranks return None."""
    conf = OmegaConf.to_container(cfg.evaluation, resolve=True)
    suites = list(conf["suites"])
    check_lengths(conf)
    model = model_under_test(cfg, ctx)
    contexts = _suite_contexts(conf, model, ctx)
    tasks = {name: SUITES.get(name).tasks(contexts[name]) for name in suites}  # data checks before loading
    check_generation_budgets(tasks, int(conf["max_length"]))
    main = rank_info().is_main
    records: dict[str, dict[str, Any]] = {}
    lm = None
    for name in suites:
        # the same answer on every rank: a record is written only after every rank has finished the suite
        record_path = ctx.out_dir / SUITE_RECORDS_DIR / f"{name}.json"
        if record_path.is_file():  # finished before an interruption
            log.info("evaluate: suite %s already complete (%s); reused", name, record_path)
            records[name] = json.loads(record_path.read_text(encoding="utf-8"))
            continue
        if lm is None:
            lm = _load(model, ctx, conf)
        record = _run_suite(name, tasks[name], contexts[name], lm, model, ctx.out_dir, conf)
        if record is not None:  # rank 0: the suite over every rank's prompts
            atomic_write_json(record_path, record)
            records[name] = record
    if not main:
        return None
    return _write_results(ctx, model, conf, records)


def _write_results(
    ctx: StageContext, model: str, conf: dict[str, Any], records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    import lm_eval

    summary: dict[str, Any] = {
        "model": model,
        "lm_eval_version": lm_eval.__version__,
        "max_length": int(conf["max_length"]),
        "suites": {name: record["summary"] for name, record in records.items()},
        "protocol": {name: protocol(record) for name, record in records.items()},
    }
    scores = {name: record["scores"] for name, record in records.items()}
    truncated = sum(record["truncated_prompts"] for record in records.values())
    for name in records:
        ctx.tracker.log_metrics({f"evaluate/{name}/{k}": v for k, v in scores[name].items()})
    atomic_write_json(ctx.out_dir / "task_configs.json", {n: r["configs"] for n, r in records.items()})
    atomic_write_json(
        ctx.out_dir / RESULTS_FILE, {"scores": scores, **summary, "truncated_prompts": truncated}
    )
    shutil.rmtree(ctx.out_dir / REQUEST_CACHE_DIR, ignore_errors=True)  # every suite has its record now
    return {**summary, "scores": scores, "truncated_prompts": truncated, "world_size": rank_info().world_size}


def _run_suite(
    name: str,
    tasks: list[dict[str, Any]],
    suite_ctx: SuiteContext,
    lm: Any,
    model: str,
    out_dir: Path,
    conf: dict[str, Any],
) -> dict[str, Any] | None:
    """One suite through lm-eval, on every rank; the suite's record on rank 0, None on the others. Every
    response goes to the rank's SQLite request cache as it is generated (lm-eval's CachingLM,
    `request_cache/<suite>_rank<r>.db`), so a run interrupted mid-suite replays what each rank had and
    generates only the rest; the caller writes the record once the suite is complete."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    main = rank_info().is_main
    log.info("evaluate: suite %s (%d task(s)) on %s", name, len(tasks), model)
    tracker = None
    if main:
        shutil.rmtree(out_dir / LM_EVAL_DIR / name, ignore_errors=True)  # files of an interrupted attempt
        tracker = EvaluationTracker(output_path=str(out_dir / LM_EVAL_DIR / name))
    before = parallel.counters(lm)
    out = simple_evaluate(
        model=lm,
        model_args={"pretrained": model},  # names lm-eval's output folder; the model is `lm`
        evaluation_tracker=tracker,
        use_cache=str(out_dir / REQUEST_CACHE_DIR / name),
        tasks=tasks,
        limit=SUITES.get(name).limit(suite_ctx),
        num_fewshot=None,  # each task's own (short: evaluation.short.tasks.<task>.num_fewshot)
        log_samples=True,
        task_manager=task_manager(),
        confirm_run_unsafe_code=bool(suite_ctx.conf.get("allow_code_eval", False)),
        random_seed=int(conf.get("seed", 1234)),
    )
    parallel.close_request_cache(lm)
    ranks = parallel.gather_counts(lm, before)  # every rank, after its cache is closed
    if out is None:  # not rank 0: lm-eval gathered this rank's samples there
        return None
    record = _suite_record(name, suite_ctx, out, ranks)
    _save_lm_eval_files(tracker, out, out.pop("samples"))  # last: lm-eval rewrites the samples as it saves
    return record


def _suite_record(
    name: str, suite_ctx: SuiteContext, out: dict[str, Any], ranks: dict[str, Any]
) -> dict[str, Any]:
    """What results.json keeps of a suite: scores, the suite's summary, the task configs, and its protocol
    (samples, shots, and, per rank, the prompts generated and truncated in the attempt that finished it;
    replayed responses are neither re-generated nor re-cut)."""
    results = out["results"]
    configs = out.get("configs", {})
    samples = out["samples"] = parallel.drop_padding_copies(out.get("samples", {}), configs)
    return {
        "scores": {
            f"{task}/{key.split(',')[0]}": float(value)
            for task, metrics in results.items()
            for key, value in metrics.items()
            if isinstance(value, (int, float))
            and "stderr" not in key
            and key != "sample_len"
            and not (key.split(",")[0].isdigit() and value == -1)  # RULER: -1 = no samples at that length
        },
        "summary": SUITES.get(name).summarize(suite_ctx, results, samples, configs),
        "configs": _jsonable(configs),
        "samples": {task: len(rows) for task, rows in samples.items()},
        "num_fewshot": {task: int(n) for task, n in (out.get("n-shot") or {}).items() if task in samples},
        "truncated_prompts": sum(ranks["truncated_prompts"]),
        "ranks": ranks,
    }


def fingerprint_extras(cfg: DictConfig) -> list[list[Any]]:
    """A local `evaluation.model` directory is identified by its files' names, sizes and mtimes too, so
    re-training into the same directory re-evaluates (a Hub id or embedded name is its own identity)."""
    model = cfg.evaluation.get("model")
    if not model or not Path(str(model)).expanduser().is_dir():
        return []
    files = sorted(p for p in Path(str(model)).expanduser().iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime] for p in files]


def base_model(cfg: DictConfig) -> str:
    """The model training starts from, evaluated as it is by `evaluate_base`."""
    name = cfg.model.get("name_or_path") if cfg.get("model") else None
    if not name:
        raise ConfigError("stage evaluate_base evaluates model.name_or_path, which is not set")
    return str(name)


def run_base(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    """The evaluate stage on the untrained base model, with the same evaluation settings."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.evaluation.model = base_model(cfg)
    return run(cfg, ctx)


def stage_inputs(cfg: DictConfig) -> tuple[str, ...]:
    """Evaluate reads the train artifact only when it evaluates the trained model."""
    return () if cfg.evaluation.get("model") else ("train",)


def progress(cfg: DictConfig, out_dir: Path, inputs: dict[str, Path]) -> Progress:
    """Suites with a finished record (a killed evaluation resumes after them) of the configured suites."""
    suites = list(cfg.evaluation.suites)
    done = [name for name in suites if (out_dir / SUITE_RECORDS_DIR / f"{name}.json").is_file()]
    return Progress(len(done), len(suites), "suites", "done", ", ".join(suites))
