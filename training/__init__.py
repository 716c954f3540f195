"""Continual pre-training: the `train` stage (training/train.py).

Pure parts: the step plan from a token budget and the paper's global batch (schedule), cosine LR,
document packing with position-id resets (packing), the seeded resumable mixture order (mixture, data),
next-token targets with document starts ignored and the token-weighted loss (targets; the chunked LM-head
loss itself is common/chunked_loss.py), FLOPs and MFU with packed documents counted per document
(flops). The run: the attention choice that keeps packed documents apart (attention), the model with ABF
RoPE (model), the DeepSpeed engine with fp32 gradient accumulation and reduction (engine), the loop with
step checkpoints and exact resume (loop, checkpoints, metrics). Imports only `common/`.
"""
