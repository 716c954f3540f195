"""Evaluation: the `evaluate` stage (evaluation/stage.py) runs NIAH, RULER, LongBench and the short suites
through lm-eval on one model (HF or vLLM backend) and writes the paper's columns. Imports only `common/`.
"""
