"""Model FLOPs utilisation (MFU), as nanoGPT's estimate_mfu / the PaLM paper's appendix B.

FLOPs per trained token = 6 * N + 12 * n_layers * d_model * T, where N is the number of non-embedding
parameters (forward 2N + backward 4N for the matmuls; for Llama-3-8B, whose LM head is not tied to the
embedding, N = 7.505e9 counts that head) and the second term the attention score and value products
(forward and backward) of a token that sees T keys, counted over the full square as PaLM does (a causal
kernel skips about half of it, so MFU is comparable across papers, not a hardware count).

A packed sequence is several documents that do not attend to each other, so its attention is counted per
document: 12 * n_layers * d_model * sum(l_i^2) over its documents of lengths l_i, instead of T^2
(`attention_flops`). `flops_per_token(..., seq_len)` is the unpacked figure, an upper bound per token.
"""

from __future__ import annotations

import torch

# Dense bf16 peak FLOP/s per device (NVIDIA datasheets, without sparsity), keyed by the exact name
# `torch.cuda.get_device_name` reports. Exact, because the parts of one family differ: an H100 PCIe
# (756) or NVL (835) is not an H100 SXM (989). A name not listed gets no MFU unless training.peak_flops
# is set (said once at start).
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H800": 989e12,  # H800 SXM5, the paper's GPU
    "NVIDIA H800 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,
}


def flops_per_token(non_embedding_params: float, n_layers: int, d_model: int, seq_len: int) -> float:
    """Per token of an unpacked seq_len-token sequence (one document)."""
    return 6.0 * non_embedding_params + 12.0 * n_layers * d_model * seq_len


def squared_document_lengths(position_ids_BT: torch.Tensor) -> int:
    """sum(l_i^2) over the documents of every row, documents starting where position ids restart at 0."""
    total = 0
    for row in position_ids_BT.reshape(-1, position_ids_BT.shape[-1]):
        starts = torch.nonzero(row == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        bounds = [*starts, row.numel()]
        total += sum((b - a) ** 2 for a, b in zip(bounds, bounds[1:]))
    return total


def step_flops(
    non_embedding_params: float, n_layers: int, d_model: int, tokens: int, squared_doc_lengths: int
) -> float:
    """Model FLOPs of a training step: 6 N per token plus the attention of every document."""
    return 6.0 * non_embedding_params * tokens + 12.0 * n_layers * d_model * squared_doc_lengths


def mfu(tokens_per_s_per_device: float, flops_per_tok: float, peak_flops: float) -> float:
    """Fraction of the device's peak achieved by the model's useful FLOPs."""
    return tokens_per_s_per_device * flops_per_tok / peak_flops


def non_embedding_params(model) -> int:
    """Parameters excluding the input embedding (and a tied LM head, which shares it; an untied head, as
    Llama-3-8B's, is counted). Under ZeRO-3 a parameter is a partition; `ds_numel` is its full size."""
    embed = model.get_input_embeddings().weight
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p is not embed)
