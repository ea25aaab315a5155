"""The student on two CPU processes (torchrun, gloo, DDP): it trains, rank 0 alone writes, the decode cache is
built once, a SIGKILL of the launcher after a step checkpoint then a rerun resumes to the weights of an
uninterrupted 2-process run, the accuracy lands in the band of one process, and ``--nproc 1`` is today's path
(byte-identical weights).

Writes are observed, not patched: a ``sitecustomize.py`` on ``PYTHONPATH`` installs a Python audit hook in every
torchrun worker (``RANK`` set) that records each file opened for writing, renamed, removed or made under the
test's folder, in a log per rank and pid (the pid also lets the test check no worker outlives a killed launcher).
safetensors writes from Rust, so the weights file is not seen; checkpoints, JSON, report and cache are.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml

from distillery.job import job_from_dict
from distillery.rundir import RunPaths, write_table
from tests.test_student import CLASSES, COLORS, MODEL, SCHEMA, _png, _rows

REPO = Path(__file__).resolve().parents[1]
# batch 12 = 6 images per rank: BatchNorm statistics are per rank, and at 3 images they make the 2-process run a
# much noisier learner than one process on this tiny set
STUDENT = {"model": MODEL, "epochs": 16, "batch_size": 12, "input_size": 32, "lr": 1e-3, "checkpoint_steps": 1}
STEPS = 2  # 17 images, batch 12 -> batches of 12 and 5 (6+6, then 3+2 per rank)
KILL_STEP = 19  # epoch 9, step 1

AUDIT = '''
import os, sys
if os.environ.get("RANK") is not None and os.environ.get("DDP_TEST_LOG"):
    _root = os.environ["DDP_TEST_ROOT"]
    _log = open(os.path.join(os.environ["DDP_TEST_LOG"], f"rank{os.environ['RANK']}-{os.getpid()}.log"), "a",
                buffering=1)
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _W)):
                return
            paths = [path]
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.truncate"):
            paths = args[:2] if event == "os.rename" else args[:1]
        else:
            return
        for p in paths:
            p = os.fsdecode(p) if isinstance(p, (str, bytes, os.PathLike)) else ""
            if p.startswith(_root):
                _log.write(f"{event} {p}\\n")

    sys.addaudithook(_hook)
'''


def _job_file(tmp_path: Path, name: str) -> tuple[Path, object]:
    """A job file (absolute paths) over the tiny colour data of tests/test_student.py, with its manifest."""
    unlabeled, eval_dir = tmp_path / "unlabeled", tmp_path / "eval"
    if not eval_dir.exists():
        for c, color in enumerate(COLORS):
            for k in range(4):
                _png(eval_dir / CLASSES[c].upper() / f"{k}.png", color, seed=100 + 10 * c + k)
    unlabeled.mkdir(exist_ok=True)
    raw = {"name": name, "classes": [{"name": c, "folder": c.upper()} for c in CLASSES],
           "data": {"unlabeled": str(unlabeled), "eval": str(eval_dir)}, "run_dir": str(tmp_path / "runs" / name),
           "student": dict(STUDENT)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    job = job_from_dict(raw, base=tmp_path)
    write_table(RunPaths(job.run_path).manifest, _rows(unlabeled, per_class=6), schema=SCHEMA)
    return path, job


def _launch(tmp_path: Path, job_file: Path, log_dir: Path, kill_step: int | None = None):
    """``distillery student --nproc 2`` in a subprocess, with the audit hook; returns the finished process."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DDP_TEST_LOG=str(log_dir),
               DDP_TEST_ROOT=str(tmp_path / "runs"),
               PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("DISTILLERY_TEST_KILL_AFTER_STEP", None)
    if kill_step is not None:
        env["DISTILLERY_TEST_KILL_AFTER_STEP"] = str(kill_step)
    cmd = [sys.executable, "-m", "distillery.cli", "student", "--job", str(job_file), "--nproc", "2", "--no-progress",
           "--no-report"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)


