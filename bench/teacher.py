"""Teacher benchmark in the stand-in world: do the teacher methods beat the stand-in CLIP's zero-shot?

    python -m bench teacher                          # builds/reuses models/standin, then runs the job
    DISTILLERY_BENCH_STUDENT_EPOCHS=2 python -m bench teacher   # a quicker student

No pretrained weights reach these machines, so the methods (AiR, LaTTe-CLIP, Vermouth) are measured against
*stand-ins* (``distillery standin``, distillery/standin.py): a small CLIP and a ResNet-18 expert trained
here on labeled images seen through a source-domain transform S, and S(labeled images) in place of a
text-to-image generator. The figures say whether a method *works* (closes part of the gap S opened);
they are not the papers' numbers.

What it does, in one run:

1. Builds the stand-ins (or finds them up to date) in ``models/standin``.
2. Writes the run's ``teacher/synthetic.parquet`` from ``models/standin/generator.parquet``: trick
   ``standin``, label = class, a ``provenance`` column saying these are S(labeled_pool) images standing
   in for a generator. The job (examples/eurosat-standin.yaml) has ``teacher.synth.source: table``; only this
   bench provides the table, the product's synthesis stage is unchanged.
3. Runs the product's own ``distillery teacher``, ``student``, ``export`` stages on that job (every
   registered teacher enabled; ensemble weights learned without labels, the job's default), timing each.
4. Prints per teacher column its top-1 on ``test/`` from ``teacher/eval.json`` (written by the teacher
   stage when ``data.eval`` is set; this bench does not compute it another way), its gain over the
   stand-in zero-shot (the ``clip`` column) and the paper's EuroSAT figure beside it; the distilled
   student's and its INT8 export's top-1 on ``test/``; student / ensemble.
5. Two controls computed here (benchmark code may read test labels):
   (a) the stand-in CLIP's zero-shot on S(test): the ceiling the shift took away;
   (b) naive self-training: a linear head on the frozen stand-in CLIP image features, initialised at
       the zero-shot classifier, trained for a few epochs on its own confident zero-shot pseudo-labels of
       ``train_unlabeled/`` (the most confident half per predicted class), then measured on ``test/``.

Settings (environment variables):

| variable | meaning | default |
|---|---|---|
| DISTILLERY_EUROSAT | the staged EuroSAT folder (labeled_pool/, train_unlabeled/, test/) | ../shared/data/eurosat |
| DISTILLERY_BENCH_STANDIN | stand-in folder | models/standin |
| DISTILLERY_BENCH_TEACHERS | teachers to enable (comma list) | every registered one |
| DISTILLERY_BENCH_STUDENT_EPOCHS | student epochs | the job's (12) |
| DISTILLERY_BENCH_QAT_EPOCHS | export.int8_qat_epochs | 2 |
| DISTILLERY_BENCH_SELFTRAIN_EPOCHS | control (b) epochs | 2 |
| DISTILLERY_BENCH_THREADS | torch threads | 1 |
| DISTILLERY_BENCH_OUT | run folder (its stages skip themselves when unchanged) | runs/bench/teacher |
| DISTILLERY_BENCH_SMOKE | 1 = test-size stand-ins in runs/bench/standin-smoke, 1 student epoch: plumbing only, figures meaningless | 0 |
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ._eurosat import EXTENSIONS, REPO, env, labeled_items, staged_root

JOB = REPO / "examples" / "eurosat-standin.yaml"
# DISTILLERY_BENCH_SMOKE=1: stand-ins at test size (a few images per class, one epoch, a 1-layer ViT).
SMOKE_STANDIN = dict(pretrain_per_class=10, generator_per_class=5, clip_epochs=1, clip_batch=50, expert_epochs=1,
                     expert_batch=50,
                     clip_config={"model_cfg": {"embed_dim": 16,
                                                "vision_cfg": {"width": 32, "layers": 1, "head_width": 16},
                                                "text_cfg": {"width": 32, "layers": 1, "heads": 2}}},
                     expert_config={"model_args": {"channels": [8, 16, 32, 64]}})
# The papers' EuroSAT figures (SPEC §3-5): (zero-shot CLIP, method), top-1 %.
PAPER = {
    "air": ("AiR", 42.0, 55.7),
    "latte": ("LaTTe-CLIP", 42.95, 80.27),
    "vermouth": ("Vermouth", None, 88.93),  # 16-shot; no zero-shot gain published
}
PAPER["latteclip"] = PAPER["latte_clip"] = PAPER["latte"]


def synthetic_rows(standin: Path) -> list[dict]:
    """``generator.parquet`` as the rows of a run's ``teacher/synthetic.parquet`` (synth.py's columns)."""
    from distillery.rundir import read_table

    rows = []
    index: dict[int, int] = {}
    for r in read_table(standin / "generator.parquet", "stand-in generator table"):
        i = index.get(r["class_index"], 0)
        index[r["class_index"]] = i + 1
        rows.append({"class_index": int(r["class_index"]), "class_name": r["class_name"], "trick": "base",
                     "index": i, "prompt": f"an image of a {r['class_name']}", "negative_prompt": "",
                     "guidance": None, "steps": None, "seed": None,
                     "relpath": None, "path": str((standin / r["path"]).resolve()), "sha256": r["sha256"],
                     "recipe": None, "model": "standin", "lora": None, "resolution": 64, "output_size": 64,
                     "antialias": False, "source": r["source"], "provenance": r["provenance"]})
    return rows


def _registered_teachers() -> list[str]:
    from distillery.teacher import TEACHERS

    return list(TEACHERS)


def _stage(argv: list[str]) -> float:
    from distillery.cli import main as cli

    t0 = time.perf_counter()
    rc = cli(argv)
    if rc != 0:
        raise RuntimeError(f"`distillery {' '.join(argv)}` exited with {rc}")
    return time.perf_counter() - t0


def _clip_features(clip_dir: Path, paths: list[Path], shift: bool, batch: int = 256):
    import numpy as np
    import torch
    from PIL import Image

    from distillery.models import load_clip
    from distillery.standin import source_transform

    model, preprocess, _ = load_clip(str(clip_dir))
    feats = []
    with torch.no_grad():
        for b in range(0, len(paths), batch):
            ims = []
            for p in paths[b:b + batch]:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                ims.append(preprocess(source_transform(im) if shift else im))
            feats.append(model.encode_image(torch.stack(ims), normalize=True).numpy())
    return np.concatenate(feats)


def _zero_shot_weights(clip_dir: Path, names: list[str], templates: list[str]):
    import torch

    from distillery.models import load_clip

    model, _, tok = load_clip(str(clip_dir))
    with torch.no_grad():
        w = [torch.nn.functional.normalize(model.encode_text(tok([t.format(c=n) for t in templates]),
                                                              normalize=True).mean(0), dim=0) for n in names]
    return torch.stack(w).numpy()


def self_training(clip_dir: Path, names: list[str], templates: list[str], unlabeled: list[Path], test: list[Path],
                  truth, epochs: int, seed: int = 0) -> dict:
    """Control (b): linear head on frozen CLIP features, from the zero-shot weights, on its own confident labels."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    w0 = _zero_shot_weights(clip_dir, names, templates)
    fu = _clip_features(clip_dir, unlabeled, shift=False)
    ft = _clip_features(clip_dir, test, shift=False)
    p = torch.softmax(100.0 * torch.from_numpy(fu @ w0.T), 1)
    conf, lab = p.max(1)
    keep = []
    for c in range(len(names)):  # the most confident half of each predicted class
        idx = torch.nonzero(lab == c).flatten()
        if len(idx):
            keep.append(idx[conf[idx].argsort(descending=True)[: max(1, len(idx) // 2)]])
    keep = torch.cat(keep)
    head = torch.nn.Linear(w0.shape[1], len(names), bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w0) * 100.0)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = torch.from_numpy(fu)[keep], lab[keep]
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), 64):
            i = perm[b:b + 64]
            loss = F.cross_entropy(head(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = head(torch.from_numpy(ft)).argmax(1).numpy()
        zs = (ft @ w0.T).argmax(1)
    return {"top1": float(np.mean(pred == truth)), "zero_shot_top1": float(np.mean(zs == truth)),
            "pseudo_labeled": int(len(keep)), "epochs": epochs,
            "what": "linear head on frozen stand-in CLIP image features, initialised at the zero-shot weights, "
                    "cross-entropy on the most confident half of each predicted class of train_unlabeled"}


def _int8_top1(export_dir: Path, test: list[Path], truth) -> dict:
    import numpy as np

    from distillery.rundir import read_json
    from distillery.runtime import Classifier

    report = read_json(export_dir / "report.json")
    out = {}
    for fmt in ("fp32", "int8"):
        r = report["formats"].get(fmt, {})
        if not r.get("built"):
            out[fmt] = None
            continue
        clf = Classifier.load(r["path"], providers=["CPUExecutionProvider"])
        pred = np.array([p.index for p in clf.predict([str(p) for p in test], batch_size=100)])
        out[fmt] = float(np.mean(pred == truth))
    return out


def main() -> dict:
    import numpy as np
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillery.job import load_job
    from distillery.rundir import RunPaths, list_images, read_json, write_table
    from distillery.standin import StandinSettings, build_standin, source_transform  # noqa: F401

    threads = env("THREADS", 1, int)
    torch.set_num_threads(threads)
    root = staged_root()
    smoke = bool(env("SMOKE", 0, int))
    standin = Path(env("STANDIN", "runs/bench/standin-smoke" if smoke else str(REPO / "models" / "standin"))).resolve()
    out = Path(env("OUT", "runs/bench/teacher-smoke" if smoke else "runs/bench/teacher")).resolve()
    settings = StandinSettings(threads=threads, **(SMOKE_STANDIN if smoke else {}))
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    info = build_standin(standin, root, settings)
    times["standin (build or reuse)"] = time.perf_counter() - t0
    cal = info["calibration"]
    print(f"teacher bench: stand-ins {standin} (calibration on held-out labeled_pool: real {cal['real_top1']:.1%}, "
          f"S {cal['shifted_top1']:.1%})", flush=True)

    default = _registered_teachers()
    teachers = [t for t in env("TEACHERS", ",".join(default)).split(",") if t]
    overrides = [f"run_dir={out}", *[f"teacher.{t}.enabled=true" for t in teachers], f"models.clip={standin / 'clip'}",
                 f"models.expert={standin / 'expert'}",
                 f"export.int8_qat_epochs={env('QAT_EPOCHS', 2, int)}"]
    epochs = env("STUDENT_EPOCHS", 1 if smoke else 0, int)
    if epochs:
        overrides.append(f"student.epochs={epochs}")
    if smoke:
        overrides.append("export.int8_qat_epochs=0")
    # The stages know the models by reference, not content: a run made with other stand-ins starts over.
    marker = out / "standin.key"
    if out.exists() and (not marker.is_file() or marker.read_text() != info["key"]):
        print(f"  stand-ins changed since the last run: removing {out}", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(info["key"])
    job = load_job(JOB, overrides)
    paths = RunPaths(job.run_path)
    write_table(paths.synthetic, synthetic_rows(standin))
    print(f"  wrote {paths.synthetic} (S(labeled_pool) images standing in for generated ones, trick base, model standin); teachers {teachers}",
          flush=True)

    args = ["--job", str(JOB), "--no-progress", *overrides]
    times["teacher"] = _stage(["teacher", *args])
    times["student"] = _stage(["student", *args])
    times["export"] = _stage(["export", *args])

    folders = [c.folder for c in job.classes]
    names = [c.name for c in job.classes]
    test_items = labeled_items(root / "test", folders)
    test = [p for p, _ in test_items]
    truth = np.array([y for _, y in test_items])
    templates = [t.replace("{domain}", job.domain) for t in job.teacher.clip.templates]
    clip_dir = Path(job.models.clip)

    t0 = time.perf_counter()
    w0 = _zero_shot_weights(clip_dir, names, templates)
    s_test = float(np.mean((_clip_features(clip_dir, test, shift=True) @ w0.T).argmax(1) == truth))
    times["control a: zero-shot on S(test)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    selftrain = self_training(clip_dir, names, templates, list_images(root / "train_unlabeled", EXTENSIONS), test,
                              truth, env("SELFTRAIN_EPOCHS", 2, int))
    times["control b: self-training"] = time.perf_counter() - t0

    eval_file = paths.teacher / "eval.json"
    columns = read_json(eval_file)["columns"] if eval_file.is_file() else None
    metrics = read_json(paths.student_metrics)
    student_top1 = (metrics.get("eval") or {}).get("top1")
    exported = _int8_top1(paths.export, test, truth)

    res = {"standin": info["calibration"], "teachers": teachers, "eval_json": str(eval_file) if columns else None,
           "columns": columns, "control_shifted_test_top1": s_test, "control_self_training": selftrain,
           "student_top1": student_top1, "export_top1": exported, "seconds": times}
    print()
    if columns is None:
        print(f"  the teacher stage did not write {eval_file} (per-column top-1 on data.eval); no column figures")
    else:
        base = (columns.get("clip") or {}).get("top1")
        print(f"{'teacher column':<16} {'top-1 test':>10} {'gain vs clip':>12}   paper (EuroSAT)")
        for col, r in columns.items():
            top1 = r.get("top1")
            gain = f"{100 * (top1 - base):+.1f}" if top1 is not None and base is not None and col != "clip" else ""
            paper = ""
            if col in PAPER:
                label, zs, m = PAPER[col]
                paper = f"{label} {zs} -> {m} ({m - zs:+.1f})" if zs is not None else f"{label} {m} (16-shot; no zero-shot gain published)"
            elif col == "clip":
                paper = "CLIP ViT-B/32 zero-shot 42.0 (AiR) / 42.95 (LaTTe)"
            print(f"{col:<16} {100 * top1 if top1 is not None else float('nan'):>9.2f}% {gain:>12}   {paper}")
        ens = (columns.get("ensemble") or {}).get("top1")
        if ens and student_top1 is not None:
            res["student_vs_ensemble"] = student_top1 / ens
    print()
    print(f"controls: stand-in CLIP zero-shot on S(test) {100 * s_test:.2f}% (the ceiling the shift took away); "
          f"naive self-training ({selftrain['what']}; {selftrain['epochs']} epochs, {selftrain['pseudo_labeled']} "
          f"images) {100 * selftrain['top1']:.2f}% vs its zero-shot {100 * selftrain['zero_shot_top1']:.2f}%")
    st = f"{100 * student_top1:.2f}%" if student_top1 is not None else "n/a"
    ex = ", ".join(f"{k} {100 * v:.2f}%" if v is not None else f"{k} not built" for k, v in exported.items())
    ratio = f"; student / ensemble {res['student_vs_ensemble']:.3f}" if "student_vs_ensemble" in res else ""
    print(f"distilled student ({job.student.model}, {job.student.epochs} epochs) top-1 on test {st}; export {ex}{ratio}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    res["wall_s"] = time.perf_counter() - t_start
    if smoke:
        print("SMOKE RUN: test-size stand-ins, 1 student epoch; the figures are meaningless")
    print(f"teacher bench wall time {res['wall_s']:.0f}s (stand-in figures: whether a method works, not the papers' numbers)")
    return res
