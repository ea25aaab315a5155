"""The run-folder lock: a second run on the same folder stops at once naming the holder; a stale lock is taken
over; temporary files of a killed write are cleaned at the student stage's start. Real second processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillery.rundir import LOCK_NAME, RunLockError, clean_temp_files, run_lock

HOLD = """
import sys, time
from distillery.rundir import run_lock
with run_lock(sys.argv[1], "holder-command"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(run: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_stops_at_once_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, capfd):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        info = json.loads((run / LOCK_NAME).read_text())
        assert info["pid"] == holder.pid and info["command"] == "holder-command"
        # a real second distillery process on the same folder: exit 2 at once, the holder named, no traceback
        job = tmp_path / "job.yaml"
        job.write_text(json.dumps({"name": "t", "classes": ["a", "b"], "data": {"unlabeled": str(tmp_path)},
                                   "run_dir": str(run), "models": {k: str(tmp_path) for k in
                                                                   ("diffusion", "clip", "captioner", "expert")}}))
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "distillery.cli", "export", "--job", str(job)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and "in use by another distillery run" in out.stderr
        assert f"pid {holder.pid}" in out.stderr and info["started"] in out.stderr and "holder-command" in out.stderr
        assert time.time() - t0 < 60
        with pytest.raises(RunLockError, match=f"pid {holder.pid}"):
            with run_lock(run, "me"):
                pass
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid  # the refused run left it alone
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: its lock is stale and taken over, with a log line
    assert (run / LOCK_NAME).is_file()
    capfd.readouterr()
    with run_lock(run, "me") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with run_lock(run, "nested"):  # re-entrant within one process
            pass
        assert lock.is_file()
    assert "taking over the stale lock" in capfd.readouterr().err
    assert not (run / LOCK_NAME).exists()  # released


def test_lock_of_a_reused_pid_or_another_host(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    # this very process's pid, but recorded with another start time: a reused pid, so the lock is stale
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "proc_start": "1",
                                "started": "then", "command": "old"}))
    with run_lock(run):
        pass
    # another host: cannot be checked from here, so it is refused with the way out
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then", "command": "remote"}))
    with pytest.raises(RunLockError, match="on host elsewhere"):
        with run_lock(run):
            pass
    lock.write_text("")  # unreadable: refused, says which file to delete
    with pytest.raises(RunLockError, match="does not say who holds it"):
        with run_lock(run):
            pass


def test_a_failed_stage_leaves_no_empty_run_folder(tmp_path):
    run = tmp_path / "new-run"
    with pytest.raises(ValueError):
        with run_lock(run):
            raise ValueError("boom")
    assert not run.exists()


def test_killed_write_temp_files_are_cleaned(tmp_path):
    d = tmp_path / "student"
    d.mkdir()
    (d / ".checkpoint.pt.ab12cd_9.tmp.pt").write_bytes(b"")
    (d / ".metrics.json.zz99yy88.tmp.json").write_bytes(b"{")
    keep = [".student.stamp.json", "checkpoint.pt", "model.safetensors", ".hidden.tmp"]
    for k in keep:
        (d / k).write_bytes(b"x")
    assert clean_temp_files(d) == [".checkpoint.pt.ab12cd_9.tmp.pt", ".metrics.json.zz99yy88.tmp.json"]
    assert sorted(p.name for p in d.iterdir()) == sorted(keep)
