"""Label-free health checks: the warning signs of a run that went wrong, read from the run folder alone.

Every stage can finish and still have produced something useless: labels that are noise because the models are
random, a teacher that put every image in one class, a loss that rose, an INT8 model measured on the images it was
calibrated on. :func:`check_run` looks for such signs in the files a run wrote (no labels, no models loaded) and
returns them as findings ``{"stage", "level", "code", "message"}``; the CLI prints them at the end of a stage and
the report shows them at the top of the page.

Levels: ``warning`` (something is probably wrong with the result) and ``note`` (a fact the user should know
before trusting a figure).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rundir import RunPaths, read_json, read_stamp, read_table

TINY_MARKER = ".distillery-tiny.json"  # written by distillery/tiny.py at the root of the tiny models
SHARE_LOW, SHARE_HIGH = 0.25, 4.0  # a class with < 1/4 or > 4x its expected share of the hard labels
COLLAPSE = 0.5  # a column (or the student) that puts more than half of the images in one class has collapsed


def _finding(stage: str, level: str, code: str, message: str) -> dict[str, str]:
    return {"stage": stage, "level": level, "code": code, "message": message}


def tiny_roles(job) -> list[str]:
    """The model roles ``job`` uses that point at the tiny random models (a folder under a tiny-models root)."""
    from .models import is_local, local_path

    try:  # only the roles this job's teacher stages load (a table-fed synthetic set never loads the diffusion model)
        from distillery.teacher import model_roles

        used = set(model_roles(job))
    except ImportError:
        used = {"diffusion", "clip", "captioner", "expert"}
    out = []
    for role in ("diffusion", "clip", "captioner", "expert"):
        ref = getattr(job.models, role, None) if role in used else None
        if not ref or not is_local(ref):
            continue
        p = local_path(ref).resolve()
        if any((d / TINY_MARKER).is_file() for d in (p, *p.parents)):
            out.append(role)
    return out


def _expected_shares(paths: RunPaths, n_classes: int) -> tuple[list[float], str]:
    if paths.prior.is_file():
        pr = read_json(paths.prior).get("prior")
        if pr:
            return [float(x) for x in pr], "the class prior"
    return [1.0 / n_classes] * n_classes, "an equal share"


def _histogram(labels, n: int) -> list[int]:
    counts = [0] * n
    for y in labels:
        if 0 <= int(y) < n:
            counts[int(y)] += 1
    return counts


def _teacher(job, paths: RunPaths) -> list[dict]:
    out: list[dict] = []
    names = job.class_names
    c = len(names)
    if paths.lora_loss.is_file():
        info = read_json(paths.lora_loss)
        first, last = info.get("loss_first_10pct"), info.get("loss_last_10pct")
        if first is not None and last is not None and last > first:
            out.append(_finding("teacher", "warning", "lora_loss_rose",
                                f"the domain LoRA's loss rose ({first:.4f} over the first 10% of steps -> {last:.4f} "
                                "over the last): lower teacher.lora.lr or check the unlabeled images"))
    if not paths.pseudo_labels.is_file():
        return out
    rows = read_table(paths.pseudo_labels)
    if not rows:
        return out
    n = len(rows)
    expected, what = _expected_shares(paths, c)
    for key in [k for k in rows[0] if k.startswith("p_")]:
        hist = _histogram([max(range(c), key=lambda i, r=r: r[key][i]) for r in rows], c)
        top = max(range(c), key=lambda i: hist[i])
        if hist[top] / n > max(COLLAPSE, min(0.9, SHARE_HIGH * expected[top])):
            out.append(_finding("teacher", "warning", "column_collapsed",
                                f"teacher column {key[2:]!r} puts {hist[top]} of {n} images ({hist[top] / n:.0%}) in "
                                f"{names[top]!r}"))
    labels = [r["label"] for r in rows]
    hist = _histogram(labels, c)
    top = max(range(c), key=lambda i: hist[i])
    if hist[top] / n > COLLAPSE and c > 2:
        out.append(_finding("teacher", "warning", "ensemble_collapsed",
                            f"the ensemble labels {hist[top]} of {n} images ({hist[top] / n:.0%}) {names[top]!r}: the "
                            "training set is nearly one class"))
    for i, name in enumerate(names):
        share = hist[i] / n
        if expected[i] * n < 5:  # too few expected images to judge a share
            continue
        if share < SHARE_LOW * expected[i] or share > SHARE_HIGH * expected[i]:
            out.append(_finding("teacher", "warning", "class_share",
                                f"class {name!r} receives {hist[i]} of {n} pseudo-labels ({share:.1%}) against "
                                f"{expected[i]:.1%} expected ({what})"))
    st = read_stamp(paths.teacher, "ensemble")
    weights = st.get("weights") or {}
    det = st.get("weights_details") or {}
    for col, why in (det.get("dropped") or {}).items():
        out.append(_finding("teacher", "warning", "teacher_dropped", f"teacher column {col!r} left out of the "
                                                                     f"ensemble: {why}"))
    ran = [k[2:] for k in rows[0] if k.startswith("p_")]
    zero = [k for k in ran if k not in weights and k not in (det.get("dropped") or {})]
    if zero and weights:
        out.append(_finding("teacher", "note", "teacher_unweighted",
                            f"column(s) {', '.join(zero)} ran but have no weight in the ensemble "
                            f"({st.get('weights_why', '')})"))
    if det.get("note"):
        out.append(_finding("teacher", "note", "ensemble_weights", f"ensemble weights: {det['note']}"))
    if paths.prior.is_file():
        pr = read_json(paths.prior)
        if pr.get("requested") != pr.get("mode"):
            out.append(_finding("teacher", "note", "prior_fallback", f"class prior: {pr.get('why')}"))
        shares = pr.get("prior") or []
        if pr.get("mode") == "estimated" and shares:
            top = max(range(len(shares)), key=lambda i: shares[i])
            rare = [names[i] for i, x in enumerate(shares) if x < SHARE_LOW / len(shares)]
            if shares[top] > COLLAPSE or rare:
                out.append(_finding("teacher", "warning", "prior_extreme",
                                    f"the estimated class prior is far from even ({names[top]!r} {shares[top]:.0%}"
                                    + (f"; under a quarter of an equal share: {', '.join(rare)}" if rare else "")
                                    + "): it comes from the synthetic images' class means; if your classes are about "
                                      "equally common, set teacher.prior.mode=uniform"))
    return out


def _student(job, paths: RunPaths) -> list[dict]:
    out: list[dict] = []
    if not paths.student_metrics.is_file():
        return out
    m = read_json(paths.student_metrics)
    losses = [e.get("loss") for e in m.get("history", []) if isinstance(e, dict)]
    losses = [x for x in losses if isinstance(x, (int, float))]
    if len(losses) >= 2 and losses[-1] > losses[0]:
        out.append(_finding("student", "warning", "student_loss_rose",
                            f"the student's training loss rose ({losses[0]:.4f} in the first epoch -> {losses[-1]:.4f} "
                            "in the last): lower student.lr"))
    ev = m.get("eval") or {}
    cm = ev.get("confusion")
    if cm:
        pred = [sum(row[j] for row in cm) for j in range(len(cm))]
        total = sum(pred)
        top = max(range(len(pred)), key=lambda j: pred[j])
        if total and pred[top] / total > COLLAPSE and len(pred) > 2:
            out.append(_finding("student", "warning", "student_collapsed",
                                f"the student predicts {job.class_names[top]!r} for {pred[top]} of {total} evaluation "
                                f"images ({pred[top] / total:.0%}): it has collapsed to (nearly) one class"))
    return out


def _export(job, paths: RunPaths) -> list[dict]:
    out: list[dict] = []
    if not paths.export_report.is_file():
        return out
    r = read_json(paths.export_report)
    q = (r.get("int8_quantization") or {}).get("qat") or {}
    if q and not q.get("used") and q.get("why"):
        out.append(_finding("export", "note", "qat_skipped", f"INT8 quantisation-aware fine-tuning not used: {q['why']}"))
    overlap = r.get("calibration_overlaps_parity")
    if overlap:
        out.append(_finding("export", "warning", "parity_on_calibration",
                            f"{overlap} of the {len(r.get('parity_images') or [])} parity images were also INT8 "
                            "calibration images (too few unlabeled images to keep them apart): the INT8 agreement is "
                            "measured partly on images it was calibrated on"))
    for fmt, f in (r.get("formats") or {}).items():
        if f.get("built") is False and f.get("why"):
            out.append(_finding("export", "note", "format_not_built", f"{fmt} not built: {f['why']}"))
        elif f.get("built") and f.get("passed") is False:
            out.append(_finding("export", "warning" if f.get("required") else "note", "gate_failed",
                                f"{fmt} failed its gate: top-1 agreement {f.get('agreement')} < "
                                f"{f.get('min_agreement')}"))
    return out


def check_run(job, stages: tuple[str, ...] = ("teacher", "student", "export")) -> list[dict]:
    """The findings for ``stages`` of ``job``'s run folder (plus the tiny-model note whenever it applies)."""
    paths = RunPaths(job.run_path)
    out: list[dict] = []
    tiny = tiny_roles(job)
    if tiny:
        out.append(_finding("job", "warning", "tiny_models",
                            f"the models ({', '.join(tiny)}) are the tiny random ones (models/tiny): the pseudo-labels "
                            "are noise and every accuracy is chance. They show the machinery; point the model roles "
                            "at real weights (examples/eurosat.yaml) for a useful model"))
    for stage, fn in (("teacher", _teacher), ("student", _student), ("export", _export)):
        if stage in stages:
            try:
                out += fn(job, paths)
            except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
                out.append(_finding(stage, "note", "unreadable", f"health checks could not read the {stage} files "
                                                                 f"({type(e).__name__}: {e})"))
    return out


def format_findings(findings: list[dict[str, Any]]) -> str:
    """One line per finding, warnings first, for the terminal."""
    order = sorted(findings, key=lambda f: f["level"] != "warning")
    return "\n".join(f"{f['level']}: [{f['stage']}] {f['message']}" for f in order)
