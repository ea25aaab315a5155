"""Multi-process training: which rank this is, the process group, and the ``torchrun`` launch.

``distillery student --nproc N`` (``make student NPROC=N``) starts N processes through torch's own launcher
(``python -m torch.distributed.run --standalone --nproc-per-node N -m distillery.student.worker ...``, an argument
list, never a shell string). Each worker (``student/worker.py``) joins a process group (gloo on CPU, NCCL on CUDA)
and runs the same ``train_student``; ``student/train.py`` wraps the model in DistributedDataParallel and gives
each rank its share of every global batch. Rank/world come from the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``); without them this is rank 0 of 1 and nothing here changes a run.

Every file the student stage writes (checkpoints, weights, config, metrics, report, the decode cache) is written
by rank 0 only. A rank that dies makes torchrun stop the others; a collective that waits on a lost peer gives up
after ``DISTILLERY_DIST_TIMEOUT_S`` seconds (default 1800); a worker whose launcher is killed is killed too
(Linux ``PR_SET_PDEATHSIG``), so a SIGKILL of ``distillery student`` leaves no orphan training on.
"""
from __future__ import annotations

import os
import sys

__all__ = ["get_dist_info", "is_main", "init_distributed", "shutdown", "barrier", "all_reduce_sum", "launch",
           "check_nproc", "kill_hook", "die_with_parent"]

KILL_AFTER_STEP = "DISTILLERY_TEST_KILL_AFTER_STEP"  # tests: SIGKILL the launcher once this global step is saved
LAUNCHER_PID = "DISTILLERY_LAUNCHER_PID"  # set by launch(): the process the kill hook kills


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun "
                         "(unset it for a single-process run).") from None


def get_dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment; ``(0, 1, 0)`` when not launched by torchrun."""
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}: need WORLD_SIZE >= 1, "
                         "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 (torchrun sets them).")
    return rank, world_size, local_rank


def is_main() -> bool:
    """True in the process that writes files: rank 0 (the only one without torchrun)."""
    return get_dist_info()[0] == 0


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "cpu") -> bool:
    """Join the process group when launched with ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA); returns whether
    this run is multi-process. Idempotent."""
    import datetime

    import torch
    import torch.distributed as dist

    rank, world, local_rank = get_dist_info()
    if world == 1:
        return False
    if _initialized():
        return True
    cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=_env_int("DISTILLERY_DIST_TIMEOUT_S", 1800))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    return True


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor):
    """Sum ``tensor`` over ranks in place and return it (unchanged in a single process)."""
    if _initialized():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def kill_hook(global_step: int) -> None:
    """Tests only: with ``DISTILLERY_TEST_KILL_AFTER_STEP=k``, SIGKILL the launcher (else this process) right
    after the checkpoint of global step ``k`` was written, to interrupt a run at a chosen point of progress."""
    want = os.environ.get(KILL_AFTER_STEP, "")
    if want and int(want) == global_step:
        import signal

        launcher = _env_int(LAUNCHER_PID, os.getpid())
        os.kill(launcher, signal.SIGKILL)
        if launcher != os.getpid():  # and this rank at once: on a loaded machine it could otherwise write the next
            os.kill(os.getpid(), signal.SIGKILL)  # checkpoint before its parent-death signal arrives


def check_nproc(nproc: int, cores: int | None = None) -> str | None:
    """Validate ``--nproc``: an error for ``< 1``; returns a warning line when it exceeds the CPU cores."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"--nproc: need a whole number of processes >= 1, got {nproc!r} (1 = one process, as "
                         "without --nproc).")
    cores = os.cpu_count() if cores is None else cores
    if cores and nproc > cores:
        return (f"student: --nproc {nproc} is more processes than this machine's {cores} CPU cores; they will "
                "share cores (slower, not wrong).")
    return None


def launch(job_file: str, overrides: list[str], nproc: int, progress: bool = True) -> int:
    """Run the student stage in ``nproc`` processes through ``torch.distributed.run``; returns its exit code.

    The command is an argument list (no shell); the job file and overrides are passed through unchanged."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "distillery.student.worker", "--job", str(job_file)]
    if not progress:
        cmd.append("--no-progress")
    cmd += ["--", *overrides]
    env = dict(os.environ, **{LAUNCHER_PID: str(os.getpid())})
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, stated so it does not warn about it
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C or an error here: do not leave the launcher and its workers running
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def die_with_parent() -> None:
    """In a child process (Linux): receive SIGKILL when the parent dies, so no rank outlives its launcher."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the process-group timeout still bounds a hang
        return
