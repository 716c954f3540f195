"""Evaluation suites (not implemented yet: the evaluate stage says so when asked for)."""
