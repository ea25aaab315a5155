"""Teacher benchmark in the stand-in world: do the teacher methods beat the stand-in CLIP's zero-shot?

    python -m bench teacher                          # builds/reuses models/standin, then runs the job per seed
    DISTILLERY_BENCH_SEEDS=0 python -m bench teacher  # one seed (quicker)

No pretrained weights reach these machines, so the methods (AiR, LaTTe-CLIP, Vermouth, the transductive teacher)
are measured against *stand-ins* (``distillery standin``, distillery/standin.py): a small CLIP and a ResNet-18
expert trained here on labeled images seen through a source-domain transform S, and S-images in place of a
text-to-image generator (``adapted``: S at half strength, standing in for a domain-LoRA generator; ``base``: S).
The figures say whether a method *works* (closes part of the gap S opened); they are not the papers' numbers.

What it does, in one run:

1. Builds the stand-ins (or finds them up to date) in ``models/standin``.
2. Per seed (``DISTILLERY_BENCH_SEEDS``, default 0,1,2; the job's ``seed``: prompt-learning context, LaTTe's
   data order, Vermouth's noise and head, the student): writes the run's ``teacher/synthetic.parquet`` from the
   chosen generator variant and runs the product's own ``distillery teacher``, ``student``, ``export`` on
   examples/eurosat-standin.yaml (every registered teacher; the job's prior and ensemble). Seed 0 runs in
   ``DISTILLERY_BENCH_OUT`` (runs/bench/teacher; `bench ablations` and `bench embedding` read it), seed k in
   ``<OUT>-seed<k>``. Per column: mean ± sd over the seeds of its top-1 on ``test/`` (from the stage's own
   ``teacher/eval.json``), its top-1 before the prior correction, and the ensemble's label-free accuracy estimate.
3. The generator variants: seed 0 again with the ``base`` generator (clip, AiR, Vermouth, transduct): AiR's and
   Vermouth's change from base to adapted, beside the paper's domain-LoRA gain.
4. A long-tailed unlabeled set (``DISTILLERY_BENCH_LONGTAIL``): the real images of labeled_pool's pretraining split,
   180 of the largest class down to 18 of the smallest (ratio 10:1, class order shuffled with a fixed seed), run
   through the teacher stage (clip, AiR, transduct) with every prior mode and with the true shares as a given
   prior; the accuracy of each column and of the manifest's hard labels on those images (their labels are known
   here). It shows what ``uniform`` costs on an imbalanced domain and what the default does. Run folders
   ``<OUT>-longtail-<mode>``, ``<OUT>-basegen``.
5. Controls (benchmark code may read labels): (a) the stand-in CLIP's zero-shot on S(test), the ceiling the shift
   took away; (b) the prior-corrected zero-shot with each prior mode, and naive self-training (a linear head on
   frozen features from the zero-shot weights, on its most confident half per predicted class); (c) the oracle
   linear probe: a linear head on the frozen stand-in CLIP features trained with the labels of labeled_pool/;
   (d) LaTTe-CLIP with true labels: the same fine-tuning (settings, budget) on labeled_pool/ with c_zs = the true
   labels, measured on test/: separates "budget too small" from "labels too poor".

Settings (environment variables):

| variable | meaning | default |
|---|---|---|
| DISTILLERY_EUROSAT | the staged EuroSAT folder (labeled_pool/, train_unlabeled/, test/) | ../shared/data/eurosat |
| DISTILLERY_BENCH_STANDIN | stand-in folder | models/standin |
| DISTILLERY_BENCH_SEEDS | comma list of job seeds | 0,1,2 |
| DISTILLERY_BENCH_GENERATOR | generator variant of the main runs: adapted or base | adapted |
| DISTILLERY_BENCH_TEACHERS | teachers to enable (comma list) | every registered one |
| DISTILLERY_BENCH_ARGS | extra job overrides for every run (space-separated key=value) | none |
| DISTILLERY_BENCH_STUDENT | 1 = run the student and export per seed | 1 |
| DISTILLERY_BENCH_STUDENT_EPOCHS | student epochs | the job's (12) |
| DISTILLERY_BENCH_QAT_EPOCHS | export.int8_qat_epochs | 2 |
| DISTILLERY_BENCH_BASEGEN | 1 = the base-generator run (item 3) | 1 |
| DISTILLERY_BENCH_LONGTAIL | 1 = the long-tailed set (item 4) | 1 |
| DISTILLERY_BENCH_LATTE_CONTROL | 1 = LaTTe-CLIP with true labels (control d) | 1 |
| DISTILLERY_BENCH_SELFTRAIN_EPOCHS | control (b) epochs | 2 |
| DISTILLERY_BENCH_THREADS | torch threads | 2 |
| DISTILLERY_BENCH_OUT | run folder of seed 0 (its stages skip themselves when unchanged) | runs/bench/teacher |
| DISTILLERY_BENCH_SMOKE | 1 = test-size stand-ins in runs/bench/standin-smoke, one seed, 1 student epoch, tiny LaTTe: plumbing only, figures meaningless | 0 |
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


def synthetic_rows(standin: Path, variant: str = "adapted") -> list[dict]:
    """A generator variant's table (``generator.parquet`` = base, ``generator_adapted.parquet``) as the rows of a
    run's ``teacher/synthetic.parquet`` (synth.py's columns)."""
    from distillery.rundir import read_table
    from distillery.standin import generator_table

    rows = []
    index: dict[int, int] = {}
    for r in read_table(standin / generator_table(variant), f"stand-in {variant} generator table"):
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


def _copy_caches(src: Path, dst: Path, parts=("teacher/features", "teacher/latte/descriptions")) -> None:
    """Seed a run folder with another run's image-feature store (keyed by content: reused, never trusted blindly)."""
    for rel in parts:
        a, b = src / rel, dst / rel
        if a.is_dir() and not b.exists():
            b.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(a, b)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    import numpy as np

    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(m: float, sd: float, n: int) -> str:
    if m != m:
        return "n/a"
    return f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else "")


