"""Teachers: foundation models adapted to the domain, writing a labeled training set.

Stages run in order: ``synth`` (synthetic images per class), then every *probability teacher*
with a weight > 0 in ``teacher.ensemble.weights`` (each writes ``probs/<name>.parquet``), then the
``ensemble`` (soft labels + training manifest). New teachers (AiR, LaTTe-CLIP, Vermouth) register
here and become new probability columns beside CLIP's.
"""
from __future__ import annotations

from typing import Callable

TEACHERS: dict[str, Callable] = {}


def register_teacher(name: str):
    def deco(fn: Callable) -> Callable:
        TEACHERS[name] = fn
        return fn
    return deco


def _register_builtin() -> None:
    from .clip import run_clip

    register_teacher("clip")(run_clip)


def run_teacher(job, progress: bool = True) -> dict:
    """Run every teacher stage of ``job``; each skips itself when its inputs and settings are unchanged."""
    from .ensemble import run_ensemble
    from .synth import run_synth

    _register_builtin()
    unknown = [t for t, w in job.teacher.ensemble.weights.items() if w > 0 and t not in TEACHERS]
    if unknown:
        raise ValueError(f"teacher.ensemble.weights: unknown teacher(s) {unknown}; available: {sorted(TEACHERS)}.")
    info = {}
    if job.teacher.synth.enabled:
        info["synth"] = run_synth(job, progress)
    for name, w in job.teacher.ensemble.weights.items():
        if w > 0:
            info[name] = TEACHERS[name](job, progress)
    info["ensemble"] = run_ensemble(job, progress)
    return info
