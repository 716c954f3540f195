"""Model FLOPs utilisation (MFU), as nanoGPT's estimate_mfu / the PaLM paper's appendix B.

FLOPs per trained token = 6 * N + 12 * n_layers * d_model * seq_len, where N is the number of
non-embedding parameters (forward 2N + backward 4N for the matmuls) and the second term the attention
score and value products (forward and backward), counted over the full T x T square as PaLM does
(a causal kernel skips about half of it, so MFU is comparable across papers, not a hardware count).
"""

from __future__ import annotations

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H800": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(non_embedding_params: float, n_layers: int, d_model: int, seq_len: int) -> float:
    return 6.0 * non_embedding_params + 12.0 * n_layers * d_model * seq_len


def mfu(tokens_per_s_per_device: float, flops_per_tok: float, peak_flops: float) -> float:
    """Fraction of the device's peak achieved by the model's useful FLOPs."""
    return tokens_per_s_per_device * flops_per_tok / peak_flops


def non_embedding_params(model) -> int:
    """Parameters excluding the input embedding (and a tied LM head, which shares it). Under ZeRO-3 a
    parameter is a partition; `ds_numel` is its full size."""
    embed = model.get_input_embeddings().weight
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p is not embed)
