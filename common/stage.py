"""What the pipeline hands a stage: its output directory, its input artifacts, the tracker.

Defined here (not in experiments/) so stages never import the orchestrator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.artifacts import Artifact
from common.tracking import Tracker


class StageNotImplementedError(NotImplementedError):
    """A pipeline stage that this version of the project does not implement yet."""

    def __init__(self, stage: str, detail: str = "") -> None:
        super().__init__(
            f"Stage '{stage}' is not implemented yet{': ' + detail if detail else ''}. Run a prefix of the "
            f"pipeline instead, e.g. stages=[prepare], or see the project's open issues."
        )
        self.stage = stage


@dataclass
class StageContext:
    out_dir: Path
    """The artifact directory to write into (exists; partial files from a killed run may be present)."""
    inputs: dict[str, Artifact]
    """Upstream stage name -> its complete artifact."""
    cache_dir: Path
    """Shared download/conversion cache (embedded models)."""
    tracker: Tracker = field(default_factory=Tracker)


@dataclass(frozen=True)
class Progress:
    """How much of a stage's work its artifact directory holds, read without writing (the dry run's
    report): `done` finished units of `total` (None: not known before an upstream stage has run)."""

    done: int
    total: int | None
    unit: str
    """What is counted, plural: "windows", "steps", "suites"."""
    verb: str
    """What finished units are: "scored", "checkpointed", "done"."""
    detail: str = ""
    """More about the size of the work: records read, input bytes, the scorer."""

    def describe(self) -> str:
        """Progress so far, e.g. "8 of 20 windows scored (longattn, scorer tiny_llama)"."""
        count = f"{self.done:,} of {self.total:,}" if self.total is not None else f"{self.done:,}"
        return f"{count} {self.unit} {self.verb}" + (f" ({self.detail})" if self.detail else "")

    def size(self) -> str:
        """The work, e.g. "20 windows; longattn, scorer tiny_llama"."""
        work = f"{self.total:,} {self.unit}" if self.total is not None else ""
        return "; ".join(x for x in (work, self.detail) if x)
