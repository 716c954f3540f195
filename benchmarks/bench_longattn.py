"""LongAttn scoring speed and memory: reference vs blocked (CPU) and the authors' whole-model path.

Each case runs in a fresh subprocess so its peak memory is its own: working memory = peak RSS while
scoring minus RSS just before (weights and the token window excluded), sampled every 2 ms in a separate,
untimed run (the sampling thread would otherwise contend for the GIL and slow the timed loop).

    python benchmarks/bench_longattn.py                       # defaults of the issue: 2048/4096 both,
                                                              # 8192-32768 blocked only, SmolLM2 layer 0
    python benchmarks/bench_longattn.py --compare 8192 --blocked-only 65536 --repeats 3
    python benchmarks/bench_longattn.py --metric-only --compare 4096 8192 --blocked-only --causal both
    # GPU, statistics only, Llama-3.1-8B / 70B layer-0 shapes (random q/k of those shapes):
    python benchmarks/bench_longattn.py --shape 8b --device cuda --dtype bfloat16 --compare 32768 \
        --impls triton,blocked,reference
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

RSS_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * RSS_PAGE


class PeakSampler:
    def __init__(self) -> None:
        self.peak, self._stop = current_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def window_ids(length: int, model_dir: str):
    """A real text window: standard-library source tokenized by the model's tokenizer, repeated to length."""
    import torch
    from transformers import AutoTokenizer

    from common.corpus import CorpusStats, SourceSpec, iter_documents

    tok = AutoTokenizer.from_pretrained(model_dir)
    spec = SourceSpec(domain="code", format="python_code", options={"packages": ["asyncio", "email"]})
    text = "\n".join(d["text"] for d in iter_documents([spec], "error", CorpusStats()))
    ids = tok(text, add_special_tokens=False).input_ids
    ids = (ids * (length // len(ids) + 1))[:length]
    return torch.tensor(ids)


def run_case(
    impl: str, length: int, model: str, repeats: int, metric_only: bool = False, causal: bool = True
) -> dict:
    import torch

    from common.model_sources import default_cache_dir, resolve_model_path
    from selection.scorers.attention_stats import default_min_distance, head_stats

    model_dir = resolve_model_path(model, default_cache_dir())
    ids = window_ids(length, model_dir)
    if impl == "authors_path":
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_pretrained(
            model_dir, num_hidden_layers=1, attn_implementation="eager"
        )

        def score():
            with torch.no_grad():
                attn = net(ids[None], output_attentions=True).attentions[0][0]
            rows, cols = torch.arange(length)[:, None], torch.arange(length)[None]
            masked = attn * (rows - cols >= default_min_distance(length))
            return masked.sum() / length, masked.reshape(attn.shape[0], -1).var(-1)
    else:
        from selection.scorers.first_layer import FirstLayerQK

        qk = FirstLayerQK.from_pretrained(model_dir)
        q_pre, k_pre = qk(ids) if metric_only else (None, None)

        def score():
            q, k = (q_pre, k_pre) if metric_only else qk(ids)
            return head_stats(q, k, None, impl, causal=causal)

    score()  # warm-up (allocator, lazy init)
    best = float("inf")
    for _ in range(repeats):  # timed alone: a sampling thread would contend for the GIL
        start = time.perf_counter()
        score()
        best = min(best, time.perf_counter() - start)
    before = current_rss()
    with PeakSampler() as sampler:  # one more run, for memory only
        score()
    return {
        "impl": impl,
        "length": length,
        "causal": causal,
        "seconds": best,
        "tokens_per_s": length / best,
        "working_mb": (sampler.peak - before) / 2**20,
    }


SHAPES = {"8b": (32, 8, 128), "70b": (64, 8, 128), "smollm2": (9, 3, 64)}  # (heads, kv heads, head dim)


def run_shaped_case(
    impl: str, length: int, shape: str, device: str, dtype: str, repeats: int, causal: bool = True
) -> dict:
    """Statistics alone on random q/k of a model's layer-0 shape, timed with device synchronisation."""
    import torch

    from selection.scorers.attention_stats import head_stats

    heads, kv_heads, dim = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(heads, length, dim, device=device, generator=gen).mul_(2).to(getattr(torch, dtype))
    k = torch.randn(kv_heads, length, dim, device=device, generator=gen).mul_(2).to(getattr(torch, dtype))
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    head_stats(q, k, None, impl, causal=causal)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        head_stats(q, k, None, impl, causal=causal)
        sync()
        best = min(best, time.perf_counter() - start)
    working = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return {
        "impl": impl,
        "length": length,
        "causal": causal,
        "seconds": best,
        "tokens_per_s": length / best,
        "working_mb": working,
    }


def attention_name(causal: bool) -> str:
    return "causal" if causal else "non-causal"


def cases_to_run(args, modes: tuple[bool, ...]) -> list[tuple[str, int, bool]]:
    """(impl, length, causal) in run order; the authors' path (an eager forward: causal maps) only causal."""
    impls = ("reference", "blocked") if args.metric_only else ("reference", "blocked", "authors_path")
    cases = [(impl, n, c) for n in args.compare for impl in impls for c in modes]
    cases = [(impl, n, c) for impl, n, c in cases if c or impl != "authors_path"]
    return cases + [("blocked", n, c) for n in args.blocked_only for c in modes]


def child(args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        args.impl_case,
        str(args.length_case),
        "--model",
        args.model,
        "--repeats",
        str(args.repeats),
        "--causal",
        str(args.causal_case).lower(),
        *(["--metric-only"] if args.metric_only else []),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--compare",
        type=int,
        nargs="*",
        default=[2048, 4096, 8192],
        help="lengths run with reference, blocked and the authors' path",
    )
    parser.add_argument("--blocked-only", type=int, nargs="*", default=[16384, 32768])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--metric-only",
        action="store_true",
        help="time the statistics alone (q/k precomputed); skips the authors' path",
    )
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="random q/k of this layer-0 shape (statistics only)"
    )
    parser.add_argument("--device", default="cpu", help="with --shape: cpu | cuda")
    parser.add_argument("--dtype", default="float32", help="with --shape: float32 | bfloat16 | float16")
    parser.add_argument("--impls", default="reference,blocked", help="with --shape: implementations to time")
    parser.add_argument(
        "--causal",
        choices=["true", "false", "both"],
        default="both",
        help="attention of the statistics: causal (paper text), non-causal (authors' code) or both; the "
        "authors' path (an eager HF forward, causal) runs only with causal",
    )
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "LENGTH"), help=argparse.SUPPRESS)
    return parser.parse_args()


