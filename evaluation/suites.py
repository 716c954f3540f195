"""The evaluation suites, registered by name in `SUITES` (evaluation.suites picks them): NIAH (our own
task), RULER, LongBench and the short suites (lm-eval's own task YAMLs, re-pointed). Each builds lm-eval
task configs from its `evaluation.<suite>` settings and turns lm-eval's results into paper columns."""

from __future__ import annotations

from evaluation import longbench, niah, ruler, short  # noqa: F401 - importing registers each suite
from evaluation.tasks import SUITES, EvaluationDataError, Suite, SuiteContext, task_manager

__all__ = ["SUITES", "EvaluationDataError", "Suite", "SuiteContext", "task_manager"]
