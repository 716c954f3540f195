"""Exclusive claims on artifact directories: concurrent runs (sweep members, several users) share a stage,
one run computes it and the others wait and reuse it.

A claim on `<artifacts_dir>/<stage>/<fingerprint>/` is two files in that directory:

- `.claim.lock`, an OS lock (`filelock.FileLock`: `flock(2)`) that the holder keeps for the whole stage. The
  kernel, or the lock server of a shared filesystem, releases it when the holder dies, kill -9 included.
- `.claim.json`, the owner record (host, pid, SLURM job id, run directory, since when) with a heartbeat
  that a thread of the holder refreshes every `pipeline.claim_heartbeat_s` seconds.

A run takes the claim only while it holds the lock, and only when the record is absent, its own, or its
holder is gone: a process of this host that has exited, a free lock (`pipeline.claim_trust_lock`), or a
heartbeat older than `pipeline.claim_stale_s` (by the record's clock, or unchanged that long by ours, so
clock skew between nodes cannot keep a dead claim alive). The record is published with an exclusive
`link(2)`, and a dead holder's record is moved aside and checked before it is replaced, so two runs that
both got a lock (a filesystem whose locks are node-local) still cannot both publish one.

What it assumes: `paths.artifacts_dir` on a filesystem whose `flock` is coherent across the nodes that
share it (local disks; NFSv4; Lustre mounted with `-o flock`). Where `flock` is missing (ENOSYS: Lustre's
default `noflock`) no lock is used and the heartbeat rule alone decides; where it is node-local (Lustre
`localflock`, NFSv3 `nolock`) set `pipeline.claim_trust_lock=false` and the heartbeat rule decides too.

All ranks of one launched job are one claimant (`claimant_id`): rank 0 holds the claim, the other ranks of
a distributed stage join it (`join_claim`) and never wait on one another.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from common.atomic import atomic_write_json
from common.claim_records import (
    RECORD_FILE,
    ClaimSettings,
    OwnerRecord,
    Staleness,
    claimant_id,
    gone_reason,
    publish_record,
    read_record,
    retire_record,
    unknown_holder,
)
from common.distributed import rank_info
from common.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".claim.lock"


class ClaimWaitError(UserError, TimeoutError):
    """Waiting for another run's claim ended: the timeout passed, or its holder stopped beating."""


class ClaimLostError(UserError):
    """Another run took this run's claim over (its heartbeat had stopped): its output is not used."""


