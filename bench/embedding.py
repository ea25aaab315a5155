"""Embedding-student benchmark in the stand-in world: zero-shot top-1 on ``test/`` through the student vs through
the stand-in CLIP's own image features.

    python -m bench embedding       # needs a teacher run of `python -m bench teacher` (its teacher/ folder)

1. Copies the teacher outputs the student needs (manifest, tables, the ``clip`` feature store; not LaTTe's or
   Vermouth's files) from ``DISTILLERY_BENCH_EMB_TEACHER`` (default ``runs/bench/teacher/teacher``) into the
   run folder, unless it already holds them.
2. Runs the product's ``distillery student`` and ``export`` on examples/eurosat-standin.yaml with
   ``student.head=embedding`` and ``export.text_encoder=true`` (MobileNetV3-small, 64 px, the job's epochs).
3. Measures on the 2,000 ``test/`` images (benchmark code may read their labels), each as argmax of
   cos(image embedding, class text embedding) with the job's templates:
   the stand-in CLIP's own image features; the student in PyTorch; the exported fp32 ONNX through the runtime
   (side matrix); the runtime with class names embedded by the exported text encoder (device path); and, to show
   a swapped matrix acts on the student as on CLIP, both with one other template ("a photo of a {c}." alone).
   Also the mean cosine between the student's and CLIP's test-image embeddings.

| variable | meaning | default |
|---|---|---|
| DISTILLERY_BENCH_EMB_TEACHER | teacher/ folder of a stand-in teacher run | runs/bench/teacher/teacher |
| DISTILLERY_BENCH_OUT | run folder | runs/bench/embedding |
| DISTILLERY_BENCH_STUDENT_EPOCHS | student epochs | the job's (12) |
| DISTILLERY_BENCH_THREADS | torch threads | 1 |
| DISTILLERY_BENCH_EMB_ARGS | more job overrides, space-separated (e.g. `student.embedding_distill=0.5`) | none |
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ._eurosat import REPO, env, labeled_items, staged_root

JOB = REPO / "examples" / "eurosat-standin.yaml"
_SKIP = {"latte", "features", "vermouth"}


def _copy_teacher(src: Path, dst: Path, clip_store: str | None) -> None:
    if (dst / "manifest.parquet").is_file():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name in _SKIP:
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)
    for store in (src / "features").glob("clip-*"):
        if clip_store is None or store.name == clip_store:
            shutil.copytree(store, dst / "features" / store.name)


def _stage(argv: list[str]) -> float:
    from distillery.cli import main as cli

    t0 = time.perf_counter()
    if cli(argv) != 0:
        raise RuntimeError(f"`distillery {' '.join(argv)}` failed")
    return time.perf_counter() - t0


def _top1(logits, labels) -> float:
    import numpy as np

    return float(np.mean(np.asarray(logits).argmax(1) == np.asarray(labels)))


def main() -> dict:
    import numpy as np
    import torch

    from distillery.job import load_job
    from distillery.models import load_clip
    from distillery.rundir import RunPaths
    from distillery.runtime import Classifier
    from distillery.runtime.embeddings import l2_normalize, load_class_embeddings
    from distillery.runtime.text import TextEncoder
    from distillery.student import load_student
    from distillery.student.data import load_rgb
    from distillery.student.embedding import CosineClassifier
    from distillery.teacher.clip import class_weights

    torch.set_num_threads(env("THREADS", 1, int))
    out = Path(env("OUT", str(REPO / "runs" / "bench" / "embedding"))).resolve()
    src = Path(env("EMB_TEACHER", str(REPO / "runs" / "bench" / "teacher" / "teacher")))
    overrides = [f"run_dir={out}", "student.head=embedding", "export.text_encoder=true"]
    epochs = env("STUDENT_EPOCHS", None, int)
    if epochs:
        overrides.append(f"student.epochs={epochs}")
    overrides += env("EMB_ARGS", "").split()
    job = load_job(JOB, overrides)
    _copy_teacher(src, out / "teacher", None)
    args = ["--job", str(JOB), "--no-report", *overrides]
    seconds = {"student": _stage(["student", *args]), "export": _stage(["export", *args])}
    paths = RunPaths(job.run_path)

    folders = [c.folder or c.name for c in job.classes]
    items = labeled_items(staged_root() / "test", folders)
    test_paths, labels = [str(p) for p, _ in items], np.array([y for _, y in items])
    clip, preprocess, tok = load_clip(job.models.clip)
    cfg = job.teacher.clip
    other = ["a photo of a {c}."]
    text = class_weights(clip, tok, cfg.templates, job.class_names, job.domain_phrase, "cpu")
    text_other = class_weights(clip, tok, other, job.class_names, job.domain_phrase, "cpu")

    clf = Classifier.load(paths.export / "model.onnx", providers=["CPUExecutionProvider"])
    model, config = load_student(paths.student)
    feats, student_emb, onnx_emb = [], [], []
    with torch.no_grad():
        for i in range(0, len(test_paths), 256):
            chunk = test_paths[i:i + 256]
            ims = [load_rgb(p) for p in chunk]
            feats.append(clip.encode_image(torch.stack([preprocess(im) for im in ims])).float().numpy())
            batch = clf.preprocess_batch(chunk)
            student_emb.append(torch.nn.functional.normalize(model(torch.from_numpy(batch)), dim=-1).numpy())
            onnx_emb.append(clf.predict_embeddings(batch))
    clip_f, st_f, on_f = (l2_normalize(np.concatenate(x)) for x in (feats, student_emb, onnx_emb))

    shipped, names = load_class_embeddings(paths.export / "text_embeddings.npz")
    enc = TextEncoder.load(paths.export)
    device = enc.class_embeddings(job.class_names)
    res = {
        "test_images": len(test_paths),
        "epochs": job.student.epochs,
        "clip_image_features": _top1(clip_f @ text.T, labels),
        "student_torch": _top1(st_f @ text.T, labels),
        "student_onnx_runtime": _top1(np.concatenate([clf.predict_logits(clf.preprocess_batch(test_paths[i:i + 256]))
                                                      for i in range(0, len(test_paths), 256)]), labels),
        "student_runtime_device_text": _top1(on_f @ device.T, labels),
        "other_template": {"template": other[0], "clip_image_features": _top1(clip_f @ text_other.T, labels),
                           "student_onnx_runtime": _top1(on_f @ text_other.T, labels)},
        "mean_cos_student_clip_test": float((st_f * clip_f).sum(1).mean()),
        "shipped_matrix_vs_teacher_max_abs": float(np.abs(shipped - text).max()),
        "device_matrix_vs_shipped_max_abs": float(np.abs(device - shipped).max()),
        "agreement_student_vs_clip_top1": float(np.mean((st_f @ text.T).argmax(1) == (clip_f @ text.T).argmax(1))),
        "student_train_wall_s": read_metrics(paths)["wall_time_s"],
        "stage_seconds": seconds,
    }
    print(f"zero-shot top-1 on test/ ({len(test_paths)} images, templates {cfg.templates}):")
    print(f"  stand-in CLIP image features  {res['clip_image_features']:.4f}")
    print(f"  embedding student (PyTorch)   {res['student_torch']:.4f}   ({job.student.epochs} epochs)")
    print(f"  student, ONNX runtime         {res['student_onnx_runtime']:.4f}")
    print(f"  student, device-embedded text {res['student_runtime_device_text']:.4f}")
    print(f"  with {other[0]!r} only: CLIP {res['other_template']['clip_image_features']:.4f}, student "
          f"{res['other_template']['student_onnx_runtime']:.4f}")
    print(f"  mean cos(student, CLIP) on test/ {res['mean_cos_student_clip_test']:.4f}; top-1 agreement "
          f"{res['agreement_student_vs_clip_top1']:.4f}")
    assert names == job.class_names
    return res


def read_metrics(paths) -> dict:
    from distillery.rundir import read_json

    return read_json(paths.student_metrics)
