"""Training speed and memory: the chunked LM-head loss against the plain one, and engine throughput.

    python benchmarks/bench_train.py loss [--vocab 49152 --tokens 8192 --hidden 576 --chunk 1024 --repeats 3]
    python benchmarks/bench_train.py step [--shape tiny|smollm2|8b --layers N --seq-len T --steps S]

`loss` runs both variants in fresh subprocesses (forward + backward of LM head + cross-entropy on random
hidden states; one untimed warm-up pass, then the median of --repeats) and reports seconds and peak memory (CUDA max allocated, or the process's peak RSS
above its baseline on CPU), and their ratios. `step` trains a randomly initialised Llama of the given
shape through the project's DeepSpeed engine set-up (ChunkedLossLM, ZeRO config, bf16) on random tokens,
one sequence per step, and reports tokens/s per device, MFU (GPU) and peak memory. Results go in
benchmarks/RESULTS.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# hidden, intermediate, heads, kv heads, vocab (Llama-3-8B; SmolLM2-135M)
SHAPES = {
    "tiny": (64, 128, 4, 2, 1024, 2),
    "smollm2": (576, 1536, 9, 3, 49152, 30),
    "8b": (4096, 14336, 32, 8, 128256, 32),
}


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def loss_child(
    variant: str, vocab: int, tokens: int, hidden: int, chunk: int, device: str, repeats: int = 3
) -> dict:
    """One variant after one untimed warm-up pass; the median of `repeats` timed passes."""
    import torch
    import torch.nn.functional as F

    from common.chunked_loss import chunked_lm_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    h = torch.randn(1, tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=dev, dtype=dtype)
    labels = torch.randint(0, vocab, (1, tokens), device=dev)

    def forward_backward() -> float:
        h.grad = head.weight.grad = None
        if variant == "plain":
            logits = head(h).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
        else:
            loss = chunked_lm_loss(h, head, labels, chunk)
        loss.backward()
        return float(loss)  # synchronises with the device

    base = _rss_gib() * 2**30  # CPU: peak RSS above the inputs (the warm-up pass peaks as the timed ones)
    forward_backward()  # warm-up: CUDA context, cuBLAS handles and workspaces, allocator pools
    h.grad = head.weight.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = forward_backward()
        times.append(time.perf_counter() - start)
    now = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _rss_gib() * 2**30
    return {"seconds": sorted(times)[len(times) // 2], "peak_gib": (now - base) / 2**30, "loss": loss}


def run_loss(args) -> None:
    results = {}
    for variant in ("plain", "chunked"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "loss-child",
                variant,
                str(args.vocab),
                str(args.tokens),
                str(args.hidden),
                str(args.chunk),
                args.device,
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    p, c = results["plain"], results["chunked"]
    print(
        f"LM head + CE, vocab {args.vocab:,}, {args.tokens:,} tokens, hidden {args.hidden}, chunk {args.chunk}, {args.device}"
    )
    print(f"{'variant':<8} {'seconds':>8} {'peak GiB':>9} {'loss':>8}")
    for name, r in results.items():
        print(f"{name:<8} {r['seconds']:>8.3f} {r['peak_gib']:>9.3f} {r['loss']:>8.4f}")
    print(
        f"chunked / plain: time x{c['seconds'] / p['seconds']:.2f}, peak memory x{c['peak_gib'] / max(p['peak_gib'], 1e-9):.3f}"
    )


def measure_step(
    shape: str = "tiny",
    layers: int | None = None,
    seq_len: int = 1024,
    steps: int = 3,
    zero: str = "zero2",
    chunk: int = 4096,
    attn: str = "sdpa",
    device: str = "auto",
) -> dict:
    """Train a randomly initialised Llama of `shape` for 1 + `steps` steps (the first one warms up) through
    the project's engine set-up; returns the measurements (also used by benchmarks/gpu_suite.py)."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.distributed import rank_info
    from training.config import TrainConfig
    from training.engine import (
        build_optimizer,
        build_scheduler,
        deepspeed_config,
        init_distributed,
        training_device,
    )
    from training.flops import flops_per_token, non_embedding_params
    from training.metrics import peak_flops_for, peak_memory_gib, reset_peak_memory
    from training.model import ChunkedLossLM
    from training.schedule import plan_steps

    hidden, inter, heads, kv, vocab, default_layers = SHAPES[shape]
    layers = layers or default_layers
    conf = TrainConfig(
        seq_len=seq_len,
        budget_tokens=seq_len * (steps + 1),
        global_batch_tokens=seq_len,
        deepspeed=zero,
        device=device,
        loss_chunk_tokens=chunk,
    )
    ranks = rank_info()
    dev = training_device(conf.device, ranks)
    init_distributed(dev, ranks)
    plan = plan_steps(conf.budget_tokens, conf.global_batch_tokens, conf.seq_len)
    ds_config = deepspeed_config(conf, plan)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        num_hidden_layers=layers,
        max_position_embeddings=seq_len,
        use_cache=False,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    with dev:  # initialise on the device: a 2B-parameter model initialises in seconds there, minutes on CPU
        lm = LlamaForCausalLM(config).to(torch.bfloat16)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flops_tok = flops_per_token(non_embedding_params(lm), layers, hidden, seq_len)
    model = ChunkedLossLM(lm, conf.loss_chunk_tokens)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, conf, ds_config, dev),
        lr_scheduler=lambda opt: build_scheduler(opt, conf, plan.steps),
        config=ds_config,
    )
    reset_peak_memory(dev)
    ids = torch.randint(0, vocab, (1, seq_len), device=dev)
    pos = torch.arange(seq_len, device=dev)[None]
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, kernels, compilation)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        began = time.perf_counter()
        summed = engine(input_ids=ids, position_ids=pos, labels=ids)  # summed over the seq_len - 1 targets
        engine.backward(summed / (seq_len - 1))
        engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - began)
    step_s = sum(times[1:]) / max(len(times) - 1, 1)
    tok_s = seq_len / step_s
    peak = peak_flops_for(dev, None)
    result = {
        "shape": shape,
        "layers": layers,
        "seq_len": seq_len,
        "zero": zero,
        "attn": attn,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "non_embedding_params": non_embedding_params(lm),
        "flops_per_token": flops_tok,
        "step_seconds": times,
        "mean_step_seconds": step_s,
        "tokens_per_s": tok_s,
        "mfu": None if peak is None else tok_s * flops_tok / peak,
        "peak_memory_gib": peak_memory_gib(dev),
    }
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result


