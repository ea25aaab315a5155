#!/usr/bin/env python3
"""Minimal example app: classify a folder of images, image files, or frames of a video / camera.

    python app.py images/                    # every image in a folder (or pass files)
    python app.py --video clip.mp4 --every 10  # every 10th frame of a video file (needs OpenCV)
    python app.py --camera 0                 # frames from camera 0, until Ctrl-C (needs OpenCV)
    python app.py images/ --model model/model.onnx --topk 3 --providers CPUExecutionProvider

Needs only the runtime (numpy, Pillow, onnxruntime + the distillery_runtime wheel); video and camera input
also need OpenCV (`pip install opencv-python-headless`, or JetPack's python3-opencv). Prints one line per image
or frame: source, label, probability (and the next best with --topk).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def default_model() -> str:
    with open(os.path.join(HERE, "golden.json"), encoding="utf-8") as f:
        return os.path.join(HERE, json.load(f)["model"])


def image_files(sources: list[str]) -> list[str]:
    out = []
    for s in sources:
        if os.path.isdir(s):
            out += sorted(os.path.join(s, n) for n in os.listdir(s) if n.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(s):
            out.append(s)
        else:
            raise FileNotFoundError(f"{s!r} is neither an image file nor a folder")
    return out


def show(source: str, pred) -> None:
    print("\t".join([source] + [f"{label}\t{p:.4f}" for label, p in pred.topk]), flush=True)


def frames(video: str | None, camera: int | None, every: int):
    """(name, RGB uint8 array) for every ``every``-th frame of a video file or camera, through OpenCV."""
    try:
        import cv2
    except ImportError:
        raise SystemExit("app: video and camera input need OpenCV, which is not installed: "
                         "`pip install opencv-python-headless` (x86), or `sudo apt install python3-opencv` on "
                         "JetPack. A folder of images needs no OpenCV.") from None
    cap = cv2.VideoCapture(video if video is not None else camera)
    if not cap.isOpened():
        what = f"video {video!r}" if video is not None else f"camera {camera}"
        raise SystemExit(f"app: OpenCV cannot open {what}")
    i = 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if i % every == 0:
                yield f"frame {i}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # the model expects RGB
            i += 1
    finally:
        cap.release()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Classify images, or frames of a video/camera, with the bundled model.")
    p.add_argument("sources", nargs="*", help="image files or folders of images")
    p.add_argument("--video", help="a video file (needs OpenCV)")
    p.add_argument("--camera", type=int, help="a camera index, e.g. 0 (needs OpenCV)")
    p.add_argument("--every", type=int, default=1, help="classify every N-th frame (default 1)")
    p.add_argument("--model", default=None, help="model file (default: the bundle's deployed model)")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--providers", default=None, metavar="P1,P2", help="onnxruntime execution providers in order")
    p.add_argument("--tensorrt", choices=["fp32", "fp16"], default=None,
                   help="run through a TensorRT engine built and cached on this device "
                        "(onnxruntime's TensorRT provider)")
    args = p.parse_args(argv)
    if bool(args.sources) + (args.video is not None) + (args.camera is not None) != 1:
        p.error("give image files/folders, or --video FILE, or --camera N (one of them)")
    if args.every < 1 or args.topk < 1:
        p.error("--every and --topk must be >= 1")

    try:
        from distillery.runtime import Classifier
    except ImportError as e:  # the runtime wheel or one of its requirements is not installed
        print(f"app: cannot import the runtime ({e}); install the bundle's requirements and wheel first:\n"
              "  pip install -r requirements-x86.txt wheels/*.whl\n"
              "(on a Jetson: requirements-jetpack.txt; see README.md)", file=sys.stderr)
        return 2

    providers = [s.strip() for s in args.providers.split(",") if s.strip()] if args.providers else None
    if args.tensorrt:
        clf = Classifier.load_tensorrt(args.model or default_model(), precision=args.tensorrt)
    else:
        clf = Classifier.load(args.model or default_model(), providers=providers)
    print(f"app: {clf.path} on {', '.join(clf.providers_in_use)}", file=sys.stderr)
    t0, n = time.perf_counter(), 0
    try:
        if args.sources:
            files = image_files(args.sources)
            for start in range(0, len(files), 32):
                batch = files[start:start + 32]
                for f, pred in zip(batch, clf.predict(batch, topk=args.topk)):
                    show(f, pred)
                n += len(batch)
        else:
            for name, rgb in frames(args.video, args.camera, args.every):
                show(name, clf.predict(rgb, topk=args.topk)[0])
                n += 1
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as e:
        print(f"app: error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    if n:
        print(f"app: {n} images in {dt:.2f} s ({1000 * dt / n:.1f} ms each)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