def run_seed(seed: int, out: Path, standin: Path, variant: str, teachers: list[str], base: list[str],
             student: bool) -> dict:
    """One seed through the product's stages; returns eval.json's columns, the ensemble's stamp and the student's."""
    from distillery.job import load_job
    from distillery.rundir import RunPaths, read_json, read_stamp, write_table

    overrides = [f"run_dir={out}", f"seed={seed}", *[f"teacher.{t}.enabled=true" for t in teachers], *base]
    out.mkdir(parents=True, exist_ok=True)
    job = load_job(JOB, overrides)
    paths = RunPaths(job.run_path)
    write_table(paths.synthetic, synthetic_rows(standin, variant), relative_to=paths.root)
    args = ["--job", str(JOB), "--no-progress", *overrides]
    times = {"teacher": _stage(["teacher", *args])}
    res: dict = {"seed": seed, "run": str(out), "seconds": times}
    eval_file = paths.teacher / "eval.json"
    res["columns"] = read_json(eval_file)["columns"] if eval_file.is_file() else {}
    res["ensemble"] = {k: v for k, v in read_stamp(paths.teacher, "ensemble").items() if k != "key"}
    res["prior"] = read_json(paths.prior) if paths.prior.is_file() else None
    res["teacher_stamps"] = {t: {k: v for k, v in read_stamp(paths.teacher, f"teacher-{t}").items()
                                 if k in ("seconds", "logit_scale", "prompt_label_counts", "steps", "loss_first",
                                          "loss_last", "zero_shot_label_counts", "proportions", "real_training_images")}
                             for t in _registered_teachers() if (paths.teacher / f".teacher-{t}.stamp.json").is_file()}
    if student:
        times["student"] = _stage(["student", *args])
        times["export"] = _stage(["export", *args])
        metrics = read_json(paths.student_metrics)
        res["student_top1"] = (metrics.get("eval") or {}).get("top1")
        res["export_report"] = str(paths.export / "report.json")
    return res