def _writes(log_dir: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for f in sorted(log_dir.glob("rank*-*.log")):
        rank = int(f.name[4:].split("-")[0])
        out.setdefault(rank, []).extend(f.read_text().splitlines())
    return out


def _weights(job):
    from safetensors.torch import load_file

    return load_file(str(RunPaths(job.run_path).student_weights))


def _max_diff(a: dict, b: dict) -> tuple[float, float, str]:
    assert a.keys() == b.keys()
    diffs = {k: (a[k].float() - b[k].float()).abs() for k in a}
    worst = max(diffs, key=lambda k: diffs[k].max().item())
    mean = sum(d.sum().item() for d in diffs.values()) / sum(d.numel() for d in diffs.values())
    return diffs[worst].max().item(), mean, worst


def test_nproc_is_checked():
    from distillery.cli import main
    from distillery.student.dist import check_nproc

    with pytest.raises(ValueError, match="--nproc: need a whole number of processes >= 1, got 0"):
        check_nproc(0)
    assert check_nproc(2, cores=2) is None
    assert "more processes than this machine's 2 CPU cores" in check_nproc(3, cores=2)
    assert main(["student", "--job", str(REPO / "examples/eurosat-tiny.yaml"), "--nproc", "0"]) == 2


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One process, in this process: through the CLI with --nproc 1 and through train_student directly."""
    from distillery.cli import main
    from distillery.student import train_student

    tmp = tmp_path_factory.mktemp("ddp")
    cli_file, cli_job = _job_file(tmp, "one-cli")
    _, direct_job = _job_file(tmp, "one-direct")
    assert main(["student", "--job", str(cli_file), "--nproc", "1", "--no-progress", "--no-report"]) == 0
    metrics = train_student(direct_job, progress=False)
    return tmp, cli_job, direct_job, metrics


def test_nproc_1_is_the_single_process_path(one_process):
    _, cli_job, direct_job, metrics = one_process
    a, b = (RunPaths(j.run_path).student_weights.read_bytes() for j in (cli_job, direct_job))
    assert a == b, "--nproc 1 weights differ from train_student's"
    assert metrics["processes"] == 1


def test_two_processes_train_write_once_resume_and_match(one_process):
    tmp, _, _, one = one_process
    # uninterrupted 2-process run
    job_file, job = _job_file(tmp, "two")
    logs = tmp / "logs-two"
    t0 = time.perf_counter()
    r = _launch(tmp, job_file, logs)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    paths = RunPaths(job.run_path)
    metrics = json.loads(paths.student_metrics.read_text())
    assert metrics["processes"] == 2 and len(metrics["history"]) == STUDENT["epochs"]
    assert metrics["train_images"] == 17 and metrics["images_per_s"] > 0
    # every image of every epoch counted once over both ranks
    assert metrics["images_per_s"] * metrics["wall_time_s"] == pytest.approx(17 * STUDENT["epochs"])
    for p in (paths.student_weights, paths.student_config, paths.student / "checkpoint.pt",
              paths.student / "report.md", paths.student / "confusion.png"):
        assert p.is_file(), p

    # only rank 0 writes (the hook saw rank 0's writes, so it works), and no rank-1 log line says "wrote"
    writes = _writes(logs)
    assert set(writes) == {0, 1}, writes.keys()
    assert any("checkpoint.pt" in w for w in writes[0]) and any("metrics.json" in w for w in writes[0])
    assert writes[1] == [], writes[1][:5]
    assert r.stderr.count("student: done;") == 1

    # the decode cache built once: one decoding line, one slot per image (two writers would append twice)
    assert r.stderr.count("student: decoding 17 images once") == 1, r.stderr[-2000:]
    pixels = next((Path(job.run_path) / "cache").glob("decode-*/pixels.u8"))
    assert pixels.stat().st_size == 17 * 32 * 32 * 3
    assert sum("pixels.u8" in w for w in writes[0]) >= 1

    # accuracy in the band of one process (tiny eval: 12 images, so steps of 0.083)
    top1_1, top1_2 = one["eval"]["top1"], metrics["eval"]["top1"]
    assert top1_1 >= 0.5 and top1_2 >= 0.5 and abs(top1_1 - top1_2) <= 0.25, (top1_1, top1_2)

    # killed: SIGKILL of the launcher right after the checkpoint of global step KILL_STEP, then rerun
    job_file, killed = _job_file(tmp, "killed")
    klogs = tmp / "logs-killed"
    r = _launch(tmp, job_file, klogs, kill_step=KILL_STEP)
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    kpaths = RunPaths(killed.run_path)
    assert (kpaths.student / "checkpoint.pt").is_file() and not kpaths.student_weights.exists()
    pids = [int(f.stem.split("-")[1]) for f in klogs.glob("rank*-*.log")]
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:  # the workers die with their launcher (PR_SET_PDEATHSIG)
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived their killed launcher"
    r = _launch(tmp, job_file, tmp / "logs-resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads(kpaths.student_metrics.read_text())
    assert resumed["resumed_from"] == {"epoch": KILL_STEP // STEPS, "step": KILL_STEP % STEPS}, resumed["resumed_from"]
    assert "resuming from" in r.stderr
    worst, mean, name = _max_diff(_weights(job), _weights(killed))
    assert worst <= 1e-5, f"resumed vs uninterrupted 2-process weights: max diff {worst:.3g} ({name}), mean {mean:.3g}"
    print(f"2-process run {seconds:.1f}s; top-1 one process {top1_1:.3f}, two {top1_2:.3f}; resumed max diff {worst:.3g}")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
