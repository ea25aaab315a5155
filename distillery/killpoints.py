"""Kill points: a testing hook that makes a stage command SIGKILL itself at a chosen point of progress.

Users never need this. ``tests/test_crash.py`` uses it to kill real ``distillery`` processes at exact places
(after the k-th LoRA step, after the k-th synthetic image is committed, between a temporary file's write and its
rename, ...) instead of after a wall-clock sleep, then reruns them and checks that the run ends with the
artefacts of an uninterrupted run.

The stages call :func:`progress` at their natural points::

    progress("lora.step", step)        # explicit k: fires when k equals the one asked for
    progress("ensemble.pseudo_labels") # no k: the n-th call of that name in this process is k = n

Arm it with an environment variable (read once, at import)::

    DISTILLERY_KILL_AT=lora.step:3                 # kill after LoRA step 3
    DISTILLERY_KILL_AT=synth.image:5,lora.step:9   # whichever comes first

A matching call writes one line to stderr (``[distillery] kill point lora.step:3: SIGKILL``, flushed, so a test
can tell which point fired) and sends SIGKILL to its own process: no ``finally``, no atexit, no flush of
anything else -- what a power cut or the OOM killer does to the process. Unset, :func:`progress` is a global
lookup and a return.

:func:`atomic_path <distillery.rundir.atomic_path>` has a kill point of its own, ``write.<file name>``
(``write.manifest.parquet:1``): after the temporary file is complete and before it is renamed, so a test can
leave the temporary file of a write that never finished behind.

Every name called in the code base is listed in the README's "Crash safety" paragraph.
"""
from __future__ import annotations

import os
import signal
import sys

__all__ = ["ENV", "armed", "progress"]

ENV = "DISTILLERY_KILL_AT"


def _parse(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, k = item.rpartition(":")
        if not sep or not name or not k.isdigit() or int(k) < 1:
            raise ValueError(f"{ENV}: {item!r} is not name:k with k >= 1 (e.g. lora.step:3); unset it to run "
                             "normally (it is a testing hook).")
        out[name] = int(k)
    return out


_AT: dict[str, int] = _parse(os.environ.get(ENV))
_COUNTS: dict[str, int] = {}


def armed() -> bool:
    """Whether any kill point is set (lets a caller skip building a name)."""
    return bool(_AT)


def progress(name: str, k: int | None = None) -> None:
    """A point of progress ``name`` (its ``k``-th occurrence); SIGKILLs this process when it is the one set in
    ``DISTILLERY_KILL_AT``. ``k`` None counts the calls of ``name`` in this process (1, 2, ...)."""
    if not _AT:
        return
    if k is None:
        k = _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _AT.get(name) == k:
        sys.stderr.write(f"[distillery] kill point {name}:{k}: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
