"""Export benchmark (issue 6): a *trained* MobileNetV3-small through the export stage; top-1 of PyTorch, FP32,
FP16 and INT8 on all of EuroSAT ``test/`` (target: INT8 at most 0.5 point below FP32), and the deploy choice.

    python -m bench export                                          # trains the student first (CPU: ~3-4 min)
    DISTILLERY_BENCH_TRAINED=runs/x/student python -m bench export  # a student trained elsewhere

1. The student. ``DISTILLERY_BENCH_TRAINED``: a student folder as the student stage writes it
   (``model.safetensors`` + ``config.json``; class i is taken to be the i-th class folder of ``test/`` in
   sorted order unless its class names are the folder names). Otherwise one is trained here through
   distillery's own student stage (``train_student``) on ``labeled_pool/`` (3,000 labeled images; this
   benchmark is the only place their labels are read) at 64 px from scratch; the stage's stamp keeps it
   for the next run with the same settings.
2. Pseudo-labels: the student labels ``train_unlabeled/`` images (as the teachers would), written as the
   run's ``pseudo_labels.parquet``; the export stage draws its class-balanced parity and INT8 calibration
   images from them.
3. ``export_onnx`` itself (the product's code path, default INT8 settings): fp32, fp16, int8 (post-training,
   and after quantisation-aware fine-tuning on the pseudo-labelled images; the export keeps the one that
   agrees more with the student on 512 other held-out ones) with their parity gates and the deploy choice
   (timed on this CPU).
4. Top-1 on every ``test/`` image: PyTorch with timm's eval transform, and the runtime's
   ``Classifier.predict`` on each ONNX file; INT8 - FP32 in points.

Settings (environment variables):

| variable | meaning | default |
|---|---|---|
| DISTILLERY_EUROSAT | staged EuroSAT folder (labeled_pool/, train_unlabeled/, test/) | ../shared/data/eurosat |
| DISTILLERY_BENCH_TRAINED | a trained student folder to use instead of training one | (train) |
| DISTILLERY_BENCH_EXPORT_EPOCHS | epochs of the student trained here | 12 |
| DISTILLERY_BENCH_EXPORT_INPUT | its input size in pixels | 64 |
| DISTILLERY_BENCH_EXPORT_UNLABELED | train_unlabeled images pseudo-labelled for parity, calibration and INT8 QAT | 5000 |
| DISTILLERY_BENCH_EXPORT_PARITY | export.parity_images | 200 |
| DISTILLERY_BENCH_EXPORT_CALIBRATION | export.calibration_images | 128 |
| DISTILLERY_BENCH_EXPORT_QAT_EPOCHS | export.int8_qat_epochs (0: post-training INT8 only) | 4 (the job default) |
| DISTILLERY_BENCH_EXPORT_QAT_IMAGES | export.int8_qat_images | 2000 (the job default) |
| DISTILLERY_BENCH_EXPORT_OUT | run folder (student/ kept between runs, export/ redone) | runs/bench/export |
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ._eurosat import EXTENSIONS, REPO, env, labeled_items, labeled_rows, staged_root, write_manifest

ARCH = "mobilenetv3_small_100"


def _torch_predict(model, data_config: dict, paths: list[str], batch: int = 100) -> np.ndarray:
    """PyTorch eager top-1 with timm's own eval transform (the reference every format is compared with)."""
    import timm.data
    import torch
    from PIL import Image

    transform = timm.data.create_transform(**data_config)
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            xs = []
            for p in paths[i:i + batch]:
                with Image.open(p) as im:
                    xs.append(transform(im.convert("RGB")))
            out.append(model(torch.stack(xs)).argmax(1).numpy())
    return np.concatenate(out)


def _pseudo_labels(model, data_config: dict, paths: list[str], out: Path) -> None:
    from distillery.rundir import sha256_file, write_table

    labels = _torch_predict(model, data_config, paths)
    write_table(out, [{"path": p, "sha256": sha256_file(p), "label": int(y)} for p, y in zip(paths, labels)])


