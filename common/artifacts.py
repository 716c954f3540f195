"""Artifact directories keyed by config fingerprints, completed by a manifest written last.

Layout: `<artifacts_dir>/<stage>/<fingerprint>/`. The fingerprint hashes the stage's resolved config
(minus keys that cannot change results, e.g. worker counts) plus the fingerprints of its inputs, so a
change anywhere upstream gives a new directory and an unchanged stage is found again and reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json
from common.errors import MissingInputError

MANIFEST = "manifest.json"
FINGERPRINT_CHARS = 16


def strip_keys(obj: Any, ignored: Iterable[str]) -> Any:
    """Drop every mapping key named in `ignored`, at any depth."""
    ignored = frozenset(ignored)
    if isinstance(obj, Mapping):
        return {k: strip_keys(v, ignored) for k, v in obj.items() if k not in ignored}
    if isinstance(obj, (list, tuple)):
        return [strip_keys(v, ignored) for v in obj]
    return obj


def fingerprint(
    stage: str, config: Any, inputs: Mapping[str, str] | None = None, ignored: Iterable[str] = ()
) -> str:
    """Stable hash of a stage's result-relevant config and its inputs' fingerprints.

    Canonical JSON (sorted keys) makes it independent of dict order, process and machine.
    """
    payload = {
        "stage": stage,
        "config": strip_keys(config, ignored),
        "inputs": dict(sorted((inputs or {}).items())),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


@dataclass(frozen=True)
class Artifact:
    """One stage output directory."""

    stage: str
    fingerprint: str
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Write the manifest LAST and atomically: its presence is what marks the artifact complete."""
        full = {"stage": self.stage, "fingerprint": self.fingerprint, "completed_at": time.time(), **manifest}
        atomic_write_json(self.manifest_path, full)
        return full


def artifact_for(artifacts_dir: Path, stage: str, fp: str) -> Artifact:
    return Artifact(stage=stage, fingerprint=fp, path=Path(artifacts_dir) / stage / fp)


def find_artifact(path: Path) -> Artifact:
    """Open an existing artifact directory given on the command line; it must be complete."""
    path = Path(path)
    art = Artifact(stage=path.parent.name, fingerprint=path.name, path=path)
    if not art.is_complete():
        raise MissingInputError(f"{path} is not a complete artifact (no {MANIFEST}); re-run its stage")
    return art
