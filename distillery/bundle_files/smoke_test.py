#!/usr/bin/env python3
"""Smoke test for a distillery bundle: does this device reproduce the export's golden predictions?

    python smoke_test.py                      # the bundle's model, default providers (CUDA/TensorRT where present)
    python smoke_test.py --providers CPUExecutionProvider
    python smoke_test.py --model other.onnx   # check another copy of the model against the same golden file
    python smoke_test.py --tensorrt fp16      # through a TensorRT engine built (and cached) on this device

Needs only the runtime (numpy, Pillow, onnxruntime + the bundled distillery_runtime wheel). For every
bundled image it runs the runtime's full path (decode, resize, crop, normalise, network, softmax) and
compares with golden.json, written when the bundle was made: the top-1 class must be the same and every
class probability within the tolerance. It also compares the preprocessed pixels with the bundled crops
(golden/*.ppm), so a failure says whether preprocessing or the network output drifted.
Exit status 0: all images match; 1: a mismatch (each one named with expected and got); 2: cannot run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=HERE, help="bundle folder (default: the folder of this script)")
    p.add_argument("--model", default=None, help="model file to check (default: the bundle's deployed model)")
    p.add_argument("--providers", default=None, metavar="P1,P2",
                   help="onnxruntime execution providers in order (default: the runtime's: CUDA if present, CPU)")
    p.add_argument("--tensorrt", choices=["fp32", "fp16"], default=None,
                   help="run through onnxruntime's TensorRT provider, building/reusing an engine of this precision "
                        "on this device (Classifier.load_tensorrt); fp16 allows |Δp| up to 0.02")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |Δprobability| per class (default: golden.json's)")
    args = p.parse_args(argv)

    try:
        import numpy as np
        from PIL import Image

        from distillery.runtime import Classifier
    except ImportError as e:
        print(f"smoke test: cannot import the runtime ({e}); install the bundle's requirements and wheel "
              "(see README.md)", file=sys.stderr)
        return 2
    golden_path = os.path.join(args.bundle, "golden.json")
    try:
        with open(golden_path, encoding="utf-8") as f:
            golden = json.load(f)
    except (OSError, ValueError) as e:
        print(f"smoke test: cannot read {golden_path}: {e}", file=sys.stderr)
        return 2
    model = args.model or os.path.join(args.bundle, golden["model"])
    tol = float(golden["tolerance"]["probability"] if args.tolerance is None else args.tolerance)
    if args.tensorrt == "fp16" and args.tolerance is None:
        tol = max(tol, 0.02)
    providers = [s.strip() for s in args.providers.split(",") if s.strip()] if args.providers else None
    try:
        with warnings.catch_warnings(record=True) as caught:  # one line each (provider fallback, TensorRT skip)
            warnings.simplefilter("always", RuntimeWarning)
            if args.tensorrt:
                clf = Classifier.load_tensorrt(model, precision=args.tensorrt)
            else:
                clf = Classifier.load(model, providers=providers)
        for w in caught:
            print(f"smoke test: warning: {w.message}")
        if args.tensorrt and clf.engine_cache["status"] != "skipped":
            print(f"smoke test: TensorRT engine {clf.engine_cache['status']}: {clf.engine_cache['why']}")
    except Exception as e:
        print(f"smoke test: cannot load {model}: {e}", file=sys.stderr)
        return 2
    print(f"smoke test: {model} on {', '.join(clf.providers_in_use)}; {len(golden['images'])} images, "
          f"tolerance |Δp| <= {tol:g}")
    if not args.model and golden.get("model_sha256") and _sha256(model) != golden["model_sha256"]:
        print(f"smoke test: note: {model} differs from the file the golden predictions were made with "
              f"(sha256 {golden['model_sha256'][:12]}…)")

    failures = []
    for item in golden["images"]:
        path = os.path.join(args.bundle, item["file"])
        try:
            crop = np.asarray(clf.pixels(path), dtype=np.int16)
            pred = clf.predict(path, topk=len(clf.class_names))[0]
        except Exception as e:
            failures.append(f"{item['file']}: could not be classified: {e}")
            continue
        probs = np.zeros(len(clf.class_names))
        for label, prob in pred.topk:
            probs[clf.class_names.index(label)] = prob
        expected = np.asarray(item["probabilities"], dtype=np.float64)
        pixel_note = ""
        ref = os.path.join(args.bundle, item["crop"]) if item.get("crop") else None
        if ref and os.path.isfile(ref):
            want = np.asarray(Image.open(ref).convert("RGB"), dtype=np.int16)
            if want.shape != crop.shape:
                pixel_note = f"; preprocessed image is {crop.shape}, the bundle's is {want.shape}"
            else:
                d = np.abs(want - crop)
                if d.max() > 0:
                    pixel_note = (f"; preprocessed pixels differ from the bundle's crop (max {int(d.max())}/255, "
                                  f"mean {d.mean():.2f}): resize/crop/decode drifted")
        if probs.shape != expected.shape:
            failures.append(f"{item['file']}: the model has {len(probs)} classes, golden.json {len(expected)}")
            continue
        dp = float(np.abs(probs - expected).max())
        top_ok = pred.index == item["index"]
        line = (f"{item['file']}: expected {item['label']!r} (p={expected[item['index']]:.4f}), "
                f"got {pred.label!r} (p={pred.probability:.4f}), max |Δp| {dp:.2e}{pixel_note}")
        if top_ok and dp <= tol:
            print(f"  ok    {line}")
        else:
            why = "top-1 differs" if not top_ok else f"|Δp| {dp:.2e} > tolerance {tol:g}"
            failures.append(f"{line} -- {why}")
    if failures:
        print(f"smoke test FAILED: {len(failures)} of {len(golden['images'])} images do not reproduce the "
              "golden predictions:", file=sys.stderr)
        for f in failures:
            print(f"  FAIL  {f}", file=sys.stderr)
        print("Check that the device runs the bundled model file and wheel (not another preprocessing), and the "
              "onnxruntime/Pillow versions in golden.json.", file=sys.stderr)
        return 1
    print(f"smoke test passed: {len(golden['images'])} images reproduce the golden predictions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