def longtail_items(root: Path, seed: int = 0, largest: int = 180, ratio: float = 10.0) -> list[tuple[Path, int]]:
    """The long-tailed set: labeled_pool's pretraining-split real images (the generator split stays out: its
    images are the generator's sources), class sizes from ``largest`` down to ``largest/ratio`` geometrically,
    the class order shuffled with ``seed``."""
    import numpy as np

    from distillery.standin import CLASSES, StandinSettings, split_pool

    items = [it for it in split_pool(root / "labeled_pool", StandinSettings()) if it["part"] == "pretrain"]
    order = np.random.default_rng(seed).permutation(len(CLASSES))
    sizes = np.zeros(len(CLASSES), int)
    sizes[order] = np.round(largest * ratio ** (-np.arange(len(CLASSES)) / (len(CLASSES) - 1))).astype(int)
    out = []
    for c in range(len(CLASSES)):
        out += [(it["path"], c) for it in items if it["class_index"] == c][:sizes[c]]
    return out


def run_longtail(root: Path, base_out: Path, standin: Path, base: list[str]) -> dict:
    """Item 4: every prior mode on the long-tailed set; the accuracy of each column and of the hard labels."""
    import numpy as np

    from distillery.rundir import read_json, read_table, sha256_file, write_table
    from distillery.standin import CLASSES

    items = longtail_items(root)
    folder = base_out.parent / f"{base_out.name}-longtail-images"
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for p, c in items:
        dest = folder / f"{CLASSES[c][0]}-{Path(p).name}"
        if not dest.exists():
            shutil.copy2(p, dest)
        truth[sha256_file(dest)] = c
    counts = np.bincount(list(truth.values()), minlength=len(CLASSES))
    shares = counts / counts.sum()
    names = [n[0] for _, n in CLASSES]
    modes = [("none", ["teacher.prior.mode=none"]), ("uniform", ["teacher.prior.mode=uniform"]), ("estimated", ["teacher.prior.mode=estimated"]),
             ("given (true shares)", ["teacher.prior.mode=given", "teacher.prior.given={" + ", ".join(
                 f"'{n}': {x:.6f}" for n, x in zip(names, shares)) + "}"])]
    out = {"sizes": dict(zip(folders_of(), counts.tolist())), "images": int(counts.sum()), "modes": {}}
    for mode, ov in modes:
        run = base_out.parent / f"{base_out.name}-longtail-{mode.split()[0]}"
        if mode != "none":
            _copy_caches(base_out.parent / f"{base_out.name}-longtail-none", run, ("teacher/features",))
        overrides = [f"run_dir={run}", f"data.unlabeled={folder}", "data.eval=null", "teacher.latte.enabled=false",
                     "teacher.vermouth.enabled=false", "teacher.air.enabled=true", "teacher.transduct.enabled=true",
                     *base, *ov]
        run.mkdir(parents=True, exist_ok=True)
        write_table(run / "teacher" / "synthetic.parquet", synthetic_rows(standin, "adapted"))
        t0 = time.perf_counter()
        _stage(["teacher", "--job", str(JOB), "--no-progress", "--no-report", *overrides])
        rows = read_table(run / "teacher" / "pseudo_labels.parquet")
        y = np.array([truth[r["sha256"]] for r in rows])
        res = {}
        for k in rows[0]:
            if k.startswith("p_"):
                pred = np.array([np.argmax(r[k]) for r in rows])
                res[k[2:]] = float((pred == y).mean())
        manifest = {r["sha256"]: r["label"] for r in read_table(run / "teacher" / "manifest.parquet") if r["source"] == "real"}
        hard = np.array([manifest[r["sha256"]] for r in rows])
        res["ensemble (manifest labels)"] = float((hard == y).mean())
        res["ensemble macro recall"] = float(np.mean([(hard[y == c] == c).mean() for c in range(len(CLASSES))]))
        prior = read_json(run / "teacher" / "prior.json")
        out["modes"][mode] = {"accuracy": res, "prior": prior.get("prior"), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def folders_of() -> list[str]:
    from distillery.standin import CLASSES

    return [f for f, _ in CLASSES]


def prior_controls(clip_dir: Path, names: list[str], templates: list[str], unlabeled: list[Path], test: list[Path],
                   truth, standin: Path, shrink: float) -> dict:
    """Control (b): the zero-shot at the model's own scale, corrected with each prior mode (product functions)."""
    import numpy as np

    from distillery.models import load_clip
    from distillery.rundir import read_table
    from distillery.teacher.clip import model_logit_scale
    from distillery.teacher.prior import count_bias, estimate_prior_from_prototypes

    model, _, _ = load_clip(str(clip_dir))
    s = model_logit_scale(model)
    w = _zero_shot_weights(clip_dir, names, templates)
    fu = _clip_features(clip_dir, unlabeled, shift=False)
    ft = _clip_features(clip_dir, test, shift=False)
    lu, lt = s * fu @ w.T, s * ft @ w.T
    out = {"logit_scale": s, "none": float(np.mean(lt.argmax(1) == truth))}
    out["uniform"] = float(np.mean((lt + count_bias(lu, np.full(len(names), 1 / len(names)))).argmax(1) == truth))
    for variant in ("adapted", "base"):
        rows = read_table(standin / __import__("distillery.standin", fromlist=["x"]).generator_table(variant))
        fg = _clip_features(clip_dir, [standin / r["path"] for r in rows], shift=False)
        pi, _ = estimate_prior_from_prototypes(fu, fg, [r["class_index"] for r in rows], len(names), shrink)
        out[f"estimated ({variant} generator)"] = float(np.mean((lt + count_bias(lu, pi)).argmax(1) == truth))
    return out


def oracle_probe(clip_dir: Path, names: list[str], templates: list[str], labeled: list[tuple[Path, int]],
                 test: list[Path], truth, steps: int = 300, seed: int = 0) -> dict:
    """Control (c): a linear head on frozen stand-in CLIP features, trained with labeled_pool/'s labels."""
    import numpy as np
    import torch

    w0 = _zero_shot_weights(clip_dir, names, templates)
    x = torch.from_numpy(_clip_features(clip_dir, [p for p, _ in labeled], shift=False))
    y = torch.tensor([c for _, c in labeled])
    ft = torch.from_numpy(_clip_features(clip_dir, test, shift=False))
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], len(names))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w0) * 10.0)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):  # full batch
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head(ft).argmax(1).numpy()
    return {"top1": float(np.mean(pred == truth)), "images": len(labeled), "steps": steps,
            "what": "linear head on frozen stand-in CLIP features of labeled_pool/ (all real images, true labels)"}