def _student(s: dict, root: Path, run: Path, classes: list[str]) -> tuple[list[dict], dict]:
    """The trained student in ``run/student``: copied from DISTILLERY_BENCH_TRAINED or trained here.
    Returns the job's classes ({name, folder}) and what was done."""
    from distillery.job import job_from_dict
    from distillery.rundir import RunPaths

    student_dir = RunPaths(run).student
    if s["trained"]:
        src = Path(s["trained"])
        config = json.loads((src / "config.json").read_text())
        names = list(config["class_names"])
        if len(names) != len(classes):
            raise ValueError(f"{src}: the student has {len(names)} classes, {root / 'test'} has {len(classes)}")
        folders = names if sorted(names) == sorted(classes) else classes  # else: class i = i-th sorted folder
        if student_dir.exists():
            shutil.rmtree(student_dir)
        student_dir.mkdir(parents=True)
        for f in ("model.safetensors", "config.json"):
            shutil.copy(src / f, student_dir / f)
        return ([{"name": n, "folder": f} for n, f in zip(names, folders)],
                {"source": str(src), "architecture": config["architecture"], "trained_here": False,
                 "data_config": config["data_config"]})
    job_classes = [{"name": c, "folder": c} for c in classes]
    job = job_from_dict({
        "name": "bench-export", "seed": 0, "domain": "satellite photo", "classes": job_classes,
        "data": {"unlabeled": str(root / "train_unlabeled")}, "run_dir": str(run),
        "student": {"model": ARCH, "input_size": s["input"], "epochs": s["epochs"], "batch_size": 128, "lr": 1e-3,
                    "crop_scale": [0.25, 1.0], "workers": 0, "device": "cpu"},
    }, base=REPO)
    from distillery.student import train_student

    paths = RunPaths(run)
    items = labeled_items(root / "labeled_pool", classes)
    write_manifest(paths.manifest, labeled_rows(items, len(classes), "bench: labeled_pool ground truth (one-hot)"))
    t0 = time.perf_counter()
    metrics = train_student(job, progress=False)
    elapsed = time.perf_counter() - t0
    config = json.loads(paths.student_config.read_text())
    train_s = float(metrics.get("wall_time_s") or elapsed)
    return job_classes, {"source": "trained here: distillery student stage on labeled_pool/", "architecture": ARCH,
                         "trained_here": True, "train_images": len(items), "epochs": s["epochs"],
                         "input": s["input"], "train_s": round(train_s, 1),
                         "reused_from_earlier_run": elapsed < 0.5 * train_s,
                         "final_loss": metrics.get("train_loss"), "data_config": config["data_config"]}


