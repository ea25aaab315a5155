"""``distillery bundle --job FILE``: everything a device needs to run the exported model, in ``runs/<job>/bundle/``.

```
runs/<job>/bundle/
  model/<deployed file>             the format export/report.json deploys (runtime/classifier.py deployed_model)
  model/report.json                 the export report (parity per format, the deploy choice)
  model/model.pre.onnx              with export.preprocess_in_graph: the model taking a decoded uint8 image
  wheels/distillery_runtime-<v>-py3-none-any.whl   the runtime alone (numpy, Pillow, onnxruntime; never torch)
  requirements-x86.txt              numpy, Pillow, onnxruntime (or onnxruntime-gpu) for an x86 machine
  requirements-jetpack.txt          onnxruntime-gpu from NVIDIA's Jetson wheels; TensorRT comes with JetPack
  app.py                            example app: a folder of images, or frames of a video / camera (OpenCV)
  smoke_test.py                     does this device reproduce golden.json? (exit 0 / 1, names every mismatch)
  golden.json                       golden predictions: the runtime's on the bundled images, at bundle time
  images/                           a few real domain images, class-balanced by pseudo-label
  golden/                           the preprocessed (resized + cropped) RGB pixels of each, as binary PPM
  README.md                         install and run on the device
  bundle.json                       what is in the bundle: files and sha256, versions
```

The wheel is built from this repository's ``runtime/`` folder with ``pip wheel --no-deps`` of a generated,
runtime-only package definition (name ``distillery-runtime``, module ``distillery.runtime``, ``distillery``
left a namespace package), so it is pure Python and installs on x86 and on a Jetson's aarch64 alike.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from distillery.rundir import RunPaths, log, read_json, read_table, sha256_file, write_json

__all__ = ["make_bundle", "build_runtime_wheel", "choose_golden_images", "golden_predictions", "BUNDLE_FILES",
           "RUNTIME_DEPENDENCIES", "DEFAULT_TOLERANCE", "GOLDEN_IMAGES"]

REPO = Path(__file__).resolve().parents[1]
RUNTIME_SRC = REPO / "runtime"
BUNDLE_FILES = Path(__file__).resolve().parent / "bundle_files"
RUNTIME_DEPENDENCIES = ["numpy>=1.24", "Pillow>=10", "onnxruntime>=1.17"]
GOLDEN_IMAGES = 8
# Max |Δprobability| per class a device may differ by: CPU vs CPU reproduces to ~1e-6; CUDA / TensorRT FP32
# kernels and FP16 engines move probabilities by up to ~1e-3; a changed resize filter or crop moves them by
# more (the drift test measures it), and top-1 must match exactly.
DEFAULT_TOLERANCE = {"fp32": 0.01, "fp16": 0.02, "int8": 0.05}

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "distillery-runtime"
version = "{version}"
description = "The distillery runtime alone: classify images with an exported distillery ONNX model (no torch)."
requires-python = ">=3.8"
dependencies = {deps}

[project.scripts]
distillery-run = "distillery.runtime.cli:main"

[tool.setuptools]
packages = ["distillery.runtime"]
"""


