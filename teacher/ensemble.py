"""Fuse the teachers' probability columns into soft labels, and write the training manifest (SPEC §6).

Each teacher ``t`` wrote ``teacher/probs/<t>.parquet`` (path, sha256, probs). For every real image:

    soft_target = Σ_t w_t p_t / Σ_t w_t,   label = argmax soft_target,   confidence = max soft_target,
    agreement   = share of teachers whose own argmax equals ``label``.

``pseudo_labels.parquet`` keeps one ``p_<teacher>`` column per teacher beside the fused result.
``manifest.parquet`` is the training set: real images with their soft targets, and synthetic
images with their generating class as a one-hot target; each row records the temperature its soft
target was written at (1), for the student's distillation contract.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from distillery.rundir import RunPaths, cached_stage, log, stage_key, write_json, write_table

SOFT_TARGET_TEMPERATURE = 1.0  # the soft targets are written at temperature 1 (recorded per manifest row)
VERSION = "2"  # bump when the fusion changes what it computes (2: Dawid-Skene weights, prior matching), so stamps rerun


def fuse(probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of per-teacher (N, C) probabilities; columns with weight 0 (or no weight) are ignored."""
    used = {t: w for t, w in weights.items() if w > 0}
    missing = [t for t in used if t not in probs]
    if missing:
        raise ValueError(f"teacher.ensemble.weights names {missing} but no probabilities were computed for them; "
                         f"available: {sorted(probs)}. Set their weight to 0 or enable those teachers.")
    total = sum(used.values())
    return sum(w * probs[t] for t, w in used.items()) / total


def agreement(probs: dict[str, np.ndarray], label: np.ndarray) -> np.ndarray:
    votes = np.stack([p.argmax(axis=1) == label for p in probs.values()])
    return votes.mean(axis=0)


def columns_to_fuse(job) -> list[str]:
    """Every column of the teachers that run (each gets a ``p_<column>`` in pseudo_labels.parquet)."""
    from .base import TEACHERS, teachers_to_run

    return [c for t in teachers_to_run(job) for c in TEACHERS[t].columns]


def run_ensemble(job, progress: bool = True, *, images=None, synthetic: list[dict] | None = None,
                 synthetic_file=None) -> dict:
    """Fuse the columns into soft labels (``pseudo_labels.parquet``) and write the manifest."""
    from distillery.images import unlabeled_set

    paths = RunPaths(job.run_path)
    cfg = job.teacher.ensemble
    images = images if images is not None else unlabeled_set(job)
    cols = columns_to_fuse(job)
    files = {c: paths.probs(c) for c in cols}
    for c, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(f"ensemble: {str(f)!r} is missing; the column {c!r} has not been computed. "
                                    "Run `distillery teacher` (it runs every enabled teacher).")
    synth_used = cfg.use_synthetic and synthetic is not None
    syn_files = [paths.synthetic_probs(c) for c in cols if synth_used and paths.synthetic_probs(c).is_file()]
    inputs = list(files.values()) + ([synthetic_file] if synth_used else []) + syn_files
    if paths.prior.is_file():
        inputs.append(paths.prior)
    key = stage_key({"ensemble": asdict(cfg), "version": VERSION, "classes": job.class_names, "columns": cols, "synth": synth_used,
                     "images": list(images.sha256)}, inputs)
    return cached_stage(job, paths.teacher, "ensemble", key, [paths.pseudo_labels, paths.manifest],
                        lambda: _write_ensemble(job, images, files, synthetic if synth_used else None),
                        up_to_date=str(paths.manifest))


def read_prior(paths: RunPaths) -> np.ndarray | None:
    """The run's class prior from ``teacher/prior.json`` (written by the teacher runner), or None."""
    from distillery.rundir import read_json

    if not paths.prior.is_file():
        return None
    p = read_json(paths.prior).get("prior")
    return None if p is None else np.asarray(p, np.float64)


