"""Teachers: foundation models adapted to the domain, writing a labeled training set.

Stages run in order: ``lora`` (domain adapter for the diffusion UNet, when enabled), ``synth``
(synthetic images per class), then every *probability teacher*
with a weight > 0 in ``teacher.ensemble.weights`` (each writes ``probs/<name>.parquet``), then the
``ensemble`` (soft labels + training manifest). New teachers (AiR, LaTTe-CLIP, Vermouth) register
here and become new probability columns beside CLIP's.
"""
from __future__ import annotations

import sys
from typing import Callable, TextIO

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
    from .lora import run_lora
    from .report import write_report
    from .synth import run_synth

    _register_builtin()
    unknown = [t for t, w in job.teacher.ensemble.weights.items() if w > 0 and t not in TEACHERS]
    if unknown:
        raise ValueError(f"teacher.ensemble.weights: unknown teacher(s) {unknown}; available: {sorted(TEACHERS)}.")
    info = {}
    if job.teacher.synth.enabled:
        if job.teacher.lora.enabled:  # the adapter only serves synthesis
            info["lora"] = run_lora(job, progress)
        info["synth"] = run_synth(job, progress)
    for name, w in job.teacher.ensemble.weights.items():
        if w > 0:
            info[name] = TEACHERS[name](job, progress)
    info["ensemble"] = run_ensemble(job, progress)
    write_report(job)
    return info


def dry_run(job, out: TextIO | None = None) -> list[dict]:
    """Print, per teacher stage, the images, UNet evaluations and an estimated time; write nothing.

    The diffusion stages are timed on a short calibration run on their own device (a few training steps
    for the LoRA, one batch at 1 and 3 denoising steps for synthesis); the other stages are only counted.
    """
    from distillery.models import load_diffusion, pick_device

    from . import lora, synth

    out = out or sys.stdout
    _register_builtin()
    rows = []
    lora_pending = False
    if job.teacher.synth.enabled and job.teacher.lora.enabled:
        cfg = job.teacher.lora
        device = pick_device(cfg.device, key="teacher.lora.device")
        r = lora.estimate(job, lambda: load_diffusion(job.models.diffusion, device, half=False))
        lora_pending = r.get("note") != "up to date"
        rows.append(r)
    if job.teacher.synth.enabled:
        rows.append(synth.estimate(job, lora_pending=lora_pending))
    n_real = len(lora.unlabeled_images(job))
    for name, w in job.teacher.ensemble.weights.items():
        if w > 0:
            rows.append({"stage": name, "images": n_real, "unet_evals": 0, "estimate_s": None, "note": "not timed"})
    rows.append({"stage": "ensemble", "images": n_real, "unet_evals": 0, "estimate_s": None, "note": "not timed"})
    print(format_estimate(job, rows), file=out, flush=True)
    return rows


def format_estimate(job, rows: list[dict]) -> str:
    lines = [f"dry run of `distillery teacher` for job {job.name!r} (nothing written to {job.run_path})",
             f"{'stage':<10} {'images':>8} {'UNet evals':>12} {'est. time':>10}  note"]
    for r in rows:
        est = "-" if r.get("estimate_s") is None else _duration(r["estimate_s"])
        note = r.get("note") or ", ".join(x for x in (r.get("evals_note"), r.get("calibration")) if x)
        if r.get("s_per_unet_eval"):
            note += f"; {r['s_per_unet_eval'] * 1e3:.2f} ms per UNet eval"
        lines.append(f"{r['stage']:<10} {r['images']:>8} {r['unet_evals']:>12,} {est:>10}  {note}")
    timed = [r["estimate_s"] for r in rows if r.get("estimate_s") is not None]
    lines.append(f"{'total':<10} {'':>8} {sum(r['unet_evals'] for r in rows):>12,} {_duration(sum(timed)):>10}  "
                 "(timed stages only)")
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"
