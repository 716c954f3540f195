"""Continual pre-training.

Here so far: the pure parts (step plan from a token budget, cosine LR, MFU, document packing with
position-id resets, seeded resumable mixture schedule, chunked LM-head loss). Not yet: the train stage
itself (DeepSpeed/accelerate engine, checkpoints and resume, launcher); asking for it fails with a clear
message.
"""
