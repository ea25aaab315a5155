"""The deploy choice: of the formats that passed their parity gate, the fastest on this machine's CPU
(a less precise one must be ``export.deploy_tolerance`` faster to win)."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from .parity import time_formats

__all__ = ["choose_deploy", "PRECISION_ORDER"]

PRECISION_ORDER = ("fp32", "fp16", "int8")  # most precise first: the deploy choice's tie-break


def _gate_figures(res: dict) -> dict:
    keep = ("built", "passed", "agreement", "min_agreement", "max_abs_diff", "mean_abs_diff", "n_images", "error")
    return {k: res[k] for k in keep if k in res}


def choose_deploy(gates: dict[str, dict], files: dict[str, Path], images: np.ndarray, *, seconds: float = 1.0,
                  tolerance: float = 0.05, timer=time_formats) -> dict[str, Any]:
    """Pick the format to deploy: the fastest of those that passed their parity gate, on this machine's CPU.

    ``gates``: the report's per-format results (``built``, ``passed``, ``agreement``, ``min_agreement`` ...).
    ``timer(files, images, seconds) -> {format: ms per image}`` (:func:`time_formats`; injectable for tests).
    A format that failed (or was not built) is never timed or chosen. A less precise format wins only when
    it is more than ``tolerance`` faster than every more precise passing one; ``seconds <= 0`` skips timing
    and deploys the most precise passing format. Returns the report's ``deploy`` entry.
    """
    passing = [f for f in PRECISION_ORDER if f in gates and gates[f].get("built", True) and gates[f].get("passed")]
    others = []
    for f in (f for f in PRECISION_ORDER if f in gates and f not in passing):
        g = gates[f]
        others.append(f"{f} not built ({g.get('error', 'failed')})" if not g.get("built", True) else
                      f"{f} failed its gate (agreement {g['agreement']:.4f} < {g['min_agreement']})")
    entry: dict[str, Any] = {"format": None, "file": None, "path": None, "why": "", "timings_ms": {},
                             "speed_vs_fp32": {}, "provider": "CPUExecutionProvider", "batch": 1,
                             "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs", "tolerance": tolerance,
                             "gates": {f: _gate_figures(g) for f, g in gates.items()}}
    if not passing:
        entry["why"] = "no format passed its parity gate" + (f" ({'; '.join(others)})" if others else "")
        return entry
    if seconds > 0:
        budget = seconds if len(passing) > 1 else 0.0  # one candidate: a few rounds, just to report its time
        timings = {f: float(t) for f, t in timer({f: files[f] for f in passing}, images, budget).items()}
        missing = [f for f in passing if not (f in timings and np.isfinite(timings[f]) and timings[f] > 0)]
        if missing:
            raise ValueError(f"deploy timing returned no usable time for {missing}: {timings}")
        fastest = min(timings[f] for f in passing)
        chosen = next(f for f in passing if timings[f] <= fastest * (1 + tolerance))  # most precise near the best
        entry["timings_ms"] = {f: round(timings[f], 4) for f in passing}
        if "fp32" in timings:
            entry["speed_vs_fp32"] = {f: round(timings["fp32"] / timings[f], 3) for f in passing}
        t = timings[chosen]
        if len(passing) == 1:
            why = f"the only format that passed its gate ({t:.2f} ms/image)"
        elif timings[chosen] == fastest:
            why = f"the fastest format that passed its gate ({t:.2f} ms/image)"
        else:
            why = (f"the most precise format within {tolerance:.0%} of the fastest passing one "
                   f"({t:.2f} ms/image)")
        for f in passing:
            if f == chosen:
                continue
            ratio = t / timings[f]  # f's speed relative to the chosen format
            if timings[f] < t:
                others.insert(0, f"{f} passed its gate and ran {ratio:.2f}x {chosen}'s speed, within the "
                                 f"{tolerance:.0%} tolerance")
            else:
                others.insert(0, f"{f} passed its gate but ran {ratio:.2f}x {chosen}'s speed")
        why += " on this CPU (onnxruntime, batch 1)"
    else:
        chosen = passing[0]
        why = "the most precise format that passed its gate (export.deploy_timing_s is 0: no timing)"
        others = [f"{f} passed its gate, not timed" for f in passing[1:]] + others
    entry.update(format=chosen, file=files[chosen].name, path=str(files[chosen]),
                 why=f"{chosen}: {why}" + (f"; {'; '.join(others)}" if others else ""))
    return entry
