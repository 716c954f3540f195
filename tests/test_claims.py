"""Claims on artifact directories (common/claims.py): exclusion between runs, heartbeats, takeover of a
dead or stale holder in bounded time, bounded waiting, and the config keys that never reach a fingerprint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from common.claim_records import (
    RECORD_FILE,
    ClaimSettings,
    OwnerRecord,
    Staleness,
    publish_record,
    read_record,
    retire_record,
)
from common.claims import (
    Claim,
    ClaimLostError,
    ClaimWaitError,
    claim_or_wait,
    inspect_claim,
    join_claim,
)
from common.errors import ConfigError
from experiments.pipeline import claim_settings, run_pipeline, stage_fingerprints
from experiments.stages import STAGE_ORDER

FAST = ClaimSettings(heartbeat_s=0.1, stale_s=1.0)
REPO = Path(__file__).resolve().parent.parent


def never() -> bool:
    return False


def remote_record(heartbeat: float, host: str = "node-that-died") -> OwnerRecord:
    """A record written by a run on another node (its pid means nothing here)."""
    return OwnerRecord(
        claimant="other-run", run_dir="/runs/other", host=host, boot="x", pid=1, heartbeat=heartbeat
    )


def test_a_held_claim_excludes_other_runs_and_beats(tmp_path):
    holder = Claim(tmp_path / "art", "run-a", "/runs/a", FAST)
    assert holder.try_acquire(Staleness()) is None
    first = read_record(tmp_path / "art" / RECORD_FILE)
    assert (first.claimant, first.pid, first.run_dir) == ("run-a", os.getpid(), "/runs/a")
    other = Claim(tmp_path / "art", "run-b", "/runs/b", FAST)
    seen = other.try_acquire(Staleness())  # the lock is held (another open file description): claimed
    assert seen is not None and seen.token == first.token
    time.sleep(0.5)
    assert read_record(tmp_path / "art" / RECORD_FILE).beats >= 2  # the heartbeat thread refreshes it
    holder.release()
    assert not (tmp_path / "art" / RECORD_FILE).exists()
    assert other.try_acquire(Staleness()) is None and other.took_over is None
    other.release()


def test_a_stale_claim_of_a_lost_node_is_taken_over_in_bounded_time(tmp_path):
    """Locks that do not reach across nodes (claim_trust_lock=false): only the heartbeat rule frees a
    claim. A record from another host whose heartbeat is fresh when first seen and then never changes is
    taken over once this waiter has seen it unchanged for claim_stale_s, not before, not much later."""
    directory = tmp_path / "art"
    directory.mkdir()
    (directory / RECORD_FILE).write_text(json.dumps(asdict(remote_record(time.time()))))
    settings = ClaimSettings(heartbeat_s=0.1, stale_s=1.0, trust_lock=False, wait_timeout_s=10)
    started = time.monotonic()
    claim = claim_or_wait(directory, "run-b", "/runs/b", settings, never, "prepare")
    waited = time.monotonic() - started
    assert claim is not None and 1.0 <= waited < 3.0
    gone, reason = claim.took_over
    assert gone.host == "node-that-died" and "heartbeat" in reason and "pipeline.claim_stale_s=1" in reason
    assert read_record(directory / RECORD_FILE).claimant == "run-b"
    claim.release()


def test_an_old_heartbeat_or_a_released_lock_frees_a_claim_at_once(tmp_path):
    for trust_lock, heartbeat in ((False, time.time() - 3600), (True, time.time())):
        directory = tmp_path / f"art-{trust_lock}"
        directory.mkdir()
        (directory / RECORD_FILE).write_text(json.dumps(asdict(remote_record(heartbeat))))
        settings = ClaimSettings(heartbeat_s=0.1, stale_s=60.0, trust_lock=trust_lock, wait_timeout_s=5)
        started = time.monotonic()
        claim = claim_or_wait(directory, "run-b", "/runs/b", settings, never, "prepare")
        assert time.monotonic() - started < 0.5
        assert ("lock was released" in claim.took_over[1]) == trust_lock
        claim.release()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """kill -9 of a holder in another process: the kernel drops its flock, its pid is gone."""
    script = (
        "import sys, time\n"
        "from common.claims import Claim\n"
        "from common.claim_records import ClaimSettings, Staleness\n"
        "claim = Claim(sys.argv[1], 'dying-run', '/runs/dying', ClaimSettings(heartbeat_s=0.1, stale_s=60))\n"
        "assert claim.try_acquire(Staleness()) is None\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "art")], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        # not even the lock rule: the pid of a process of this host that has exited
        settings = ClaimSettings(heartbeat_s=0.1, stale_s=60.0, trust_lock=False, wait_timeout_s=5)
        seen = Claim(tmp_path / "art", "run-b", "/runs/b", settings).try_acquire(Staleness())
        assert seen is not None and seen.pid == holder.pid  # alive: its lock is held
        assert "claimed by host" in inspect_claim(tmp_path / "art", settings).describe()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    state = inspect_claim(tmp_path / "art", settings)
    assert state.holder.pid == holder.pid and state.gone == "its process has exited"
    started = time.monotonic()
    claim = claim_or_wait(tmp_path / "art", "run-b", "/runs/b", settings, never, "score")
    assert time.monotonic() - started < 0.5 and claim.took_over[1] == "its process has exited"
    claim.release()


def test_waiting_is_bounded_and_names_the_holder_and_the_key(tmp_path):
    holder = Claim(tmp_path / "art", "run-a", "/runs/a", FAST)
    assert holder.try_acquire(Staleness()) is None
    try:
        bounded = ClaimSettings(heartbeat_s=0.1, stale_s=1.0, wait_timeout_s=0.3)
        with pytest.raises(
            ClaimWaitError, match=r"pipeline.wait_timeout_s=0.3.*host \S+ pid \d+.*run dir /runs/a"
        ):
            claim_or_wait(tmp_path / "art", "run-b", "/runs/b", bounded, never, "score")
        holder._stop.set()  # the holder hangs: alive (its lock is held) but its heartbeat stops
        holder._thread.join()
        with pytest.raises(ClaimWaitError, match=r"heartbeat has not changed.*pipeline.claim_stale_s=1"):
            claim_or_wait(tmp_path / "art", "run-b", "/runs/b", FAST, never, "score")
    finally:
        holder.release()


def test_a_run_whose_claim_was_taken_over_does_not_write_its_manifest(tmp_path):
    holder = Claim(tmp_path / "art", "run-a", "/runs/a", FAST)
    assert holder.try_acquire(Staleness()) is None
    record = tmp_path / "art" / RECORD_FILE
    record.write_text(json.dumps(asdict(remote_record(time.time(), host="node-b"))))  # a takeover elsewhere
    time.sleep(0.4)
    with pytest.raises(ClaimLostError, match="taken over by host node-b"):
        holder.check()
    holder.release()
    assert read_record(record).host == "node-b"  # the new holder's record is left alone


def test_records_are_published_exclusively_and_retired_only_when_unchanged(tmp_path):
    path = tmp_path / RECORD_FILE
    first, second = remote_record(time.time()), remote_record(time.time(), host="node-b")
    assert publish_record(path, first) and not publish_record(path, second)
    assert read_record(path).token == first.token
    assert not retire_record(path, second, "t1")  # it is not second's record: put back, untouched
    assert read_record(path).token == first.token
    assert retire_record(path, first, "t2") and not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left


def test_ranks_of_one_launch_join_their_rank_0s_claim(tmp_path):
    holder = Claim(tmp_path / "art", "launch 7 of /runs/a", "/runs/a", FAST)
    assert holder.try_acquire(Staleness()) is None
    assert join_claim(tmp_path / "art", "launch 7 of /runs/a", FAST, never)
    holder.release()
    assert not join_claim(tmp_path / "art", "launch 8 of /runs/a", FAST, lambda: True)  # complete: reuse


def test_claim_keys_are_checked_and_never_enter_a_fingerprint(make_cfg):
    base = stage_fingerprints(make_cfg("debug=tiny"), list(STAGE_ORDER))
    keys = [
        "pipeline.claim_heartbeat_s=1",
        "pipeline.claim_stale_s=7",
        "pipeline.claim_trust_lock=false",
        "pipeline.wait_timeout_s=5",
        "pipeline.dry_run=true",
    ]
    cfg = make_cfg("debug=tiny", *keys)
    assert stage_fingerprints(cfg, list(STAGE_ORDER)) == base
    assert claim_settings(cfg) == ClaimSettings(heartbeat_s=1, stale_s=7, trust_lock=False, wait_timeout_s=5)
    bad = make_cfg("debug=tiny", "stages=[prepare]", "pipeline.claim_heartbeat_s=200")
    with pytest.raises(ConfigError, match="pipeline.claim_heartbeat_s=200 and pipeline.claim_stale_s=180"):
        run_pipeline(bad)


def test_without_flock_the_owner_record_alone_excludes(tmp_path, monkeypatch, caplog):
    """A filesystem without flock (ENOSYS, Lustre's default): no lock, the published record decides."""
    import errno

    import common.claims

    class NoFlock:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def acquire(self, *args, **kwargs):
            raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(common.claims, "FileLock", NoFlock)
    holder = Claim(tmp_path / "art", "run-a", "/runs/a", FAST)
    assert holder.try_acquire(Staleness()) is None and "the heartbeat rule alone decides" in caplog.text
    other = Claim(tmp_path / "art", "run-b", "/runs/b", FAST)
    assert other.try_acquire(Staleness()).token == holder.record.token  # alive, beating: claimed
    holder.release()
    assert other.try_acquire(Staleness()) is None
    other.release()


def test_a_requeued_slurm_job_is_a_new_launch():
    """After a requeue SLURM keeps the job id; the restart count keeps the dead launch's markers apart."""
    from common.distributed import launch_id

    assert launch_id({"SLURM_JOB_ID": "77"}) == launch_id({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"})
    assert launch_id({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}) == "77-restart1"
    assert launch_id({"TORCHELASTIC_RUN_ID": "slurm-77", "SLURM_RESTART_COUNT": "2"}) == "slurm-77-restart2"
    assert launch_id({"MASTER_PORT": "29500"}) == "29500"
