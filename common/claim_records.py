"""Claim records: who holds an artifact directory's claim, its heartbeat, and when a holder counts as gone.

`.claim.json` in the claimed directory is an `OwnerRecord`. It is published with an exclusive `link(2)`
(atomic on NFS and Lustre too), and a gone holder's record is moved aside and checked before it is
replaced, so two runs can never both publish one, even where their locks do not see each other.
See `common/claims.py` for the whole mechanism.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json
from common.distributed import launch_id, rank_info
from common.errors import ConfigError

RECORD_FILE = ".claim.json"
PROCESS_TOKEN = uuid.uuid4().hex[:12]
"""Tells apart two processes that reuse a pid (and a single-process run's claims from any other run's)."""


@dataclass(frozen=True)
class ClaimSettings:
    """The `pipeline.claim_*` and `pipeline.wait_timeout_s` keys (they change no result, no fingerprint)."""

    heartbeat_s: float = 30.0
    """Seconds between the holder's heartbeats."""
    stale_s: float = 180.0
    """A heartbeat older than this frees the claim (a lost node); keep it well above heartbeat_s and the
    NFSv4 lease time (90 s by default), so that a live but slow holder is never taken over."""
    trust_lock: bool = True
    """A free lock means the holder is gone, even on another host (flock coherent across nodes)."""
    wait_timeout_s: float | None = None
    """Stop waiting for another run after this many seconds; None waits as long as its heartbeat is fresh."""

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.stale_s:
            raise ConfigError(
                f"pipeline.claim_heartbeat_s={self.heartbeat_s} and pipeline.claim_stale_s={self.stale_s}: "
                "need 0 < claim_heartbeat_s < claim_stale_s (e.g. 30 and 180)"
            )
        if self.wait_timeout_s is not None and self.wait_timeout_s < 0:
            raise ConfigError(f"pipeline.wait_timeout_s={self.wait_timeout_s}: give seconds >= 0 or null")

    @property
    def poll_s(self) -> float:
        return min(2.0, self.heartbeat_s)

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any] | None) -> ClaimSettings:
        conf = conf or {}
        keys = {"claim_heartbeat_s": "heartbeat_s", "claim_stale_s": "stale_s"}
        keys |= {"claim_trust_lock": "trust_lock", "wait_timeout_s": "wait_timeout_s"}
        return cls(**{ours: conf[key] for key, ours in keys.items() if conf.get(key) is not None})


def claimant_id(run_dir: str, env: Mapping[str, str] = os.environ) -> str:
    """The same on every rank of one launch, different for any other run (and any other launch)."""
    if rank_info().world_size > 1:
        return f"launch {launch_id(env)} of {run_dir}"
    return f"{socket.gethostname()}:{os.getpid()}:{PROCESS_TOKEN}"


def boot_id() -> str:
    """Distinguishes this host's boots (and containers sharing a host name with another machine)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class OwnerRecord:
    """Who holds a claim; `.claim.json`."""

    claimant: str
    run_dir: str
    host: str = field(default_factory=socket.gethostname)
    boot: str = field(default_factory=boot_id)
    pid: int = field(default_factory=os.getpid)
    slurm_job_id: str | None = field(default_factory=lambda: os.environ.get("SLURM_JOB_ID"))
    started: float = field(default_factory=time.time)
    heartbeat: float = field(default_factory=time.time)
    beats: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Names this one acquisition, so a holder sees when its record was replaced."""

    def describe(self, now: float | None = None) -> str:
        if not self.token:
            return "an unknown process (it holds the lock but has not written its owner record)"
        age = (now or time.time()) - self.heartbeat
        slurm = f" (SLURM job {self.slurm_job_id})" if self.slurm_job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (
            f"host {self.host} pid {self.pid}{slurm}, run dir {self.run_dir}, since {since}, "
            f"last heartbeat {age:.0f} s ago"
        )

    def producer(self) -> dict[str, Any]:
        """What the manifest records as the run that produced the artifact."""
        keys = ("host", "pid", "slurm_job_id", "run_dir", "started")
        return {k: getattr(self, k) for k in keys}

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname() and self.boot == boot_id()


def unknown_holder() -> OwnerRecord:
    """Stands for the holder of a lock that has no owner record (yet)."""
    return OwnerRecord(claimant="", run_dir="?", host="?", boot="", pid=0, token="")


def read_record(path: Path, strict: bool = False) -> OwnerRecord | None:
    """The record at `path`; None when there is none (or, unless `strict`, when it cannot be read)."""
    try:
        return OwnerRecord(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        if strict:
            raise
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class Staleness:
    """How long this process has seen each record unchanged, on its own monotonic clock."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], float] = {}

    def unchanged_for(self, record: OwnerRecord) -> float:
        key = (record.token, record.beats)
        first = self._seen.setdefault(key, time.monotonic())
        return time.monotonic() - first


def gone_reason(
    record: OwnerRecord, settings: ClaimSettings, lock_free: bool, watch: Staleness
) -> str | None:
    """Why `record`'s holder no longer holds its claim, or None while it may. `lock_free`: we hold the lock.
    On the holder's own host its pid decides (alive with a free lock: the lock file was replaced, or the pid
    was reused; then only the heartbeat rule frees it); elsewhere a free lock does (claim_trust_lock)."""
    if record.on_this_host():
        if not pid_alive(record.pid):
            return "its process has exited"
    elif lock_free and settings.trust_lock:
        return "its lock was released, so its process has ended"
    age = max(time.time() - record.heartbeat, watch.unchanged_for(record))
    if age > settings.stale_s:
        return f"its last heartbeat is {age:.0f} s old (pipeline.claim_stale_s={settings.stale_s:g})"
    return None


def publish_record(path: Path, record: OwnerRecord) -> bool:
    """Publish `record` at `path` only if nothing is there (link(2) is atomic on NFS and Lustre too)."""
    tmp = path.with_name(f"{path.name}.{record.token}.tmp")
    atomic_write_json(tmp, asdict(record))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # NFS: the reply to a link that succeeded can be lost; the link count tells
        return tmp.stat().st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)


def retire_record(path: Path, previous: OwnerRecord, token: str) -> bool:
    """Move `previous` (a gone holder's record) out of the way; False when a newer record had replaced it."""
    aside = path.with_name(f"{path.name}.{token}.old")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    moved = read_record(aside)
    if moved is not None and moved.token != previous.token:  # another run took it over first: put it back
        with suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
