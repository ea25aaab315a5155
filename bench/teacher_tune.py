"""How the stand-in job's settings were chosen: on labeled_pool/, never on test/.

    python -m bench teacher_tune                 # every sweep
    DISTILLERY_BENCH_TUNE=latte_lr python -m bench teacher_tune

Each sweep runs the product's teacher stage on examples/eurosat-standin.yaml (the 5,000 train_unlabeled/ images,
the adapted stand-in generator) with ``data.eval`` pointed at a *validation* folder built from labeled_pool/'s
pretraining split (the real images; 180 per class; the generator split stays out because the synthetic images are
made from it), and reads the column's top-1 there from the stage's own ``teacher/eval.json``. test/ is not read.

| sweep | setting | values | column |
|---|---|---|---|
| air_top_n | teacher.air.top_n | 16, 64, 256 | air_prompt |
| latte_lr | teacher.latte.lr (5 epochs, to keep the sweep short) | 1e-5, 3e-5, 1e-4 | latte |
| vermouth_real | teacher.vermouth.real_pseudo_labels (real images the clip column labels this confidently join the synthetic ones) | 0, 0.2, 0.4 | vermouth |
| prior_shrink | teacher.prior.shrink, on the balanced validation set and on a long-tailed one | 0, 0.3, 0.5 | clip |

| variable | meaning | default |
|---|---|---|
| DISTILLERY_BENCH_TUNE | comma list of sweeps | all |
| DISTILLERY_BENCH_OUT | folder of the sweep runs | runs/bench/teacher-tune |
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ._eurosat import REPO, env, staged_root

SWEEPS = {
    "air_top_n": ("teacher.air.top_n", [16, 64, 256], "air_prompt",
                  ["teacher.latte.enabled=false", "teacher.vermouth.enabled=false", "teacher.transduct.enabled=false"]),
    "latte_lr": ("teacher.latte.lr", [1e-5, 3e-5, 1e-4], "latte",
                 ["teacher.air.enabled=false", "teacher.vermouth.enabled=false", "teacher.transduct.enabled=false",
                  "teacher.latte.enabled=true", "teacher.latte.epochs=5"]),
    "vermouth_real": ("teacher.vermouth.real_pseudo_labels", [0.0, 0.2, 0.4], "vermouth",
                      ["teacher.latte.enabled=false", "teacher.air.enabled=false", "teacher.transduct.enabled=false"]),
    "prior_shrink": ("teacher.prior.shrink", [0.0, 0.3, 0.5], "clip",
                     ["teacher.air.enabled=false", "teacher.latte.enabled=false", "teacher.vermouth.enabled=false",
                      "teacher.transduct.enabled=false"]),
}


def validation_folder(root: Path, dest: Path, sizes: list[int] | None = None) -> Path:
    """labeled_pool's pretraining-split real images as an ImageFolder (optionally ``sizes`` per class)."""
    from distillery.standin import CLASSES, StandinSettings, split_pool

    items = [it for it in split_pool(root / "labeled_pool", StandinSettings()) if it["part"] == "pretrain"]
    for c, (folder, _) in enumerate(CLASSES):
        d = dest / folder
        d.mkdir(parents=True, exist_ok=True)
        mine = [it for it in items if it["class_index"] == c]
        for it in mine[:sizes[c]] if sizes else mine:
            if not (d / it["path"].name).exists():
                shutil.copy2(it["path"], d / it["path"].name)
    return dest


def main() -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from distillery.rundir import read_json, write_table
    from distillery.standin import build_standin

    from .teacher import JOB, _copy_caches, _stage, longtail_items, synthetic_rows

    torch.set_num_threads(env("THREADS", 2, int))
    root = staged_root()
    standin = REPO / "models" / "standin"
    build_standin(standin, root, progress=False)
    out = Path(env("OUT", "runs/bench/teacher-tune")).resolve()
    val = validation_folder(root, out / "validation")
    lt = longtail_items(root)
    lt_sizes = np.bincount([c for _, c in lt], minlength=10).tolist()
    val_lt = validation_folder(root, out / "validation-longtail", lt_sizes)
    chosen = [s for s in env("TUNE", ",".join(SWEEPS)).split(",") if s]
    results: dict = {"validation": str(val), "longtail_sizes": lt_sizes}
    base = [f"models.clip={standin / 'clip'}", f"models.expert={standin / 'expert'}"]
    for name in chosen:
        key, values, column, extra = SWEEPS[name]
        results[name] = {}
        for v in values:
            for label, folder in (("balanced", val), ("long-tailed", val_lt)) if name == "prior_shrink" else \
                    (("balanced", val),):
                # the long-tailed check reads the same images as the unlabeled pool (transductive), so the
                # prior is estimated on them
                unl = [f"data.unlabeled={folder}"] if label == "long-tailed" else []
                run = out / f"{name}-{v}-{label}"
                run.mkdir(parents=True, exist_ok=True)
                _copy_caches(out / f"{name}-{values[0]}-{label}", run, ("teacher/features",))
                write_table(run / "teacher" / "synthetic.parquet", synthetic_rows(standin, "adapted"))
                t0 = time.perf_counter()
                _stage(["teacher", "--job", str(JOB), "--no-progress", "--no-report", f"run_dir={run}",
                        f"data.eval={folder}", f"{key}={v}", *base, *extra, *unl])
                top1 = read_json(run / "teacher" / "eval.json")["columns"][column]["top1"]
                results[name][f"{v} ({label})"] = {"top1": top1, "seconds": round(time.perf_counter() - t0, 1)}
                print(f"  {name}: {key}={v} ({label}): {column} {100 * top1:.2f}% on labeled_pool validation",
                      flush=True)
    print()
    for name in chosen:
        key, _, column, _ = SWEEPS[name]
        print(f"{key} ({column}, top-1 on labeled_pool's pretraining split): " +
              ", ".join(f"{k} {100 * r['top1']:.2f}%" for k, r in results[name].items()))
    return results