def main() -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillery.export import export_onnx
    from distillery.job import job_from_dict
    from distillery.rundir import RunPaths, list_images
    from distillery.runtime import Classifier
    from distillery.student import load_student

    root = staged_root()
    s = {"trained": env("TRAINED", ""), "epochs": env("EXPORT_EPOCHS", 12, int),
         "input": env("EXPORT_INPUT", 64, int), "unlabeled": env("EXPORT_UNLABELED", 5000, int),
         "parity": env("EXPORT_PARITY", 200, int), "calibration": env("EXPORT_CALIBRATION", 128, int),
         "qat_epochs": env("EXPORT_QAT_EPOCHS", 4, int), "qat_images": env("EXPORT_QAT_IMAGES", 2000, int),
         "out": str(Path(env("EXPORT_OUT", "runs/bench/export")).resolve())}
    classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    run = Path(s["out"])
    run.mkdir(parents=True, exist_ok=True)
    what = s["trained"] or f"{ARCH} trained here ({s['epochs']} epochs at {s['input']} px on labeled_pool/)"
    print(f"export bench: EuroSAT {root}; student: {what}", flush=True)

    job_classes, student = _student(s, root, run, classes)
    paths = RunPaths(run)
    model, config = load_student(paths.student)
    rng = np.random.default_rng(0)
    unlabeled = [str(p) for p in list_images(root / "train_unlabeled", EXTENSIONS)]
    unlabeled = sorted(rng.choice(unlabeled, size=min(s["unlabeled"], len(unlabeled)), replace=False).tolist())
    _pseudo_labels(model, config["data_config"], unlabeled, paths.pseudo_labels)

    if paths.export.exists():
        shutil.rmtree(paths.export)  # re-measure parity and the deploy timing every run
    job = job_from_dict({
        "name": "bench-export", "seed": 0, "domain": "satellite photo", "classes": job_classes,
        "data": {"unlabeled": str(root / "train_unlabeled")}, "run_dir": str(run),
        "export": {"formats": ["fp32", "fp16", "int8"], "required": ["fp32"], "parity_images": s["parity"],
                   "calibration_images": s["calibration"], "int8_qat_epochs": s["qat_epochs"],
                   "int8_qat_images": s["qat_images"]},
    }, base=REPO)
    t0 = time.perf_counter()
    report = export_onnx(job, progress=True)
    export_s = time.perf_counter() - t0

    test = labeled_items(root / "test", [c["folder"] for c in job_classes])
    test_paths = [str(p) for p, _ in test]
    truth = np.array([y for _, y in test])
    t0 = time.perf_counter()
    ref = _torch_predict(model, config["data_config"], test_paths)
    rows = {"pytorch": {"top1": float(np.mean(ref == truth)), "eval_s": round(time.perf_counter() - t0, 1)}}
    for fmt, r in report["formats"].items():
        if not r.get("built"):
            rows[fmt] = {"top1": None, "error": r.get("error")}
            continue
        clf = Classifier.load(r["path"], providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        pred = np.array([p.index for p in clf.predict(test_paths, batch_size=100)])
        rows[fmt] = {"top1": float(np.mean(pred == truth)), "agreement_with_pytorch": float(np.mean(pred == ref)),
                     "eval_s": round(time.perf_counter() - t0, 1), "parity_agreement": r["agreement"],
                     "parity_max_abs_diff": r["max_abs_diff"], "gate_passed": r["passed"],
                     "file_mb": round(r["file_size"] / 1e6, 2)}
    drop = None
    if rows.get("int8", {}).get("top1") is not None:
        drop = round(100 * (rows["fp32"]["top1"] - rows["int8"]["top1"]), 2)
    res = {"settings": s, "student": student, "test_images": len(test), "top1": rows,
           "int8_drop_points": drop, "int8_quantization": report.get("int8_quantization"), "deploy": report["deploy"], "export_s": round(export_s, 1),
           "calibration_images": report["calibration_images"], "parity_images": len(report["parity_images"])}

    print(f"  top-1 on {len(test)} EuroSAT test images ({student['architecture']}, "
          f"input {student['data_config']['input_size'][1]} px; "
          + (f"trained here: {student['epochs']} epochs, {student['train_s']:.0f} s of training, final loss "
             f"{student['final_loss']:.3f}" + (", reused from an earlier run (stage stamp)"
                                               if student["reused_from_earlier_run"] else "")
             if student["trained_here"] else f"student {student['source']}") + ")")
    for name, r in rows.items():
        if r.get("top1") is None:
            print(f"    {name:<8} not built: {r.get('error')}")
            continue
        extra = "" if name == "pytorch" else (
            f"  agrees with PyTorch on {100 * r['agreement_with_pytorch']:.2f}%; parity gate "
            f"{'passed' if r['gate_passed'] else 'FAILED'} (agreement {r['parity_agreement']:.3f}, max |Δlogit| "
            f"{r['parity_max_abs_diff']:.2e}); {r['file_mb']:.2f} MB")
        print(f"    {name:<8} {100 * r['top1']:6.2f}%{extra}")
    if drop is not None:
        q = report.get("int8_quantization", {})
        print(f"  INT8 - FP32: {-drop:+.2f} points (target: a drop of at most 0.5); static QDQ, per-channel "
              f"{'7-bit' if q.get('reduce_range') else '8-bit'} weights, MinMax calibration on "
              f"{report['calibration_images']} class-balanced pseudo-labelled images, kept in float: "
              f"{', '.join(q.get('excluded_nodes', [])) or 'nothing'}")
        qat = q.get("qat") or {}
        if qat.get("choice_agreement"):
            ca, kl = qat["choice_agreement"], qat["simulated_int8_kl"]
            print(f"  INT8 QAT: {qat['epochs']} epochs on {qat['images']} images ({qat['seconds']:.0f} s); simulated "
                  f"INT8 KL to the student {kl['before']:.4f} -> {kl['after']:.4f}; agreement on "
                  f"{qat['choice_images']} {qat['choice_set']}: post-training {ca['post_training']:.4f}, QAT "
                  f"{ca['qat']:.4f} -> {'QAT' if qat['used'] else 'post-training'} model exported")
        else:
            print(f"  INT8 QAT: not run ({qat.get('why', 'unknown')})")
    dep = report["deploy"]
    timings = ", ".join(f"{f} {t:.2f} ms" for f, t in dep.get("timings_ms", {}).items())
    print(f"  deploy: {dep['file']} ({timings}) -- {dep['why']}")
    return res


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=str))