def latte_true_labels(job, labeled: list[tuple[Path, int]], test: list[Path], truth, out: Path) -> dict:
    """Control (d): LaTTe-CLIP's fine-tuning with the job's settings on labeled_pool/ images, c_zs = true labels."""
    import numpy as np
    import torch

    from distillery.models import load_clip
    from distillery.teacher.clip import encode_texts, logit_scale_of
    from distillery.teacher.latte import LatteCfg, LatteDataset, _pixel_batches, finetune, predict, train_transform

    cfg = job.teacher.latte
    run_cfg = LatteCfg(**{k: getattr(cfg, k) for k in LatteCfg.__dataclass_fields__})
    run_cfg.seed = job.seed
    run_cfg.use_image_descriptions = run_cfg.use_group_descriptions = False  # no captioner in a control
    model, preprocess, tokenizer = load_clip(job.models.clip)
    scale = logit_scale_of(cfg.predict_scale, model)
    class_texts = [run_cfg.class_template.format(c=c) for c in job.class_names]
    init = torch.from_numpy(encode_texts(model, tokenizer, class_texts, "cpu"))
    labels = [c for _, c in labeled]
    data = LatteDataset([p for p, _ in labeled], labels, class_texts, [class_texts[c] for c in labels],
                        [class_texts[c] for c in labels], train_transform(preprocess, run_cfg))
    t0 = time.perf_counter()
    model, protos, hist = finetune(model, tokenizer, data, init, run_cfg, "cpu", checkpoint_dir=out, progress=False,
                                   class_texts=class_texts)
    with torch.no_grad():
        p = predict(model, _pixel_batches(test, preprocess, 64), protos, scale).numpy()
    return {"top1": float(np.mean(p.argmax(1) == truth)), "images": len(labeled), "epochs": run_cfg.epochs,
            "lr": run_cfg.lr, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None}


