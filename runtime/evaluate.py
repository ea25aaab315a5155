"""``distillery eval MODEL FOLDER``: measure an exported model on a labeled folder (ImageFolder layout).

Top-1, per-class recall, the confusion matrix (rows: true class, columns: predicted) and the images it gets most
wrong (wrong predictions, most confident first), as text or ``--json``. Needs only numpy, Pillow and onnxruntime,
so it runs on the device as well.

Which sub-folder is which class: the run's own mapping when the model sits in a run folder (``job.resolved.json``
beside it or in the run's teacher/student folders: each class's ``folder``), else the sub-folder whose name equals
a class name ignoring case, spaces and punctuation. A sub-folder that matches no class, or a class without a
sub-folder, is an error naming it (it would silently change the accuracy). Every file is decoded first: one that
is not an image is an error naming it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["add_arguments", "run", "evaluate", "folder_mapping"]

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", metavar="MODEL", help="the export folder (runs/<job>/export: its deployed format) or a "
                                                  "model file (model.onnx, model.int8.onnx, ...)")
    p.add_argument("folder", metavar="FOLDER", help="labeled images, one sub-folder per class (ImageFolder layout)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON to FILE ('-' = stdout "
                                                                "instead of the text report)")
    p.add_argument("--worst", type=int, default=10, metavar="N", help="list the N most confident mistakes (default 10)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per inference batch (default 32)")
    p.add_argument("--providers", default=None, metavar="P1,P2", help="onnxruntime execution providers in order "
                                                                       "(default: CUDA if available, then CPU)")
    return p


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def _run_mapping(model: Path) -> dict[str, str] | None:
    """class name -> sub-folder name from the run folder the model belongs to, if any."""
    start = model if model.is_dir() else model.parent
    for folder in (start, start.parent / "student", start.parent / "teacher"):
        f = folder / "job.resolved.json"
        if f.is_file():
            try:
                classes = json.loads(f.read_text(encoding="utf-8")).get("classes") or []
                return {c["name"]: (c.get("folder") or c["name"]) for c in classes if isinstance(c, dict)}
            except (ValueError, KeyError, TypeError):
                return None
    return None


def folder_mapping(class_names: Sequence[str], subfolders: Sequence[str], run_mapping: dict[str, str] | None = None
                   ) -> dict[str, int]:
    """sub-folder -> class index; every sub-folder and every class matched once, else ValueError naming them."""
    out: dict[str, int] = {}
    for i, name in enumerate(class_names):
        want = (run_mapping or {}).get(name)
        hits = [d for d in subfolders if d == want] if want else []
        if not hits:
            hits = [d for d in subfolders if _norm(d) == _norm(name)]
        if len(hits) == 1:
            out[hits[0]] = i
    unmatched = [d for d in subfolders if d not in out]
    missing = [n for i, n in enumerate(class_names) if i not in out.values()]
    if unmatched or missing:
        raise ValueError(f"the sub-folders of the labeled folder do not match the model's classes: sub-folders without "
                         f"a class {unmatched}, classes without a sub-folder {missing}. Name each sub-folder after its "
                         "class (case, spaces and punctuation ignored), or keep the model in its run folder so the "
                         "job's folder names apply.")
    return out


def evaluate(clf, folder: str | os.PathLike, run_mapping: dict[str, str] | None = None, worst: int = 10,
             batch_size: int = 32) -> dict[str, Any]:
    """The figures of ``clf`` (a runtime classifier) on the labeled ``folder``."""
    from .preprocess import load_image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"labeled folder {str(root)!r} does not exist or is not a folder.")
    subfolders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    mapping = folder_mapping(clf.class_names, subfolders, run_mapping)
    items = [(p, mapping[d]) for d in subfolders for p in sorted((root / d).rglob("*"))
             if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    if not items:
        raise ValueError(f"no images in the class sub-folders of {str(root)!r}.")
    bad = []
    for p, _ in items:
        try:
            load_image(str(p))
        except (ValueError, OSError) as e:
            bad.append(f"{str(p)!r}: {str(e).splitlines()[0]}")
    if bad:
        raise ValueError(f"{len(bad)} file(s) under {str(root)!r} are not usable images ({'; '.join(bad[:3])}"
                         f"{'; ...' if len(bad) > 3 else ''}); remove them.")
    c = len(clf.class_names)
    truth = np.array([y for _, y in items])
    preds = clf.predict([str(p) for p, _ in items], topk=1, batch_size=batch_size)
    pred = np.array([p.index for p in preds])
    conf = np.array([p.probability for p in preds])
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (truth, pred), 1)
    recall = {n: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, n in enumerate(clf.class_names)}
    wrong = np.flatnonzero(pred != truth)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:max(0, worst)]
    return {"model": clf.path, "format": getattr(clf, "format", None), "folder": str(root), "images": len(items),
            "top1": float(np.mean(pred == truth)), "class_names": list(clf.class_names),
            "per_class_recall": recall, "confusion": cm.tolist(),
            "folders": {d: clf.class_names[i] for d, i in mapping.items()},
            "worst": [{"path": str(items[i][0]), "true": clf.class_names[truth[i]],
                       "predicted": clf.class_names[pred[i]], "probability": round(float(conf[i]), 4)}
                      for i in wrong]}


def _text(r: dict) -> str:
    names = r["class_names"]
    w = max(len(n) for n in names)
    lines = [f"{r['model']} ({r['format']}) on {r['folder']}: top-1 {100 * r['top1']:.2f}% of {r['images']} images",
             "", f"{'class':<{w}}  recall   images"]
    for i, n in enumerate(names):
        rec = r["per_class_recall"][n]
        lines.append(f"{n:<{w}}  {'   -  ' if rec is None else f'{100 * rec:5.1f}%'}  {sum(r['confusion'][i]):>6}")
    lines += ["", "confusion (rows: true, columns: predicted)",
              " " * (w + 2) + " ".join(f"{j:>5}" for j in range(len(names)))]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}}  " + " ".join(f"{x:>5}" for x in r["confusion"][i]) + f"   ({i})")
    if r["worst"]:
        lines += ["", "most confident mistakes:"]
        lines += [f"  {x['path']}\ttrue {x['true']}\tpredicted {x['predicted']} ({x['probability']:.3f})"
                  for x in r["worst"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .classifier import Classifier

    if args.worst < 0 or args.batch_size < 1:
        print("distillery eval: error: --worst must be >= 0 and --batch-size >= 1", file=sys.stderr)
        return 2
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    try:
        clf = Classifier.load(args.model, providers=providers)
        r = evaluate(clf, args.folder, _run_mapping(Path(args.model).resolve()), args.worst, args.batch_size)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"distillery eval: error: {e}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(r, indent=2))
        return 0
    print(_text(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="distillery eval", description=__doc__.splitlines()[0]))
    return run(p.parse_args(argv))
