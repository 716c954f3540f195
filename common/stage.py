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