def run_step(args) -> None:
    r = measure_step(
        args.shape, args.layers, args.seq_len, args.steps, args.zero, args.chunk, args.attn, args.device
    )
    print(
        f"{r['shape']}-shaped Llama, {r['layers']} layers, seq {r['seq_len']:,}, {r['zero']}, bf16, {r['attn']}, {r['device']}"
    )
    print(
        f"non-embedding params {r['non_embedding_params'] / 1e9:.3f} B; FLOPs/token {r['flops_per_token']:.3e}"
    )
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(
        f"tokens/s/device {r['tokens_per_s']:,.0f}; step {r['mean_step_seconds']:.3f} s "
        f"(warm-up step {r['step_seconds'][0]:.2f} s); MFU {mfu}; peak mem {r['peak_memory_gib']:.2f} GiB"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "loss-child":
        variant, vocab, tokens, hidden, chunk, device, repeats = sys.argv[2:9]
        result = loss_child(variant, int(vocab), int(tokens), int(hidden), int(chunk), device, int(repeats))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    loss = sub.add_parser("loss")
    loss.add_argument("--vocab", type=int, default=49152)
    loss.add_argument("--tokens", type=int, default=8192)
    loss.add_argument("--hidden", type=int, default=576)
    loss.add_argument("--chunk", type=int, default=1024)
    loss.add_argument("--device", default="cpu")
    loss.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up (median)")
    step = sub.add_parser("step")
    step.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    step.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (memory)")
    step.add_argument("--seq-len", type=int, default=1024)
    step.add_argument("--steps", type=int, default=3)
    step.add_argument("--zero", default="zero2")
    step.add_argument("--chunk", type=int, default=4096)
    step.add_argument("--attn", default="sdpa")
    step.add_argument("--device", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    run_loss(args) if args.what == "loss" else run_step(args)


if __name__ == "__main__":
    main()