def synthetic_keep(job, synthetic: list[dict], weights: dict[str, float]) -> tuple[np.ndarray, dict]:
    """Which synthetic images stay: those whose generating class gets a fused probability of at least
    ``teacher.ensemble.drop_synthetic_below`` from the columns that scored the synthetic images (the weighted
    ones among them, renormalised). Returns (keep (S,) bool, info with the count dropped per class)."""
    from distillery.images import ImageSet

    from .base import read_probs

    cfg = job.teacher.ensemble
    paths = RunPaths(job.run_path)
    keep = np.ones(len(synthetic), bool)
    info = {"threshold": cfg.drop_synthetic_below, "dropped_per_class": {c: 0 for c in job.class_names}}
    if cfg.drop_synthetic_below <= 0 or not synthetic:
        return keep, {**info, "columns": []}
    syn = ImageSet([r["path"] for r in synthetic], [r["sha256"] for r in synthetic])
    have = {c: w for c, w in weights.items() if w > 0 and paths.synthetic_probs(c).is_file()}
    if not have:
        log("ensemble: no weighted column scored the synthetic images; none is dropped")
        return keep, {**info, "columns": []}
    fused = fuse({c: read_probs(paths.synthetic_probs(c), syn, f"{c} synthetic probabilities") for c in have}, have)
    cls = np.asarray([r["class_index"] for r in synthetic])
    keep = fused[np.arange(len(cls)), cls] >= cfg.drop_synthetic_below
    for c in cls[~keep]:
        info["dropped_per_class"][job.class_names[int(c)]] += 1
    return keep, {**info, "columns": sorted(have), "dropped": int((~keep).sum())}


