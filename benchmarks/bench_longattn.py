"""LongAttn scoring speed and memory: reference vs blocked (CPU) and the authors' whole-model path.

Each case runs in a fresh subprocess so its peak memory is its own: working memory = peak RSS while
scoring minus RSS just before (weights and the token window excluded), sampled every 2 ms in a separate,
untimed run (the sampling thread would otherwise contend for the GIL and slow the timed loop).

    python benchmarks/bench_longattn.py                       # defaults of the issue: 2048/4096 both,
                                                              # 8192-32768 blocked only, SmolLM2 layer 0
    python benchmarks/bench_longattn.py --compare 8192 --blocked-only 65536 --repeats 3
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


def run_case(impl: str, length: int, model: str, repeats: int, metric_only: bool = False) -> dict:
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
            return head_stats(q, k, None, impl)

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
        "seconds": best,
        "tokens_per_s": length / best,
        "working_mb": (sampler.peak - before) / 2**20,
    }


SHAPES = {"8b": (32, 8, 128), "70b": (64, 8, 128), "smollm2": (9, 3, 64)}  # (heads, kv heads, head dim)


def run_shaped_case(impl: str, length: int, shape: str, device: str, dtype: str, repeats: int) -> dict:
    """Statistics alone on random q/k of a model's layer-0 shape, timed with device synchronisation."""
    import torch

    from selection.scorers.attention_stats import head_stats

    heads, kv_heads, dim = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(heads, length, dim, device=device, generator=gen).mul_(2).to(getattr(torch, dtype))
    k = torch.randn(kv_heads, length, dim, device=device, generator=gen).mul_(2).to(getattr(torch, dtype))
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    head_stats(q, k, None, impl)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        head_stats(q, k, None, impl)
        sync()
        best = min(best, time.perf_counter() - start)
    working = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return {
        "impl": impl,
        "length": length,
        "seconds": best,
        "tokens_per_s": length / best,
        "working_mb": working,
    }


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
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
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
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(
                run_case(args.child[0], int(args.child[1]), args.model, args.repeats, args.metric_only)
            )
        )
        return

    import torch

    if args.shape:
        print(
            f"| L | impl | s/window | tokens/s | working MB (device) |  shape {args.shape} {SHAPES[args.shape]}, "
            f"{args.dtype} on {args.device} |"
        )
        print("|---|---|---|---|---|")
        for n in args.compare:
            for impl in args.impls.split(","):
                r = run_shaped_case(impl, n, args.shape, args.device, args.dtype, args.repeats)
                print(
                    f"| {n} | {impl} | {r['seconds']:.4f} | {r['tokens_per_s']:,.0f} | {r['working_mb']:.0f} |",
                    flush=True,
                )
        return

    impls = ("reference", "blocked") if args.metric_only else ("reference", "blocked", "authors_path")
    cases = [(impl, n) for n in args.compare for impl in impls]
    cases += [("blocked", n) for n in args.blocked_only]
    results = []
    for impl, n in cases:
        args.impl_case, args.length_case = impl, n
        res = child(args)
        results.append(res)
        print(
            f"{impl:>13} L={n:>6}: {res['seconds']:8.3f} s  {res['tokens_per_s']:>10,.0f} tok/s  "
            f"working memory {res['working_mb']:8.1f} MB",
            flush=True,
        )
    by = {(r["impl"], r["length"]): r for r in results}
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model {args.model}; best of {args.repeats}\n"
    )
    print("| L | impl | s/window | tokens/s | working MB | speed-up vs reference |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ref = by.get(("reference", r["length"]))
        ratio = f"{ref['seconds'] / r['seconds']:.1f}x" if ref else "n/a"
        print(
            f"| {r['length']} | {r['impl']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['working_mb']:.0f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