class Claim:
    """This run's claim on one directory: `try_acquire` until it returns None, produce, `release`."""

    def __init__(self, directory: Path, claimant: str, run_dir: str, settings: ClaimSettings) -> None:
        self.directory, self.settings = Path(directory), settings
        self.claimant, self.run_dir = claimant, run_dir
        self.record: OwnerRecord | None = None
        self.took_over: tuple[OwnerRecord, str] | None = None
        """The gone holder this run took the claim from, and why it counted as gone."""
        self.lost: str | None = None
        """Set by the heartbeat when another run replaced this run's record."""
        self._lock: FileLock | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_no_flock = False

    @property
    def record_path(self) -> Path:
        return self.directory / RECORD_FILE

    def _lock_now(self) -> tuple[bool, FileLock | None]:
        """(got it, the lock); (True, None) where the filesystem has no flock (the heartbeat rule decides)."""
        lock = FileLock(self.directory / LOCK_FILE, thread_local=False, fallback_to_soft=False)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            return False, None
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            if not self._warned_no_flock:
                log.warning(
                    "no flock on the filesystem of %s: the heartbeat rule alone decides", self.directory
                )
                self._warned_no_flock = True
            return True, None
        return True, lock

    def try_acquire(self, watch: Staleness) -> OwnerRecord | None:
        """Take the claim (None) or return its holder (a record with an empty claimant: unknown holder)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        got, lock = self._lock_now()
        current = read_record(self.record_path)
        if not got:
            return current or unknown_holder()
        reason = None
        if current is not None and current.claimant != self.claimant:
            reason = gone_reason(current, self.settings, lock is not None, watch)
            if reason is None:
                if lock is not None:
                    lock.release()
                return current
        mine = OwnerRecord(claimant=self.claimant, run_dir=self.run_dir)
        if (
            current is not None and not retire_record(self.record_path, current, mine.token)
        ) or not publish_record(self.record_path, mine):
            if lock is not None:
                lock.release()
            return read_record(self.record_path) or current or unknown_holder()
        self.record, self._lock = mine, lock
        if reason is not None:
            self.took_over = (current, reason)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"claim-heartbeat-{self.directory.name}")
        self._thread.daemon = True
        self._thread.start()
        return None

    def _beat(self) -> None:
        """Refresh the record until released; stop, marking the claim lost, once another run's record is
        there (or ours has been gone for two beats: a takeover moves it aside before publishing its own)."""
        missing = 0
        while not self._stop.wait(self.settings.heartbeat_s):
            assert self.record is not None
            try:
                current = read_record(self.record_path, strict=True)
                missing = missing + 1 if current is None else 0
                if (current is not None and current.token != self.record.token) or missing >= 2:
                    self.lost = current.describe() if current else "nobody (the owner record was removed)"
                    log.error("claim on %s lost: it is now held by %s", self.directory, self.lost)
                    return
                if current is not None:
                    self.record.heartbeat, self.record.beats = time.time(), self.record.beats + 1
                    atomic_write_json(self.record_path, asdict(self.record))
            except (OSError, ValueError) as exc:  # a transient filesystem error: the next beat tries again
                log.warning("claim heartbeat on %s failed: %s", self.directory, exc)

    def check(self) -> None:
        """Raise if another run took the claim over while this one worked (before its manifest is written)."""
        if self.lost:
            raise ClaimLostError(
                f"{self.directory}: this run's claim was taken over by {self.lost} after its heartbeat stopped "
                f"for more than pipeline.claim_stale_s={self.settings.stale_s:g} s; its output is left to that "
                "run. Raise pipeline.claim_stale_s if this run was only slow (a suspended job, an overloaded node)"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.record is not None:
            current = read_record(self.record_path)
            if current is not None and current.token == self.record.token:
                self.record_path.unlink(missing_ok=True)
            self.record = None
        if self._lock is not None:
            self._lock.release()  # the lock file stays: unlinking it would split waiters across inodes
            self._lock = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_wait(
    what: str, holder: OwnerRecord, settings: ClaimSettings, waited: float, watch: Staleness
) -> None:
    """Fail the wait when it passed pipeline.wait_timeout_s, or when the holder's lock is held but its
    heartbeat stopped (a live process that no longer progresses: waiting would never end)."""
    if settings.wait_timeout_s is not None and waited > settings.wait_timeout_s:
        raise ClaimWaitError(
            f"{what}: waited {waited:.0f} s (pipeline.wait_timeout_s={settings.wait_timeout_s:g}) for the run "
            f"that holds it: {holder.describe()}. Raise pipeline.wait_timeout_s, or set it to null to wait as "
            "long as that run's heartbeat is fresh"
        )
    unchanged = watch.unchanged_for(holder)  # our own clock only: this error must never hit a live run
    if unchanged > settings.stale_s:
        raise ClaimWaitError(
            f"{what}: the run that holds it still holds its lock, but its heartbeat has not changed for "
            f"{unchanged:.0f} s (pipeline.claim_stale_s={settings.stale_s:g}): {holder.describe()}. It is alive "
            "but not progressing (suspended or hung?): end it, or raise pipeline.claim_stale_s if it is only slow"
        )


def claim_or_wait(
    directory: Path,
    claimant: str,
    run_dir: str,
    settings: ClaimSettings,
    is_complete: Callable[[], bool],
    what: str,
) -> Claim | None:
    """Rank 0 of a run: the held claim (produce the artifact, then release it), or None once another run
    has completed the artifact (reuse it). Logs one line per holder it waits for."""
    claim, watch = Claim(directory, claimant, run_dir, settings), Staleness()
    started, announced = time.monotonic(), None
    while not is_complete():
        holder = claim.try_acquire(watch)
        if holder is None:
            if is_complete():  # the holder finished between our check and our lock
                claim.release()
                return None
            if claim.took_over:
                gone, reason = claim.took_over
                log.warning(
                    "%s: took over the claim of %s (%s); resuming from its finished parts",
                    what,
                    gone.describe(),
                    reason,
                )
            return claim
        if announced != holder.token:
            log.info(
                "%s: claimed by %s; waiting for it to finish, then reusing its artifact",
                what,
                holder.describe(),
            )
            announced = holder.token
        _check_wait(what, holder, settings, time.monotonic() - started, watch)
        time.sleep(settings.poll_s)
    return None


def join_claim(
    directory: Path, claimant: str, settings: ClaimSettings, is_complete: Callable[[], bool]
) -> bool:
    """Ranks > 0 of a distributed stage: wait until rank 0 holds the claim for this launch (True: work with
    it) or the artifact is complete (False: another run made it, reuse it). Rank 0's own waiting is bounded,
    and the launcher ends these ranks when rank 0 fails."""
    path = Path(directory) / RECORD_FILE
    while not is_complete():
        record = read_record(path)
        if record is not None and record.claimant == claimant:
            return True
        time.sleep(min(0.25, settings.poll_s))  # one small read: rank 0 publishes at once
    return False


@dataclass(frozen=True)
class ClaimState:
    """What a look at a claim (without taking it) shows: the dry run's report."""

    holder: OwnerRecord | None
    gone: str | None = None
    """Why the recorded holder no longer holds it (the next run takes it over)."""

    def describe(self) -> str:
        if self.holder is None:
            return "unclaimed"
        who = self.holder.describe()
        return f"claim left by {who}; gone: {self.gone}" if self.gone else f"claimed by {who}"


