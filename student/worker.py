"""One ``torchrun`` worker of ``distillery student --nproc N``: ``python -m distillery.student.worker --job FILE``.

Kept apart from ``student/dist.py`` so that ``-m`` runs a module the package has not imported yet.
"""
from __future__ import annotations

import os
import sys

from .dist import die_with_parent, init_distributed, is_main, shutdown

__all__ = ["worker_main"]


def worker_main(argv: list[str] | None = None) -> int:
    """One torchrun worker: join the process group, run the student stage, leave the group."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distillery.student.worker",
                                     description="A torchrun worker of `distillery student --nproc N`.")
    parser.add_argument("--job", required=True)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the launcher died before the death signal was armed
        return 1
    from distillery.job import load_job

    from .train import train_student

    job = load_job(args.job, args.overrides)
    init_distributed(job.student.device)
    try:
        train_student(job, progress=not args.no_progress and is_main())
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
