"""Moved to `common/chunked_loss.py` (selection's scorers share it); this name is kept for callers that
still import it from training (benchmarks/bench_train.py)."""

from common.chunked_loss import IGNORE_INDEX, Head, chunked_lm_loss

__all__ = ["IGNORE_INDEX", "Head", "chunked_lm_loss"]
