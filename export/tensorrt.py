"""Build TensorRT engines from the exported ONNX file (TensorRT 10 Python API), with a version sidecar.

```
runs/<job>/export/model.onnx
    -> runs/<job>/export/model.fp16.engine (+ .engine.json)   FP16 kernels allowed, float32 input/output
       runs/<job>/export/model.int8.engine (+ .engine.json)   INT8 with an entropy calibrator (when int8 is
                                                              in export.formats: same calibration images)
```

The network is parsed from the fp32 ONNX file (``trt.OnnxParser``), the batch axis gets one
optimisation profile (min/opt/max batch), and ``builder.build_serialized_network`` writes the plan.
The sidecar JSON carries the ``distillery`` metadata (an engine has no metadata of its own) and the
TensorRT, CUDA, GPU and JetPack versions: an engine only loads in the TensorRT version that built it,
on the GPU architecture it was built for, and ``distillery.runtime`` refuses it otherwise.

INT8 uses implicit quantisation with ``IInt8EntropyCalibrator2`` over the class-balanced calibration
images. TensorRT 10.1+ marks implicit quantisation deprecated in favour of explicit Q/DQ graphs; it
still builds, and ``model.int8.onnx`` (QDQ) is the explicit alternative should a later version drop it.

Engines are built where they run (a Jetson, a GPU server): TensorRT cannot be installed on machines
without NVIDIA's libraries, so ``export_onnx`` calls this only when ``tensorrt`` imports and a CUDA
device is visible, and otherwise records why in ``report.json``. torch provides the calibrator's
device buffer (it is installed wherever export runs); the runtime side uses cuda-python.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ENGINE_FILES", "tensorrt_unavailable_reason", "platform_versions", "build_engine"]

ENGINE_FILES = {"fp16": "model.fp16.engine", "int8": "model.int8.engine",
                # from the Model Optimizer files (export/modelopt_formats.py): explicit Q/DQ int8, 2:4 sparse fp16
                "int8_qdq": "model.int8_qdq.engine", "sparse24": "model.sparse24.engine"}
DEFAULT_BATCH_PROFILE = (1, 8, 32)  # min / opt / max batch of the optimisation profile
DEFAULT_WORKSPACE_MB = 1024


def tensorrt_unavailable_reason() -> str | None:
    """Why no engine can be built here (one line), or None when TensorRT and a CUDA device are both present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("tensorrt is not installed (`pip install distillery[trt]` on a machine with NVIDIA's libraries; "
                "on a Jetson it comes with JetPack)")
    except Exception as e:  # e.g. the wheel imports but libnvinfer is missing
        return f"tensorrt does not load ({type(e).__name__}: {e})"
    try:
        import torch

        if not torch.cuda.is_available():
            return "tensorrt is installed but no CUDA device is visible"
    except ImportError:
        return "torch is not installed (export needs it)"
    return None


def _jetpack_version() -> str | None:
    """JetPack (or L4T) release on a Jetson; None elsewhere."""
    try:
        out = subprocess.run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # "# R36 (release), REVISION: 3.0, ..." -> "L4T R36.3.0"
        head = Path("/etc/nv_tegra_release").read_text().splitlines()[0]
        release = head.split()[1]
        revision = head.split("REVISION:")[1].split(",")[0].strip()
        return f"L4T {release}.{revision}"
    except (OSError, IndexError):
        return None


def platform_versions() -> dict[str, Any]:
    """TensorRT, CUDA, GPU and JetPack versions of this machine (the sidecar's version fields)."""
    import tensorrt as trt
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "tensorrt": str(trt.__version__),
        "cuda": torch.version.cuda,
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "jetpack": _jetpack_version(),
        "machine": platform.machine(),
    }


def _entropy_calibrator(trt, data: np.ndarray, batch_size: int, cache_path: Path):
    """An ``IInt8EntropyCalibrator2`` feeding ``data`` (N, 3, H, W) float32 in full batches from one device buffer."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 needs the explicit base __init__
            self.data = np.ascontiguousarray(data, dtype=np.float32)
            self.batch_size = batch_size
            self.index = 0
            self.device = torch.empty((batch_size, *self.data.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names):  # -> one device pointer per input, or None when done
            if self.index + self.batch_size > len(self.data):
                return None
            chunk = self.data[self.index:self.index + self.batch_size]
            self.device.copy_(torch.from_numpy(chunk))
            torch.cuda.synchronize()
            self.index += self.batch_size
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_engine(onnx_path: str | Path, out_path: str | Path, metadata: dict[str, Any], precision: str,
                 calibration: np.ndarray | None = None, batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB) -> dict[str, Any]:
    """Parse ``onnx_path``, build a ``precision`` ("fp16", "int8"; "int8_qdq" or "sparse24" from those ONNX
    files) engine, write it and its sidecar.

    ``calibration``: preprocessed (N, 3, H, W) float32 images, required for int8. Returns the sidecar dict.
    Raises RuntimeError naming the parser errors or the failed build.
    """
    import tensorrt as trt

    if precision not in ENGINE_FILES:
        raise ValueError(f"precision {precision!r}: TensorRT engines are built as {', '.join(ENGINE_FILES)}.")
    lo, opt, hi = (int(v) for v in batch_profile)
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch_profile {batch_profile!r}: need 1 <= min <= opt <= max.")
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise ValueError("an int8 engine needs calibration images (the export's class-balanced calibration set).")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    if network.num_inputs != 1:
        raise RuntimeError(f"{onnx_path}: expected one input, the network has {network.num_inputs}.")
    inp = network.get_input(0)
    chw = tuple(int(d) for d in inp.shape[1:])  # (3, H, W); the batch axis is -1 (dynamic)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (lo, *chw), (opt, *chw), (hi, *chw))
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16)  # int8 engines keep fp16 for the layers TensorRT leaves unquantised
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        calib_batch = max(1, min(opt, hi, len(calibration)))
        config.int8_calibrator = _entropy_calibrator(trt, calibration, calib_batch,
                                                     out_path.with_suffix(out_path.suffix + ".calib"))
        config.set_calibration_profile(profile)
    elif precision == "int8_qdq":  # explicit quantisation: the scales are the graph's Q/DQ nodes, no calibrator
        config.set_flag(trt.BuilderFlag.INT8)
    elif precision == "sparse24":  # the 2:4 weights may run on sparse tensor cores (Ampere and later)
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build the {precision} engine from {onnx_path} (see its log above); "
                           "try a larger workspace or drop this precision.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, out_path)
    sidecar = {
        **platform_versions(),
        "precision": precision,
        "profile": {"input": inp.name, "min": lo, "opt": opt, "max": hi},
        "source_onnx": onnx_path.name,
        "calibration_images": int(len(calibration)) if precision == "int8" else 0,
        "distillery": {**metadata, "format": precision, "backend": "tensorrt"},
    }
    side = Path(str(out_path) + ".json")
    side.write_text(json.dumps(sidecar, indent=2, sort_keys=True), encoding="utf-8")
    return sidecar
