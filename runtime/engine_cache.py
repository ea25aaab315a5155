"""TensorRT engines built where they run: onnxruntime's TensorRT execution provider with its engine cache.

```python
from distillery.runtime import Classifier
clf = Classifier.load_tensorrt("bundle/model/model.onnx", precision="fp16")   # first load builds, later reuse
print(clf.engine_cache)  # {'status': 'built' | 'reused' | 'rebuilt' | 'skipped', 'dir': ..., 'key': {...}, ...}
```

A serialized TensorRT engine is only valid for the TensorRT version and the GPU that built it, and for the
precision and batch profile it was built with, so the cache is keyed by exactly those and the model file's
sha256: :func:`engine_key`. Each key gets its own folder under the cache root (default
``~/.cache/distillery/tensorrt``) holding onnxruntime's engine and timing caches and ``distillery-key.json``,
the key written after a successful build. :func:`cache_decision` reads that file before anything is loaded:
a folder without it, or with a key that differs in any component (a cache copied from another device, a
TensorRT upgrade, an edited model), is emptied and rebuilt, never trusted.

Without onnxruntime's TensorRT provider (onnxruntime-gpu with TensorRT, e.g. JetPack) this is skipped with one
RuntimeWarning line and the model runs on the default providers. Everything here but the session itself is
plain Python (numpy-free even), so the key logic is tested on machines without TensorRT.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

__all__ = ["KEY_FILE", "PRECISIONS", "DEFAULT_BATCH_PROFILE", "engine_key", "cache_decision", "cache_dir_for",
           "tensorrt_version", "gpu_name", "tensorrt_provider_options", "tensorrt_unavailable_reason",
           "load_tensorrt", "model_sha256"]

KEY_FILE = "distillery-key.json"
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_BATCH_PROFILE = (1, 8, 32)  # min / opt / max batch
KEY_FIELDS = ("model_sha256", "tensorrt", "gpu", "precision", "batch_profile")
from .embeddings import file_sha256  # noqa: E402

TRT_PROVIDER = "TensorrtExecutionProvider"


model_sha256 = file_sha256  # the sha256 of a model file, streamed (runtime/embeddings.py)


def engine_key(model_sha256: str, tensorrt: str, gpu: str, precision: str,
               batch_profile: Sequence[int]) -> dict[str, Any]:
    """The cache key: its five components and ``id``, a hash of all of them (the cache folder's name)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}.")
    profile = [int(b) for b in batch_profile]
    if len(profile) != 3 or not (1 <= profile[0] <= profile[1] <= profile[2]):
        raise ValueError(f"batch_profile {batch_profile!r}: expected (min, opt, max) with 1 <= min <= opt <= max.")
    parts = {"model_sha256": str(model_sha256), "tensorrt": str(tensorrt), "gpu": str(gpu),
             "precision": precision, "batch_profile": profile}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {**parts, "id": digest[:20]}


def cache_dir_for(root: str | os.PathLike, key: dict[str, Any]) -> Path:
    return Path(root) / key["id"]


def _engine_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.engine") if p.is_file()) if folder.is_dir() else []


def cache_decision(folder: str | os.PathLike, key: dict[str, Any]) -> tuple[str, str]:
    """What to do with a cache folder for ``key``: ``("reuse" | "build" | "rebuild", why)``.

    reuse: the key file matches every component and an engine file is there. build: nothing cached yet.
    rebuild: something is there that cannot be trusted (no/unreadable key file, a differing component, a key
    file without an engine); the folder is to be emptied first.
    """
    folder = Path(folder)
    key_path = folder / KEY_FILE
    present = folder.is_dir() and any(folder.iterdir())
    if not present:
        return "build", "no cached engine yet"
    if not key_path.is_file():
        return "rebuild", f"{folder} holds files but no {KEY_FILE} (an interrupted build or a foreign cache)"
    try:
        stored = json.loads(key_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return "rebuild", f"{key_path} is unreadable ({e})"
    if not isinstance(stored, dict):
        return "rebuild", f"{key_path} is not a JSON object"
    differ = [f for f in KEY_FIELDS if stored.get(f) != key[f]]
    if differ:
        what = ", ".join(f"{f} {stored.get(f)!r} != {key[f]!r}" for f in differ)
        return "rebuild", f"the cached engine was built for another {'/'.join(differ)} ({what})"
    if not _engine_files(folder):
        return "rebuild", f"{key_path} matches but the engine file is missing"
    return "reuse", f"engine cached for this model, TensorRT {key['tensorrt']}, {key['gpu']}, {key['precision']}"


def tensorrt_version() -> str | None:
    """The TensorRT version onnxruntime's provider will use: the ``tensorrt`` Python package's, else
    ``getInferLibVersion()`` of libnvinfer (JetPack installs the library without the Python package); None
    when neither exists."""
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:
        pass
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            lib = ctypes.CDLL(name)
            lib.getInferLibVersion.restype = ctypes.c_int32
            return f"libnvinfer {lib.getInferLibVersion()}"
        except (OSError, AttributeError):
            continue
    return None


def gpu_name() -> str | None:
    """The GPU's name: ``nvidia-smi`` (GPU index 0; CUDA_VISIBLE_DEVICES applies), else a Jetson's device-tree
    model; None when neither answers."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        if out.returncode == 0 and names:
            return names[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return Path("/proc/device-tree/model").read_text().strip("\x00\n ") or None
    except OSError:
        return None


def tensorrt_unavailable_reason(available_providers: Sequence[str] | None = None) -> str | None:
    """Why no TensorRT engine can be built here (one line), or None."""
    if available_providers is None:
        import onnxruntime as ort

        available_providers = ort.get_available_providers()
    if TRT_PROVIDER not in available_providers:
        return (f"this onnxruntime has no {TRT_PROVIDER} (providers: {', '.join(available_providers)}); install "
                "onnxruntime-gpu with TensorRT (on a Jetson: NVIDIA's onnxruntime-gpu wheel, TensorRT from JetPack)")
    if tensorrt_version() is None:
        return "onnxruntime has the TensorRT provider but libnvinfer (TensorRT) is not on the library path"
    return None


def tensorrt_provider_options(cache_dir: str | os.PathLike, precision: str, batch_profile: Sequence[int],
                              input_name: str, chw: Sequence[int]) -> dict[str, str]:
    """onnxruntime TensorRT provider options: engine + timing cache in ``cache_dir``, precision, batch profile."""
    c, h, w = (int(v) for v in chw)
    lo, opt, hi = (int(b) for b in batch_profile)
    shape = lambda b: f"{input_name}:{b}x{c}x{h}x{w}"  # noqa: E731
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_int8_enable": "True" if precision == "int8" else "False",  # int8: a QDQ model (model.int8.onnx)
        "trt_profile_min_shapes": shape(lo),
        "trt_profile_opt_shapes": shape(opt),
        "trt_profile_max_shapes": shape(hi),
    }


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("DISTILLERY_TRT_CACHE", os.path.join(base, "distillery", "tensorrt")))


def load_tensorrt(model: str | os.PathLike, *, cache_root: str | os.PathLike | None = None, precision: str = "fp16",
                  batch_profile: Sequence[int] = DEFAULT_BATCH_PROFILE, fast_decode: bool = True):
    """A :class:`~distillery.runtime.Classifier` on onnxruntime's TensorRT provider with a keyed engine cache.

    ``clf.engine_cache`` says what happened: ``status`` built | reused | rebuilt | skipped, ``why``, ``dir``,
    ``key``, ``seconds`` (session start + first run). Without TensorRT: one RuntimeWarning line, and the
    model runs on the default providers (``status: skipped``).
    """
    import numpy as np
    import onnxruntime as ort

    from .classifier import Classifier, deployed_model

    model = os.fspath(model)
    if os.path.isdir(model):
        model = deployed_model(model)
    reason = tensorrt_unavailable_reason(ort.get_available_providers())
    if reason is not None:
        warnings.warn(f"TensorRT engine skipped: {reason}; running {model} on the default providers",
                      RuntimeWarning, stacklevel=2)
        clf = Classifier.load(model, fast_decode=fast_decode)
        clf.engine_cache = {"status": "skipped", "why": reason, "dir": None, "key": None}
        return clf
    meta_probe = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    input_name = meta_probe.get_inputs()[0].name
    from .classifier import read_metadata

    chw = read_metadata(meta_probe, model)["preprocess"]["input_size"]
    del meta_probe
    key = engine_key(model_sha256(model), tensorrt_version(), gpu_name() or "unknown GPU", precision, batch_profile)
    folder = cache_dir_for(cache_root or _default_cache_root(), key)
    decision, why = cache_decision(folder, key)
    if decision == "rebuild":
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    opts = tensorrt_provider_options(folder, precision, batch_profile, input_name, chw)
    t0 = time.perf_counter()
    clf = Classifier.load(model, providers=[(TRT_PROVIDER, opts), "CUDAExecutionProvider", "CPUExecutionProvider"],
                          fast_decode=fast_decode, strict_providers=True)
    clf.predict_logits(np.zeros((int(batch_profile[1]), *chw), dtype=np.float32))  # builds the engine if needed
    seconds = time.perf_counter() - t0
    if decision != "reuse":
        if not _engine_files(folder):
            raise RuntimeError(f"{model}: onnxruntime's TensorRT provider wrote no engine into {folder}; check its "
                               "log (onnxruntime.set_default_logger_severity(0)).")
        (folder / KEY_FILE).write_text(json.dumps({k: key[k] for k in (*KEY_FIELDS, "id")}, indent=1))
    status = {"reuse": "reused", "build": "built", "rebuild": "rebuilt"}[decision]
    clf.engine_cache = {"status": status, "why": why, "dir": str(folder), "key": key, "seconds": round(seconds, 2)}
    return clf
