"""Teacher ablations in the stand-in world: the alternatives behind AiR's and LaTTe-CLIP's defaults.

    python -m bench ablations        # after `python -m bench teacher` (reuses its run folder's caches)

Each variant reruns the product's own ``distillery teacher`` on examples/eurosat-standin.yaml in a run folder
of its own, with only the teachers it needs, and reads each column's top-1 on ``test/`` from the
``teacher/eval.json`` the stage writes. The synthetic table, the image-feature store and LaTTe-CLIP's
description cache are copied from the teacher benchmark's run folder, so no variant recomputes them.

The variants are measurements, not a search: the defaults were chosen before these ran, for the reasons
given in the README, and are not changed by what `test/` says here.

| variable | meaning | default |
|---|---|---|
| DISTILLERY_BENCH_OUT | the teacher benchmark's run folder | runs/bench/teacher |
| DISTILLERY_BENCH_ABLATIONS | comma list of variant names to run (see VARIANTS) | all |
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ._eurosat import REPO, env

JOB = REPO / "examples" / "eurosat-standin.yaml"
AIR_ONLY = ["teacher.latte.enabled=false", "teacher.vermouth.enabled=false"]
LATTE_ONLY = ["teacher.air.enabled=false", "teacher.vermouth.enabled=false", "teacher.latte.enabled=true"]
VARIANTS = {  # name -> (what it changes, overrides, the column it is about)
    "air-sum": ("AiR p̂ normalised by shift + row sum instead of softmax(100 p̂)",
                AIR_ONLY + ["teacher.air.aux_normalize=sum"], "air_fused"),
    "air-none": ("AiR raw mean cosines p̂ (the paper's formula, no normalisation)",
                 AIR_ONLY + ["teacher.air.aux_normalize=none"], "air_fused"),
    "air-lambda2": ("AiR fusion λ = 2", AIR_ONLY + ["teacher.air.fusion_lambda=2.0"], "air_fused"),
    "air-ctx-init": ("AiR context initialised from 'a {domain} of a' (5 tokens) instead of 16 random",
                     AIR_ONLY + ["teacher.air.ctx_init='a {domain} of a'", "teacher.air.n_ctx=5"], "air_prompt"),
    "air-top64": ("AiR prompt learning on the top 64 fused labels per class instead of 16",
                  AIR_ONLY + ["teacher.air.top_n=64"], "air_prompt"),
    "vermouth-real-0.6": ("Vermouth trained on the synthetic images plus the real ones clip labels with p >= 0.6",
                          ["teacher.air.enabled=false", "teacher.latte.enabled=false",
                           "teacher.vermouth.real_pseudo_labels=0.6"], "vermouth"),
    "latte-no-descriptions": ("LaTTe-CLIP with the class description only (no image or group descriptions)",
                              LATTE_ONLY + ["teacher.latte.use_image_descriptions=false",
                                            "teacher.latte.use_group_descriptions=false"], "latte"),
    "latte-mean-mixer": ("LaTTe-CLIP with the Dynamic Feature Mixer replaced by a plain mean",
                         LATTE_ONLY + ["teacher.latte.mixer=mean"], "latte"),
}


def _seed_caches(src: Path, dst: Path) -> None:
    """Copy the synthetic table, the feature store and the description cache of the teacher bench's run."""
    for rel in ("teacher/synthetic.parquet", "teacher/features", "teacher/latte/descriptions"):
        s, d = src / rel, dst / rel
        if not s.exists() or d.exists():
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if s.is_dir() else shutil.copy2)(s, d)


def main() -> dict:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillery.cli import main as cli
    from distillery.rundir import read_json

    base = Path(env("OUT", "runs/bench/teacher")).resolve()
    ref = base / "teacher" / "eval.json"
    if not ref.is_file():
        print(f"ablations: NOT RUN: {ref} is missing; run `python -m bench teacher` first (then `python -m bench "
              "ablations`).")
        return {"not_run": f"{ref} missing"}
    reference = read_json(ref)["columns"]
    chosen = [v for v in env("ABLATIONS", ",".join(VARIANTS)).split(",") if v]
    models = [f"models.clip={REPO / 'models' / 'standin' / 'clip'}", f"models.expert={REPO / 'models' / 'standin' / 'expert'}"]
    rows, out = [], {}
    for name in chosen:
        what, overrides, column = VARIANTS[name]
        run = base.parent / f"ablation-{name}"
        _seed_caches(base, run)
        t0 = time.perf_counter()
        rc = cli(["teacher", "--job", str(JOB), "--no-progress", "--no-report", f"run_dir={run}", *models, *overrides])
        secs = time.perf_counter() - t0
        cols = read_json(run / "teacher" / "eval.json")["columns"] if rc == 0 else {}
        got = (cols.get(column) or {}).get("top1")
        default = (reference.get(column) or {}).get("top1")
        out[name] = {"what": what, "column": column, "top1": got, "default_top1": default, "seconds": round(secs, 1),
                     "columns": {c: v["top1"] for c, v in cols.items()}}
        rows.append((name, column, default, got, secs, what))
    clip = (reference.get("clip") or {}).get("top1")
    print()
    print(f"stand-in zero-shot (clip column) {100 * clip:.2f}% on test/; default columns: " +
          ", ".join(f"{c} {100 * v['top1']:.2f}%" for c, v in reference.items()))
    print(f"{'variant':<22} {'column':<11} {'default':>8} {'variant':>8} {'Δ':>6} {'s':>5}  what")
    for name, column, d, g, secs, what in rows:
        fmt = lambda x: f"{100 * x:.2f}%" if x is not None else "  n/a"  # noqa: E731
        delta = f"{100 * (g - d):+.1f}" if g is not None and d is not None else ""
        print(f"{name:<22} {column:<11} {fmt(d):>8} {fmt(g):>8} {delta:>6} {secs:>5.0f}  {what}")
    print("(stand-in figures: whether a method works, not the papers' numbers; defaults were not chosen on these)")
    return out
