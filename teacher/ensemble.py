"""Fuse the teachers' probability columns into soft labels, and write the training manifest (SPEC §6).

Each teacher ``t`` wrote ``teacher/probs/<t>.parquet`` (path, sha256, probs). For every real image:

    soft_target = Σ_t w_t p_t / Σ_t w_t,   label = argmax soft_target,   confidence = max soft_target,
    agreement   = share of teachers whose own argmax equals ``label``.

``pseudo_labels.parquet`` keeps one ``p_<teacher>`` column per teacher beside the fused result.
``manifest.parquet`` is the training set: real images with their soft targets, and synthetic
images with their generating class as a one-hot target.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from distillery.rundir import (RunPaths, is_done, log, mark_done, read_table, save_resolved_job, stage_key,
                               write_table)


def fuse(probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of per-teacher (N, C) probabilities; teachers with weight 0 are ignored."""
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


def teacher_files(paths: RunPaths, weights: dict[str, float]):
    return {t: paths.teacher / "probs" / f"{t}.parquet" for t, w in weights.items() if w > 0}


def run_ensemble(job, progress: bool = True) -> dict:
    paths = RunPaths(job.run_path)
    cfg = job.teacher.ensemble
    files = teacher_files(paths, cfg.weights)
    synth_used = cfg.use_synthetic and job.teacher.synth.enabled
    inputs = list(files.values()) + ([paths.synthetic] if synth_used else [])
    for t, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(f"teacher.ensemble.weights.{t}: {str(f)!r} is missing; the {t!r} teacher has not "
                                    "run. Run `distillery teacher` (it runs every teacher with a weight > 0).")
    key = stage_key({"ensemble": asdict(cfg), "classes": job.class_names, "synth": synth_used}, inputs)
    if is_done(paths.teacher, "ensemble", key, [paths.pseudo_labels, paths.manifest]):
        log(f"ensemble: up to date ({paths.manifest})")
        return {}
    save_resolved_job(job, paths.teacher)
    tables = {t: read_table(f, f"{t} probabilities") for t, f in files.items()}
    ref = next(iter(tables.values()))
    order = [r["sha256"] for r in ref]
    probs = {}
    n_classes = len(job.classes)
    for t, rows in tables.items():
        by_sha = {r["sha256"]: r["probs"] for r in rows}
        if set(by_sha) != set(order):
            raise ValueError(f"ensemble: teacher {t!r} scored a different set of images than the others; "
                             "rerun the teacher stage so all teachers see the same unlabeled folder.")
        p = np.asarray([by_sha[s] for s in order], dtype=np.float64)
        if p.shape[1] != n_classes:
            raise ValueError(f"ensemble: teacher {t!r} has {p.shape[1]} classes, the job has {n_classes}; rerun it.")
        probs[t] = p
    soft = fuse(probs, cfg.weights)
    label = soft.argmax(axis=1)
    conf = soft.max(axis=1)
    agree = agreement(probs, label)
    pl = {"path": [r["path"] for r in ref], "sha256": order}
    for t, p in probs.items():
        pl[f"p_{t}"] = p.astype(np.float32).tolist()
    pl.update({"soft_target": soft.astype(np.float32).tolist(), "label": label.astype(np.int64).tolist(),
               "confidence": conf.astype(np.float32).tolist(), "agreement": agree.astype(np.float32).tolist()})
    write_table(paths.pseudo_labels, pl)

    rows = []
    for i in range(len(order)):
        rows.append({"path": pl["path"][i], "source": "real", "sha256": order[i], "label": int(label[i]),
                     "soft_target": pl["soft_target"][i],
                     "weight": float(1.0 if conf[i] >= cfg.min_confidence else 0.0),
                     "provenance": "ensemble:" + ",".join(sorted(probs))})
    n_syn = 0
    if synth_used:
        for r in read_table(paths.synthetic, "synthetic table"):
            onehot = np.zeros(n_classes, np.float32)
            onehot[r["class_index"]] = 1.0
            rows.append({"path": r["path"], "source": "synthetic", "sha256": r["sha256"], "label": int(r["class_index"]),
                         "soft_target": onehot.tolist(), "weight": float(cfg.synthetic_weight),
                         "provenance": f"synth:{r['trick']}:seed={r['seed']}"})
            n_syn += 1
    import pyarrow as pa

    schema = pa.schema([("path", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
                        ("label", pa.int64()), ("soft_target", pa.list_(pa.float32())), ("weight", pa.float32()),
                        ("provenance", pa.string())])
    write_table(paths.manifest, rows, schema=schema)
    counts = np.bincount(label, minlength=n_classes).tolist()
    info = {"real": len(order), "synthetic": n_syn, "pseudo_label_counts": dict(zip(job.class_names, counts)),
            "mean_confidence": round(float(conf.mean()), 4), "mean_agreement": round(float(agree.mean()), 4)}
    mark_done(paths.teacher, "ensemble", key, info)
    log(f"ensemble: {len(order)} real + {n_syn} synthetic rows -> {paths.manifest}")
    return info
