"""Continual pre-training (not implemented yet: the train stage says so when asked for)."""