def inspect_claim(directory: Path, settings: ClaimSettings) -> ClaimState:
    """The claim's state, writing nothing: the lock is probed only where its file exists."""
    directory = Path(directory)
    record = read_record(directory / RECORD_FILE)
    lock_path = directory / LOCK_FILE
    lock_free: bool | None = None
    if lock_path.is_file():
        lock = FileLock(lock_path, thread_local=False, fallback_to_soft=False)
        try:
            lock.acquire(blocking=False)
            lock.release()
            lock_free = True
        except Timeout:
            lock_free = False
        except OSError:  # no flock here: the heartbeat rule decides
            lock_free = None
    if record is None:
        if lock_free is False:
            return ClaimState(unknown_holder())
        return ClaimState(None)
    if lock_free is False:
        return ClaimState(record)
    return ClaimState(record, gone_reason(record, settings, bool(lock_free), Staleness()))


class JoinedClaim:
    """A rank > 0's share of its launch's claim: rank 0 holds, beats and releases it."""

    record: OwnerRecord | None = None
    lost: str | None = None

    def check(self) -> None:
        """Rank 0 checks the claim before it writes the manifest."""

    def release(self) -> None:
        """Rank 0 releases the claim."""

    def __enter__(self) -> JoinedClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def stage_claim(
    directory: Path, run_dir: str, settings: ClaimSettings, is_complete: Callable[[], bool], what: str
) -> Claim | JoinedClaim | None:
    """This launch's claim on a stage's artifact directory (rank 0 takes it, or waits for another run and
    gets None: reuse its artifact; other ranks join rank 0's)."""
    claimant = claimant_id(run_dir)
    if rank_info().is_main:
        return claim_or_wait(directory, claimant, run_dir, settings, is_complete, what)
    return JoinedClaim() if join_claim(directory, claimant, settings, is_complete) else None


def describe_producer(manifest: dict) -> str:
    """The run a manifest says produced its artifact (`produced_by`), for the "reused" log line."""
    who = manifest.get("produced_by")
    if not who:
        return "an earlier run"
    slurm = f" (SLURM job {who['slurm_job_id']})" if who.get("slurm_job_id") else ""
    return f"host {who.get('host')} pid {who.get('pid')}{slurm}, run dir {who.get('run_dir')}"