def shaped_table(args, modes: tuple[bool, ...]) -> None:
    print(
        f"| L | impl | attention | s/window | tokens/s | working MB (device) |  shape {args.shape} "
        f"{SHAPES[args.shape]}, {args.dtype} on {args.device} |"
    )
    print("|---|---|---|---|---|---|")
    for n in args.compare:
        for impl in args.impls.split(","):
            for causal in modes:
                r = run_shaped_case(impl, n, args.shape, args.device, args.dtype, args.repeats, causal)
                print(
                    f"| {n} | {impl} | {attention_name(causal)} | {r['seconds']:.4f} | "
                    f"{r['tokens_per_s']:,.0f} | {r['working_mb']:.0f} |",
                    flush=True,
                )


def results_table(results: list[dict]) -> None:
    by = {(r["impl"], r["length"], r["causal"]): r for r in results}
    print(
        "| L | impl | attention | s/window | tokens/s | working MB | speed-up vs reference (same attention) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ref = by.get(("reference", r["length"], r["causal"]))
        ratio = f"{ref['seconds'] / r['seconds']:.1f}x" if ref else "n/a"
        print(
            f"| {r['length']} | {r['impl']} | {attention_name(r['causal'])} | {r['seconds']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['working_mb']:.0f} | {ratio} |"
        )


def main() -> None:
    args = parse_args()
    if args.child:
        impl, length = args.child[0], int(args.child[1])
        causal = args.causal == "true"
        print(json.dumps(run_case(impl, length, args.model, args.repeats, args.metric_only, causal)))
        return

    import torch

    modes = {"true": (True,), "false": (False,), "both": (True, False)}[args.causal]
    if args.shape:
        shaped_table(args, modes)
        return
    results = []
    for impl, n, causal in cases_to_run(args, modes):
        args.impl_case, args.length_case, args.causal_case = impl, n, causal
        res = child(args)
        results.append(res)
        print(
            f"{impl:>13} L={n:>6} {attention_name(causal):>10}: {res['seconds']:8.3f} s  "
            f"{res['tokens_per_s']:>10,.0f} tok/s  working memory {res['working_mb']:8.1f} MB",
            flush=True,
        )
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model {args.model}; best of {args.repeats}\n"
    )
    results_table(results)


if __name__ == "__main__":
    main()
