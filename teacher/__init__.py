"""Teachers: foundation models adapted to the domain, writing a labeled training set.

Stages run in order:

1. ``lora`` (domain adapter for the diffusion UNet, when synthesis and the LoRA are enabled),
2. ``synth`` (synthetic images per class; ``teacher.synth.source: table`` uses a ``synthetic.parquet`` placed in
   the run folder instead of generating one),
3. every enabled *probability teacher* and what it needs, in need order (:mod:`.base`): each is one module
   that registers itself (``clip`` now) and writes ``probs/<column>.parquet``,
4. the ``ensemble`` (soft labels + training manifest),
5. with ``data.eval``: each column's top-1 on the evaluation images (``teacher/eval.json``, evaluation only),
6. ``teacher/report.md``.

The unlabeled images are listed, hashed and checked once (:func:`distillery.images.unlabeled_set`) and
shared by every stage; per-image model work goes through the job's executor (:mod:`distillery.executor`).
"""
from __future__ import annotations

import sys
from typing import TextIO

from .base import (TEACHERS, TeacherContext, TeacherResult, TeacherSettings, all_columns, register_teacher,
                   run_teachers, teachers_to_run)
from . import clip as _clip  # noqa: F401,E402  (importing a teacher module registers it)
from . import air as _air  # noqa: F401,E402
from . import latte as _latte  # noqa: F401,E402
from . import vermouth as _vermouth  # noqa: F401,E402
from . import transduct as _transduct  # noqa: F401,E402

__all__ = ["TEACHERS", "TeacherContext", "TeacherResult", "TeacherSettings", "register_teacher", "all_columns",
           "teachers_to_run", "run_teacher", "dry_run", "model_refs", "model_roles"]


def model_roles(job) -> dict[str, str]:
    """role -> reference for every model role the teacher stages of ``job`` will load (checked before any work)."""
    roles = {}
    if generates(job):
        roles["diffusion"] = job.models.diffusion
    for name in teachers_to_run(job):
        roles.update({r: getattr(job.models, r) for r in TEACHERS[name].roles})
    return roles


def model_refs(job) -> list[str]:
    """Every model reference the teacher stages of ``job`` will load (checked before any work)."""
    return list(dict.fromkeys(model_roles(job).values()))


def generates(job) -> bool:
    """Whether this job runs the diffusion model (synthesis on, source "generate")."""
    return job.teacher.synth.enabled and job.teacher.synth.source == "generate"


def synthetic_rows(job) -> tuple[list[dict] | None, object]:
    """The synthetic set the teachers and the ensemble use (None, None with synthesis off): the one synthesis
    wrote, or with ``teacher.synth.source: table`` the ``synthetic.parquet`` placed in the run folder."""
    from distillery.rundir import RunPaths, read_table

    if not job.teacher.synth.enabled:
        return None, None
    paths = RunPaths(job.run_path)
    if not paths.synthetic.is_file():
        raise FileNotFoundError(f"teacher.synth.source: table, but {str(paths.synthetic)!r} does not exist; put "
                                "the synthetic table there (columns path, sha256, class_index, class_name, trick, "
                                "index, seed) or use teacher.synth.source=generate.")
    return read_table(paths.synthetic, "synthetic table"), paths.synthetic


def run_teacher(job, progress: bool = True) -> dict:
    """Run every teacher stage of ``job``; each skips itself when its inputs and settings are unchanged."""
    from distillery.executor import get_executor
    from distillery.images import eval_set, unlabeled_set
    from distillery.rundir import log

    from .ensemble import evaluate_columns, run_ensemble
    from .lora import run_lora
    from .report import write_report
    from .synth import run_synth

    images = unlabeled_set(job)
    executor = get_executor(job)
    info: dict = {"images": len(images), "skipped": len(images.skipped)}
    if generates(job):
        if job.teacher.lora.enabled:  # the adapter only serves synthesis
            info["lora"] = run_lora(job, progress, images=images)
        info["synth"] = run_synth(job, progress, executor=executor)
    synthetic, synthetic_file = synthetic_rows(job)
    if synthetic is not None and not generates(job):
        log(f"synth: source=table; using the synthetic set in {synthetic_file} as given ({len(synthetic)} rows)")
    evals = eval_set(job)
    out = run_teachers(job, images, evals, executor, progress, synthetic, synthetic_file)
    info.update(out["info"])
    info["ensemble"] = run_ensemble(job, progress, images=images, synthetic=synthetic, synthetic_file=synthetic_file)
    if evals is not None:
        info["eval"] = evaluate_columns(job, evals, out["eval_columns"], info["ensemble"].get("weights"),
                                        out.get("uncorrected_eval_columns"),
                                        (info["ensemble"].get("weights_details") or {}).get("estimated_accuracy"),
                                        info["ensemble"].get("fused_bias"))
    write_report(job, images)
    return info


def dry_run(job, out: TextIO | None = None) -> list[dict]:
    """Print, per teacher stage, the images, UNet evaluations and an estimated time; write nothing.

    The diffusion stages are timed on a short calibration run on their own device (a few training steps
    for the LoRA, one batch at 1 and 3 denoising steps for synthesis); the other stages are only counted.
    """
    from distillery.images import unlabeled_set
    from distillery.models import load_diffusion, pick_device

    from . import lora, synth

    out = out or sys.stdout
    images = unlabeled_set(job, record=False)
    rows = []
    lora_pending = False
    if generates(job) and job.teacher.lora.enabled:
        cfg = job.teacher.lora
        device = pick_device(cfg.device, key="teacher.lora.device")
        r = lora.estimate(job, lambda: load_diffusion(job.models.diffusion, device, half=False), images=images)
        lora_pending = r.get("note") != "up to date"
        rows.append(r)
    if generates(job):
        rows.append(synth.estimate(job, lora_pending=lora_pending))
    for name in teachers_to_run(job):
        rows.append({"stage": name, "images": len(images), "unet_evals": 0, "estimate_s": None, "note": "not timed"})
    rows.append({"stage": "ensemble", "images": len(images), "unet_evals": 0, "estimate_s": None, "note": "not timed"})
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