def main() -> dict:
    import numpy as np
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillery.job import load_job
    from distillery.rundir import list_images, read_json
    from distillery.standin import StandinSettings, build_standin

    threads = env("THREADS", 2, int)
    torch.set_num_threads(threads)
    root = staged_root()
    smoke = bool(env("SMOKE", 0, int))
    standin = Path(env("STANDIN", "runs/bench/standin-smoke" if smoke else str(REPO / "models" / "standin"))).resolve()
    out = Path(env("OUT", "runs/bench/teacher-smoke" if smoke else "runs/bench/teacher")).resolve()
    settings = StandinSettings(threads=1, **(SMOKE_STANDIN if smoke else {}))
    seeds = [int(x) for x in env("SEEDS", "0" if smoke else "0,1,2").split(",") if x.strip()]
    variant = env("GENERATOR", "adapted")
    student = bool(env("STUDENT", 1, int))
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    info = build_standin(standin, root, settings, progress=False)
    times["standin (build or reuse)"] = time.perf_counter() - t0
    cal = info["calibration"]
    print(f"teacher bench: stand-ins {standin} (calibration on held-out labeled_pool: real {cal['real_top1']:.1%}, "
          f"S {cal['shifted_top1']:.1%}); seeds {seeds}; generator {variant}", flush=True)

    teachers = [t for t in env("TEACHERS", ",".join(_registered_teachers())).split(",") if t]
    base = [f"models.clip={standin / 'clip'}", f"models.expert={standin / 'expert'}",
            f"export.int8_qat_epochs={0 if smoke else env('QAT_EPOCHS', 2, int)}", *env("ARGS", "").split()]
    epochs = env("STUDENT_EPOCHS", 1 if smoke else 0, int)
    if epochs:
        base.append(f"student.epochs={epochs}")
    if smoke:
        base += ["teacher.latte.epochs=1", "teacher.latte.max_new_tokens=2", "teacher.vermouth.epochs=1"]
    # The stages know the models by reference, not content: runs made with other stand-ins start over.
    runs = {s: (out if i == 0 else out.parent / f"{out.name}-seed{s}") for i, s in enumerate(seeds)}
    extra = [out.parent / f"{out.name}-basegen"] + [out.parent / f"{out.name}-longtail-{m}" for m in
                                                     ("none", "uniform", "estimated", "given")]
    for run in [*runs.values(), *extra]:
        marker = run / "standin.key"
        if run.exists() and (not marker.is_file() or marker.read_text() != info["key"]):
            print(f"  stand-ins changed since the last run: removing {run}", flush=True)
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        marker.write_text(info["key"])

    per_seed = []
    for s, run in runs.items():
        if run != out:  # the feature store and description cache are keyed by content: reused, not trusted
            _copy_caches(out, run)
        t0 = time.perf_counter()
        per_seed.append(run_seed(s, run, standin, variant, teachers, base, student))
        times[f"seed {s}"] = time.perf_counter() - t0
        print(f"  seed {s}: " + ", ".join(f"{c} {100 * v['top1']:.2f}" for c, v in per_seed[-1]["columns"].items()) +
              (f"; student {100 * per_seed[-1]['student_top1']:.2f}" if per_seed[-1].get("student_top1") else "")
              + f" ({times[f'seed {s}']:.0f}s)", flush=True)

    job = load_job(JOB, [f"run_dir={out}", *base])
    folders = [c.folder for c in job.classes]
    names = [c.name for c in job.classes]
    test_items = labeled_items(root / "test", folders)
    test = [p for p, _ in test_items]
    truth = np.array([y for _, y in test_items])
    templates = [t.replace("{domain}", job.domain) for t in job.teacher.clip.templates]
    clip_dir = Path(job.models.clip)

    res: dict = {"standin": cal, "seeds": seeds, "generator": variant, "teachers": teachers, "per_seed": per_seed}
    cols = list(dict.fromkeys(c for r in per_seed for c in r["columns"]))
    summary = {}
    for c in cols:
        vals = [r["columns"].get(c, {}).get("top1") for r in per_seed]
        raw = [r["columns"].get(c, {}).get("top1_uncorrected") for r in per_seed]
        est = [r["columns"].get(c, {}).get("estimated_accuracy") for r in per_seed]
        summary[c] = {"top1": _mean_sd(vals), "top1_uncorrected": _mean_sd(raw), "estimated_accuracy": _mean_sd(est),
                      "per_seed": vals}
    res["summary"] = summary
    if student:
        st = [r.get("student_top1") for r in per_seed]
        ens = [r["columns"].get("ensemble", {}).get("top1") for r in per_seed]
        res["student"] = {"top1": _mean_sd(st), "per_seed": st,
                          "student_vs_ensemble": _mean_sd([a / b for a, b in zip(st, ens) if a and b])}
        res["export_top1"] = _int8_top1(Path(per_seed[0]["run"]) / "export", test, truth)

    if env("BASEGEN", 1, int):
        t0 = time.perf_counter()
        bg = out.parent / f"{out.name}-basegen"
        _copy_caches(out, bg, ("teacher/features",))
        other = "base" if variant == "adapted" else "adapted"
        r = run_seed(seeds[0], bg, standin, other, [t for t in teachers if t != "latte"],
                     base + ["teacher.latte.enabled=false"], False)
        res["generator_variants"] = {other: r["columns"]}
        times["other generator"] = time.perf_counter() - t0
    if env("LONGTAIL", 1, int):
        t0 = time.perf_counter()
        res["longtail"] = run_longtail(root, out, standin, base)
        times["long-tailed set"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    w0 = _zero_shot_weights(clip_dir, names, templates)
    s_test = float(np.mean((_clip_features(clip_dir, test, shift=True) @ w0.T).argmax(1) == truth))
    unlabeled = list_images(root / "train_unlabeled", EXTENSIONS)
    res["control_shifted_test_top1"] = s_test
    res["control_prior"] = prior_controls(clip_dir, names, templates, unlabeled, test, truth, standin,
                                          job.teacher.prior.shrink)
    res["control_self_training"] = self_training(clip_dir, names, templates, unlabeled, test, truth,
                                                 env("SELFTRAIN_EPOCHS", 2, int))
    labeled = labeled_items(root / "labeled_pool", folders, 10 if smoke else 0)
    res["control_oracle_probe"] = oracle_probe(clip_dir, names, templates, labeled, test, truth)
    times["controls a-c"] = time.perf_counter() - t0
    if env("LATTE_CONTROL", 1, int) and "latte" in teachers:
        t0 = time.perf_counter()
        ljob = load_job(JOB, [f"run_dir={out}", *base])
        res["control_latte_true_labels"] = latte_true_labels(ljob, labeled, test, truth, out.parent / f"{out.name}-latte-true-labels")
        times["control d: LaTTe with true labels"] = time.perf_counter() - t0

    _print(res, student)
    res["seconds"] = times
    res["wall_s"] = time.perf_counter() - t_start
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    if smoke:
        print("SMOKE RUN: test-size stand-ins, one seed, 1 student epoch; the figures are meaningless")
    print(f"teacher bench wall time {res['wall_s']:.0f}s (stand-in figures: whether a method works, not the papers' "
          "numbers)")
    return res


def _print(res: dict, student: bool) -> None:
    n = len(res["seeds"])
    summ = res["summary"]
    clip = summ.get("clip", {}).get("top1", (float("nan"),))[0]
    print()
    print(f"top-1 on test/ (%), mean ± sd over seeds {res['seeds']}, generator {res['generator']}:")
    print(f"{'column':<12} {'top-1':>14} {'before prior':>13} {'est. acc.':>9} {'vs clip':>8}   paper (EuroSAT)")
    for c, v in summ.items():
        m, sd = v["top1"]
        raw = _fmt(*v["top1_uncorrected"], 1) if v["top1_uncorrected"][0] == v["top1_uncorrected"][0] else ""
        est = _fmt(*v["estimated_accuracy"], 1) if v["estimated_accuracy"][0] == v["estimated_accuracy"][0] else ""
        gain = f"{100 * (m - clip):+.1f}" if c != "clip" and m == m and clip == clip else ""
        paper = ""
        if c in PAPER:
            label, zs, pm = PAPER[c]
            paper = f"{label} {zs} -> {pm} ({pm - zs:+.1f})" if zs is not None else f"{label} {pm} (16-shot)"
        elif c == "clip":
            paper = "CLIP ViT-B/32 zero-shot 42.0 (AiR) / 42.95 (LaTTe)"
        elif c.startswith("air_"):
            paper = "AiR 42.0 -> 55.7 (+13.7)" if c == "air_prompt" else ""
        print(f"{c:<12} {_fmt(m, sd, n):>14} {raw:>13} {est:>9} {gain:>8}   {paper}")
    if student and "student" in res:
        st = res["student"]
        print(f"student ({', '.join(f'{100 * x:.2f}' if x else 'n/a' for x in st['per_seed'])}): "
              f"{_fmt(*st['top1'], n)}; student / ensemble {st['student_vs_ensemble'][0]:.3f}; export (seed "
              f"{res['seeds'][0]}) " + ", ".join(f"{k} {100 * v:.2f}%" if v is not None else f"{k} not built"
                                                 for k, v in res.get("export_top1", {}).items()))
    if "generator_variants" in res:
        for other, cols in res["generator_variants"].items():
            print(f"generator {other} (seed {res['seeds'][0]}) vs {res['generator']}: " + ", ".join(
                f"{c} {100 * cols[c]['top1']:.2f} -> {100 * summ[c]['top1'][0]:.2f}" for c in
                ("air_aux", "air_fused", "air_prompt", "vermouth") if c in cols and c in summ)
                  + "  (paper: a domain LoRA adds +3.4 to +8)")
    if "longtail" in res:
        lt = res["longtail"]
        print(f"long-tailed set ({lt['images']} real labeled_pool images, sizes {lt['sizes']}): accuracy (%) of each "
              "column / the manifest's hard labels:")
        for mode, r in lt["modes"].items():
            print(f"  prior {mode:<20} " + ", ".join(f"{k} {100 * v:.1f}" for k, v in r["accuracy"].items()))
    cp = res["control_prior"]
    print(f"controls: zero-shot on S(test) {100 * res['control_shifted_test_top1']:.2f}% (the ceiling the shift took "
          f"away); prior-corrected zero-shot (scale {cp['logit_scale']:.1f}): " +
          ", ".join(f"{k} {100 * v:.2f}%" for k, v in cp.items() if k != "logit_scale"))
    stc = res["control_self_training"]
    print(f"  naive self-training {100 * stc['top1']:.2f}% (its zero-shot {100 * stc['zero_shot_top1']:.2f}%); oracle "
          f"linear probe on labeled_pool/ {100 * res['control_oracle_probe']['top1']:.2f}%" +
          (f"; LaTTe-CLIP with true labels {100 * res['control_latte_true_labels']['top1']:.2f}% "
           f"({res['control_latte_true_labels']['epochs']} epochs, lr {res['control_latte_true_labels']['lr']:g})"
           if "control_latte_true_labels" in res else ""))