def _version() -> str:
    try:
        return metadata.version("distillery")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def build_runtime_wheel(out_dir: str | os.PathLike, *, python: str = sys.executable) -> Path:
    """Build ``distillery_runtime-<version>-py3-none-any.whl`` into ``out_dir`` from ``runtime/*.py``; returns it.

    Uses ``pip wheel --no-deps`` on a generated package definition in a temporary folder that holds only the
    runtime modules; build isolation is turned off when setuptools is importable here (no download).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    version = _version()
    with tempfile.TemporaryDirectory(prefix="distillery-wheel-") as tmp:
        src = Path(tmp) / "src"
        pkg = src / "distillery" / "runtime"
        pkg.mkdir(parents=True)
        for f in sorted(RUNTIME_SRC.glob("*.py")):
            shutil.copyfile(f, pkg / f.name)
        (src / "pyproject.toml").write_text(_PYPROJECT.format(version=version, deps=json.dumps(RUNTIME_DEPENDENCIES)))
        (src / "README.md").write_text("distillery runtime: numpy + Pillow + onnxruntime inference, no torch.\n")
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(Path(tmp) / "dist")]
        try:
            import setuptools  # noqa: F401

            cmd.append("--no-build-isolation")
        except ImportError:
            pass
        res = subprocess.run(cmd + [str(src)], capture_output=True, text=True)
        wheels = sorted((Path(tmp) / "dist").glob("distillery_runtime-*-py3-none-any.whl"))
        if res.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"building the runtime wheel failed (pip wheel exit {res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()[-2000:]}")
        for old in out_dir.glob("distillery_runtime-*.whl"):
            old.unlink()
        dst = out_dir / wheels[0].name
        shutil.copyfile(wheels[0], dst)
    _check_wheel(dst)
    return dst


def _check_wheel(path: Path) -> None:
    """The wheel holds distillery/runtime/*.py and its metadata only; nothing imports torch."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        code = [n for n in names if not n.startswith("distillery_runtime-")]
        bad = [n for n in code if not n.startswith("distillery/runtime/")]
        if bad or not any(n.endswith("classifier.py") for n in code):
            raise RuntimeError(f"{path}: unexpected wheel contents {bad or names}")
        for n in code:
            text = z.read(n).decode("utf-8")
            if any(line.strip().startswith(("import torch", "from torch")) for line in text.splitlines()):
                raise RuntimeError(f"{path}: {n} imports torch; the runtime must not")


def choose_golden_images(paths: RunPaths, report: dict, n: int = GOLDEN_IMAGES, seed: int = 0,
                         job=None) -> list[str]:
    """``n`` real domain images, class-balanced by pseudo-label (``teacher/pseudo_labels.parquet``); the export's
    parity images when the run has no pseudo-labels. With ``job``, a row outside its run and data folders is
    refused."""
    from distillery.export.images import balanced_sample

    rows = []
    if paths.pseudo_labels.is_file():
        rows = [{"path": r["path"], "label": r["label"]} for r in read_table(paths.pseudo_labels, "pseudo labels")]
        if job is not None:
            from distillery.images import check_table_paths

            check_table_paths(job, rows, paths.pseudo_labels)
        rows = [r for r in rows if Path(r["path"]).is_file()]
    if not rows:
        rows = [{"path": p, "label": 0} for p in report.get("parity_images", []) if Path(p).is_file()]
    if not rows:
        raise FileNotFoundError(f"bundle: no real images for the smoke test: {paths.pseudo_labels} is missing and "
                                "the export report lists no parity image that still exists; run the teacher stage.")
    return balanced_sample(rows, n, seed=seed)


def golden_predictions(model: str | os.PathLike, images: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """The runtime's predictions (CPU) for each image: top-1 index and label, every class probability."""
    from distillery.runtime import Classifier

    clf = Classifier.load(model, providers=["CPUExecutionProvider"])
    out = []
    for path, pred in zip(images, clf.predict([str(p) for p in images], topk=len(clf.class_names))):
        probs = [0.0] * len(clf.class_names)
        for label, p in pred.topk:
            probs[clf.class_names.index(label)] = p
        out.append({"index": pred.index, "label": pred.label, "probabilities": probs})
    return out


def _requirements_x86(versions: dict[str, str]) -> str:
    deps = "\n".join(RUNTIME_DEPENDENCIES)
    return f"""\
# distillery runtime on an x86-64 machine (Linux, Windows, macOS): pip install -r requirements-x86.txt
# then:  pip install wheels/distillery_runtime-*-py3-none-any.whl
# Golden predictions were made with numpy {versions['numpy']}, Pillow {versions['Pillow']},
# onnxruntime {versions['onnxruntime']}.
# For an NVIDIA GPU replace onnxruntime by onnxruntime-gpu (same module; never install both).
{deps}
"""


def _requirements_jetpack(versions: dict[str, str]) -> str:
    return f"""\
# distillery runtime on an NVIDIA Jetson (JetPack 6, aarch64). TensorRT, CUDA and cuDNN come with JetPack
# (apt: nvidia-jetpack / nvidia-tensorrt); they are not pip packages here. onnxruntime-gpu for Jetson is not on
# PyPI (PyPI's aarch64 onnxruntime is CPU only): take NVIDIA's Jetson wheel, from the Jetson AI Lab index that
# matches your JetPack/CUDA (below: JetPack 6, CUDA 12.6; JetPack 5 / CUDA 11.4 wheels are listed in NVIDIA's
# "Jetson Zoo" page), or download the .whl and name its path instead of the line below.
#   pip install -r requirements-jetpack.txt
#   pip install --no-deps wheels/distillery_runtime-*-py3-none-any.whl   # --no-deps: keep onnxruntime-gpu
# Golden predictions were made with numpy {versions['numpy']}, Pillow {versions['Pillow']},
# onnxruntime {versions['onnxruntime']} (x86 CPU).
--extra-index-url https://pypi.jetson-ai-lab.io/jp6/cu126
onnxruntime-gpu>=1.17
# NVIDIA's Jetson onnxruntime-gpu wheels are built against numpy 1.x
numpy>=1.24,<2
Pillow>=10
"""


def _readme(job_name: str, model_rel: str, deploy: dict, golden: dict, wheel: str, contract: dict) -> str:
    tmpl = (BUNDLE_FILES / "README.md.in").read_text(encoding="utf-8")
    fmt, why = deploy.get("format") or "?", deploy.get("why", "")
    why = why[len(fmt) + 1:].strip() if why.startswith(f"{fmt}:") else why  # the reason already names the format
    return tmpl.format(job=job_name, model=model_rel, wheel=wheel, n_images=len(golden["images"]),
                       tolerance=golden["tolerance"]["probability"], format=fmt,
                       why=why, classes=", ".join(golden["class_names"]),
                       contract=json.dumps(contract))


def make_bundle(job, *, n_images: int = GOLDEN_IMAGES, progress: bool = True) -> Path:
    """Write ``runs/<job>/bundle/`` from the job's export folder; returns the bundle folder.

    Rewritten from scratch each time (a file of an older bundle never lingers). FileNotFoundError when the
    export is missing.
    """
    from distillery.runtime.classifier import deployed_model

    paths = RunPaths(job.run_path)
    if not paths.export_report.is_file():
        raise FileNotFoundError(f"bundle: {paths.export_report} is missing; export the student first "
                                "(`distillery export --job JOB.yaml`).")
    report = read_json(paths.export_report)
    model_src = Path(deployed_model(paths.export))
    deploy = report.get("deploy") or {"format": "fp32", "file": model_src.name, "why": "no deploy entry: model.onnx"}
    out = paths.root / "bundle"
    tmp = paths.root / ".bundle.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    shutil.copyfile(model_src, tmp / "model" / model_src.name)
    shutil.copyfile(paths.export_report, tmp / "model" / "report.json")
    if model_src.suffix == ".engine":  # an engine's metadata lives in its sidecar
        shutil.copyfile(str(model_src) + ".json", tmp / "model" / (model_src.name + ".json"))
    for side in ("text_embeddings.npz", "text_encoder.onnx", "bpe_simple_vocab_16e6.txt.gz"):  # embedding students
        if (paths.export / side).is_file():
            shutil.copyfile(paths.export / side, tmp / "model" / side)
    pre = paths.export / "model.pre.onnx"  # export.preprocess_in_graph: the same network taking decoded images
    if pre.is_file() and (report.get("preprocess_in_graph") or {}).get("file"):
        shutil.copyfile(pre, tmp / "model" / pre.name)
    wheel = build_runtime_wheel(tmp / "wheels")

    from distillery.runtime import Classifier

    clf = Classifier.load(tmp / "model" / model_src.name, providers=["CPUExecutionProvider"])
    chosen = choose_golden_images(paths, report, n_images, seed=job.seed, job=job)
    (tmp / "images").mkdir()
    (tmp / "golden").mkdir()
    copied, crops = [], []
    for i, src in enumerate(chosen):
        name = f"{i:02d}_{Path(src).name}"
        shutil.copyfile(src, tmp / "images" / name)
        crop = f"golden/{Path(name).stem}.ppm"
        clf.pixels(tmp / "images" / name).save(tmp / crop, format="PPM")
        copied.append(f"images/{name}")
        crops.append(crop)
    preds = golden_predictions(tmp / "model" / model_src.name, [tmp / c for c in copied])
    import numpy
    import PIL
    import onnxruntime

    versions = {"numpy": numpy.__version__, "Pillow": PIL.__version__, "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(), "machine": platform.machine()}
    fmt = str(clf.metadata.get("format", deploy.get("format") or "fp32"))
    golden = {
        "model": f"model/{model_src.name}",
        "model_sha256": sha256_file(tmp / "model" / model_src.name),
        "format": fmt,
        "class_names": clf.class_names,
        "preprocess": clf.contract,
        "tolerance": {"probability": DEFAULT_TOLERANCE.get(fmt, 0.02), "top1": "exact"},
        "made_with": versions,
        "images": [{"file": f, "crop": c, "source": Path(s).name, **p}
                   for f, c, s, p in zip(copied, crops, chosen, preds)],
    }
    write_json(tmp / "golden.json", golden)
    (tmp / "requirements-x86.txt").write_text(_requirements_x86(versions))
    (tmp / "requirements-jetpack.txt").write_text(_requirements_jetpack(versions))
    for name in ("app.py", "smoke_test.py"):
        shutil.copyfile(BUNDLE_FILES / name, tmp / name)
    (tmp / "README.md").write_text(_readme(job.name, golden["model"], deploy, golden, wheel.name, clf.contract))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:  # atomic writes create 0600 files; a bundle is meant to be copied and shared
        p.chmod(0o644)
    write_json(tmp / "bundle.json", {
        "job": job.name, "deploy": {k: deploy.get(k) for k in ("format", "file", "why")},
        "wheel": f"wheels/{wheel.name}", "versions": versions,
        "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}})
    (tmp / "bundle.json").chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if progress:
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        log(f"bundle: {out} ({size / 1e6:.1f} MB): {golden['model']} ({fmt}), {wheel.name}, "
            f"{len(copied)} golden images; on the device: python smoke_test.py")
    return out
