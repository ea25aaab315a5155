"""Run a TensorRT engine written by ``distillery export`` (``model.<fmt>.engine`` + ``.engine.json`` sidecar).

```python
from distillery.runtime import Classifier
clf = Classifier.load("runs/eurosat/export/model.fp16.engine")  # -> TensorRTClassifier
```

A serialized engine only loads in the TensorRT version that built it (and on the GPU architecture it was
built for), and it carries no metadata of its own, so the sidecar JSON holds the ``distillery`` metadata
(class names, preprocessing contract) and the versions it was built with. :meth:`TensorRTClassifier.load`
refuses an engine whose sidecar TensorRT version differs from the installed one *before* touching the
engine, with a message saying how to rebuild.

Needs ``tensorrt`` and ``cuda-python`` (the ``trt`` extra); both import lazily, so this module itself
imports with numpy and Pillow only. Device memory is managed with the CUDA runtime API (cuda-python),
never torch.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np

from .classifier import METADATA_KEY, BaseClassifier, check_metadata

__all__ = ["TensorRTClassifier", "installed_tensorrt_version", "read_sidecar", "sidecar_path", "check_engine_versions"]


def sidecar_path(engine_path: str | os.PathLike) -> str:
    """``model.fp16.engine`` -> ``model.fp16.engine.json``."""
    return os.fspath(engine_path) + ".json"


def installed_tensorrt_version() -> str | None:
    """``tensorrt.__version__`` of the installed package, or None when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The engine's sidecar JSON, with its ``distillery`` metadata validated; ValueError/FileNotFoundError."""
    engine_path = os.fspath(engine_path)
    side = sidecar_path(engine_path)
    if not os.path.isfile(engine_path):
        raise FileNotFoundError(f"engine {engine_path!r} does not exist; build it with `distillery export` on the "
                                "target machine (it needs the tensorrt package and a CUDA GPU).")
    if not os.path.isfile(side):
        raise ValueError(f"engine {engine_path!r} has no sidecar {side!r} (class names, preprocessing contract and "
                         "the TensorRT version it was built with); rebuild it with `distillery export`.")
    try:
        with open(side, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"engine sidecar {side!r} is not readable JSON ({e}); "
                         "rebuild with `distillery export`.") from e
    if not isinstance(info, dict) or METADATA_KEY not in info or "tensorrt" not in info:
        raise ValueError(f"engine sidecar {side!r} lacks the {METADATA_KEY!r} metadata or the 'tensorrt' version; "
                         "rebuild the engine with `distillery export`.")
    check_metadata(info[METADATA_KEY], side)
    return info


def check_engine_versions(info: dict[str, Any], engine_path: str, installed: str | None) -> None:
    """Refuse an engine the installed TensorRT cannot load: not installed, or a different version."""
    built = str(info["tensorrt"])
    if installed is None:
        raise ImportError(f"engine {engine_path!r} needs TensorRT {built}, which is not installed; install it "
                          "(`pip install distillery[trt]`, or JetPack on a Jetson) or run the .onnx file instead.")
    if installed != built:
        raise RuntimeError(
            f"engine {engine_path!r} was built with TensorRT {built} but TensorRT {installed} is installed; a "
            "serialized engine only loads in the version that built it. Rebuild it on this machine "
            "(`distillery export --job JOB.yaml`, or export.build_tensorrt on the device), or run the .onnx file "
            f"(built on GPU {info.get('gpu', '?')!r}, CUDA {info.get('cuda', '?')}).")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise ImportError("running a TensorRT engine needs cuda-python for device memory "
                              "(`pip install distillery[trt]`).") from e
    return cudart


def _check(result):
    """cuda-python returns (err, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime call failed: {err}")
    return values[0] if len(values) == 1 else values


class TensorRTClassifier(BaseClassifier):
    """A TensorRT engine with the same ``predict`` API as the onnxruntime :class:`Classifier`.

    One execution context, device buffers sized for the profile's largest batch, and a lock around
    each run (an execution context is not thread-safe); bigger batches are run in chunks.
    """

    def __init__(self, engine, info: dict[str, Any], path: str, fast_decode: bool = True):
        super().__init__(info[METADATA_KEY], path, fast_decode)
        import tensorrt as trt

        self.sidecar = info
        self.providers_in_use = ["TensorRT"]
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise ValueError(f"{path}: expected one input and one output tensor, the engine has {ins} -> {outs}.")
        self.input_name, self.output_name = ins[0], outs[0]
        self.max_batch = int(info.get("profile", {}).get("max", 1))
        _, h, w = self.contract["input_size"]
        self._cudart = _cudart()
        self._lock = threading.Lock()
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._in_bytes = self.max_batch * 3 * h * w * 4  # float32 input, as exported
        self._out_bytes = self.max_batch * len(self.class_names) * 4  # float32 logits
        self._d_in = _check(self._cudart.cudaMalloc(self._in_bytes))
        self._d_out = _check(self._cudart.cudaMalloc(self._out_bytes))
        self.context.set_tensor_address(self.input_name, int(self._d_in))
        self.context.set_tensor_address(self.output_name, int(self._d_out))

    @classmethod
    def load(cls, path: str | os.PathLike, fast_decode: bool = True) -> "TensorRTClassifier":
        """Deserialize ``path`` after checking its sidecar against the installed TensorRT."""
        path = os.fspath(path)
        info = read_sidecar(path)
        check_engine_versions(info, path, installed_tensorrt_version())
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        with open(path, "rb") as f:
            engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
        if engine is None:
            raise ValueError(f"engine {path!r} could not be deserialized by TensorRT {trt.__version__} (built for "
                             f"GPU {info.get('gpu', '?')!r}); rebuild it on this machine with `distillery export`.")
        return cls(engine, info, path, fast_decode)

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, H, W)`` float batch -> ``(B, K)`` float32 logits, in chunks of the profile's max batch."""
        batch = np.ascontiguousarray(self.check_batch(batch), dtype=np.float32)
        cu = self._cudart
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        out = np.empty((len(batch), len(self.class_names)), dtype=np.float32)
        with self._lock:
            for s in range(0, len(batch), self.max_batch):
                x = np.ascontiguousarray(batch[s:s + self.max_batch])
                y = out[s:s + len(x)]
                self.context.set_input_shape(self.input_name, tuple(x.shape))
                _check(cu.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, self._stream))
                if not self.context.execute_async_v3(int(self._stream)):
                    raise RuntimeError(f"{self.path}: TensorRT execution failed for a batch of {len(x)}.")
                tmp = np.empty_like(y)
                _check(cu.cudaMemcpyAsync(tmp.ctypes.data, self._d_out, tmp.nbytes, d2h, self._stream))
                _check(cu.cudaStreamSynchronize(self._stream))
                y[...] = tmp
        return self._check_logits(out, len(batch))

    def __del__(self):
        cu = getattr(self, "_cudart", None)
        if cu is None:
            return
        for ptr in (getattr(self, "_d_in", None), getattr(self, "_d_out", None)):
            if ptr is not None:
                cu.cudaFree(ptr)
        if getattr(self, "_stream", None) is not None:
            cu.cudaStreamDestroy(self._stream)
