"""``distillery run MODEL IMAGE|FOLDER... [--json] [--topk K] [--text-embeddings FILE]``: classify images with an exported model.

Prints one line per image, ``path<TAB>label<TAB>probability`` (with ``--topk K`` the next best
``label<TAB>probability`` pairs follow on the same line), or with ``--json`` one JSON object per
line. Exit status 0 on success, 2 for a missing/corrupt image, a bad model or bad arguments.
Needs only numpy, Pillow and onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``run`` arguments to ``p`` (so the top-level CLI can mount it as a subcommand)."""
    p.add_argument("model", metavar="MODEL",
                   help="the export folder written by `distillery export` (runs/<job>/export: runs the format its "
                        "report.json deploys) or one of its model files (model.onnx, model.int8.onnx, ...)")
    p.add_argument("images", metavar="IMAGE", nargs="+",
                   help="image files to classify, or folders (every image under them, recursively, sorted)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of tab-separated text")
    p.add_argument("--topk", type=int, default=1, metavar="K", help="also print the next best K-1 classes (default 1)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per inference batch (default 32)")
    p.add_argument("--providers", default=None, metavar="P1,P2",
                   help="onnxruntime execution providers in order, e.g. CPUExecutionProvider "
                        "(default: CUDA if available, then CPU); a requested provider that is not in use is "
                        "reported on stderr")
    p.add_argument("--text-embeddings", default=None, metavar="FILE",
                   help="embedding models only: classify into the classes of this text-embeddings .npz instead of "
                        "the exported ones (new classes without retraining; see distillery.runtime.embeddings)")
    p.add_argument("--exact-decode", action="store_true",
                   help="decode large JPEG files at full size (default: draft-mode decoding, within 5/255 of it)")
    return p


def expand_images(items: Sequence[str]) -> list[str]:
    """The image files named by ``items``: a file as given, a folder as the image files under it (recursive,
    sorted, hidden files skipped). Raises ValueError naming a path that does not exist or a folder without images."""
    from .evaluate import EXTENSIONS

    out, missing = [], []
    for item in items:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not found:
                raise ValueError(f"folder {item!r} has no images ({', '.join(EXTENSIONS)}, searched recursively).")
            out += found
        elif os.path.isfile(item):
            out.append(item)
        else:
            missing.append(item)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"image {missing[0]!r} does not exist{more}; check the path.")
    return out


def _error(msg: str) -> int:
    print(f"distillery run: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the ``run`` subcommand from parsed arguments; returns the exit status."""
    from .classifier import Classifier

    if args.topk < 1:
        return _error(f"--topk {args.topk}: must be >= 1.")
    if args.batch_size < 1:
        return _error(f"--batch-size {args.batch_size}: must be >= 1.")
    try:
        args.images = expand_images(args.images)
    except ValueError as e:  # fail before loading anything
        return _error(str(e))
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            clf = Classifier.load(args.model, providers=providers, fast_decode=not args.exact_decode)
        if args.text_embeddings:
            if not hasattr(clf, "load_class_embeddings"):
                return _error(f"--text-embeddings: {args.model!r} is not an ONNX embedding model.")
            clf.load_class_embeddings(args.text_embeddings)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        return _error(str(e))
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            print(f"distillery run: warning: {w.message}", file=sys.stderr)
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        try:  # errors name the image; decoding happens inside predict so large JPEGs can use draft mode
            preds = clf.predict(paths, topk=args.topk, batch_size=args.batch_size)
        except (OSError, ValueError) as e:
            return _error(str(e))
        for path, pred in zip(paths, preds):
            if args.json:
                print(json.dumps({"path": path, "label": pred.label, "index": pred.index,
                                  "probability": pred.probability,
                                  "topk": [{"label": lab, "probability": p} for lab, p in pred.topk]}))
            else:
                print("\t".join([path] + [f"{lab}\t{p:.4f}" for lab, p in pred.topk]))
        sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``main(["model.onnx", "a.jpg", "--topk", "3"])`` -> exit status."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="distillery run", description="Classify images with a model exported by `distillery export`."))
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 on --help
        return int(e.code or 0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