def _write_ensemble(job, images, files: dict, synthetic: list[dict] | None) -> dict:
    from .base import ensemble_weights, read_probs

    paths = RunPaths(job.run_path)
    cfg = job.teacher.ensemble
    n_classes = len(job.classes)
    probs = {}
    for c, f in files.items():
        p = read_probs(f, images, f"{c} probabilities")
        if p.shape[1] != n_classes:
            raise ValueError(f"ensemble: column {c!r} has {p.shape[1]} classes, the job has {n_classes}; rerun it.")
        probs[c] = p
    prior = read_prior(paths)
    details: dict = {}
    weights, why = ensemble_weights(job, probs, prior, details)
    soft = fuse(probs, weights)
    if prior is not None:  # the fused target matched to the prior, hard labels assigned under it (teacher/prior.py)
        from .prior import balanced_labels, log_probs, match_prior, tie_key

        soft, _, fused_bias = match_prior(soft, prior)
        label = balanced_labels(log_probs(soft), prior, tie_key(images.sha256, job.seed))
    else:
        label, fused_bias = soft.argmax(axis=1), None
    conf = soft.max(axis=1)
    used = {c: p for c, p in probs.items() if weights.get(c, 0) > 0}
    agree = agreement(used, label)
    pl = {"path": images.str_paths, "sha256": list(images.sha256)}
    for t, p in probs.items():
        pl[f"p_{t}"] = p.astype(np.float32).tolist()
    pl.update({"soft_target": soft.astype(np.float32).tolist(), "label": label.astype(np.int64).tolist(),
               "confidence": conf.astype(np.float32).tolist(), "agreement": agree.astype(np.float32).tolist()})
    write_table(paths.pseudo_labels, pl, relative_to=paths.root)
    from distillery import killpoints

    killpoints.progress("ensemble.pseudo_labels")  # testing hook: before the manifest

    provenance = "ensemble:" + ",".join(f"{c}={weights[c]:g}" for c in sorted(used))
    rows = []
    for i in range(len(images)):
        rows.append({"path": pl["path"][i], "source": "real", "sha256": pl["sha256"][i], "label": int(label[i]),
                     "soft_target": pl["soft_target"][i],
                     "weight": float(1.0 if conf[i] >= cfg.min_confidence else 0.0),
                     "temperature": SOFT_TARGET_TEMPERATURE, "provenance": provenance})
    keep, dropped = synthetic_keep(job, synthetic or [], weights)
    n_syn = 0
    for r, k in zip(synthetic or [], keep):
        if not k:
            continue
        onehot = np.zeros(n_classes, np.float32)
        onehot[r["class_index"]] = 1.0
        rows.append({"path": r["path"], "source": "synthetic", "sha256": r["sha256"], "label": int(r["class_index"]),
                     "soft_target": onehot.tolist(), "weight": float(cfg.synthetic_weight),
                     "temperature": SOFT_TARGET_TEMPERATURE, "provenance": f"synth:{r['trick']}:seed={r['seed']}"})
        n_syn += 1
    import pyarrow as pa

    schema = pa.schema([("path", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
                        ("label", pa.int64()), ("soft_target", pa.list_(pa.float32())), ("weight", pa.float32()),
                        ("temperature", pa.float32()), ("provenance", pa.string())])
    write_table(paths.manifest, rows, schema=schema, relative_to=paths.root)
    counts = np.bincount(label, minlength=n_classes).tolist()
    info = {"real": len(images), "synthetic": n_syn, "columns": list(probs), "weights": {c: weights[c] for c in used},
            "weights_why": why, "weights_details": details, "synthetic_dropped": dropped,
            "prior": prior.round(6).tolist() if prior is not None else None,
            "fused_bias": np.round(fused_bias, 8).tolist() if fused_bias is not None else None,
            "pseudo_label_counts": dict(zip(job.class_names, counts)),
            "mean_confidence": round(float(conf.mean()), 4), "mean_agreement": round(float(agree.mean()), 4)}
    log(f"ensemble: {len(images)} real + {n_syn} synthetic rows -> {paths.manifest}; weights {info['weights']} "
        f"({why})" + (f"; dropped {dropped['dropped']} synthetic images" if dropped.get("dropped") else ""))
    return info


def _apply_bias(p: np.ndarray, b: np.ndarray) -> np.ndarray:
    from .prior import log_probs

    z = log_probs(p) + b
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Evaluation only: each column's top-1 on data.eval (the folder names are the labels; no stage trains on them).


def eval_labels(job, images) -> np.ndarray:
    """Class index per evaluation image from its top folder (ClassSpec.folder, or the class name); -1 if none."""
    from pathlib import Path

    folder_to_class = {(c.folder or c.name): i for i, c in enumerate(job.classes)}
    root = Path(job.data.eval)
    return np.array([folder_to_class.get(Path(p).relative_to(root).parts[0], -1) for p in images.paths], np.int64)


def evaluate_columns(job, images, eval_columns: dict[str, np.ndarray], weights: dict[str, float] | None = None,
                     uncorrected: dict[str, np.ndarray] | None = None, estimated: dict[str, float] | None = None,
                     fused_bias: list[float] | None = None) -> dict:
    """``teacher/eval.json``: top-1 of every column and of the ensemble (fused with ``weights``, the ones the
    ensemble stage used) on the evaluation images; with ``uncorrected`` (the columns before the class-prior
    correction) their top-1 too, and with ``estimated`` (the ensemble's label-free accuracy estimates) those
    beside the measured ones."""
    paths = RunPaths(job.run_path)
    labels = eval_labels(job, images)
    known = labels >= 0
    out = {"images": int(known.sum()), "unmatched_images": int((~known).sum()), "columns": {}}
    if not known.any() or not eval_columns:
        write_json(paths.teacher_eval, out)
        return out
    from .base import ensemble_weights

    cols = dict(eval_columns)
    weights = weights if weights is not None else ensemble_weights(job)[0]
    if all(c in cols for c, w in weights.items() if w > 0):
        cols["ensemble"] = fuse(cols, weights)
        if fused_bias is not None:  # the ensemble stage matched its fused target to the prior: so does this
            cols["ensemble"] = _apply_bias(cols["ensemble"], np.asarray(fused_bias, np.float64))
    for c, p in cols.items():
        pred = np.asarray(p).argmax(axis=1)
        per_class = {job.class_names[k]: round(float((pred[known & (labels == k)] == k).mean()), 4)
                     for k in range(len(job.classes)) if (known & (labels == k)).any()}
        out["columns"][c] = {"top1": round(float((pred[known] == labels[known]).mean()), 4), "per_class": per_class}
        if uncorrected and c in uncorrected:
            raw = np.asarray(uncorrected[c]).argmax(axis=1)
            out["columns"][c]["top1_uncorrected"] = round(float((raw[known] == labels[known]).mean()), 4)
        if estimated and c in estimated:
            out["columns"][c]["estimated_accuracy"] = estimated[c]
    write_json(paths.teacher_eval, out)
    log("eval: top-1 on data.eval: " + ", ".join(f"{c} {v['top1']:.4f}" for c, v in out["columns"].items()))
    return out
