"""TensorRT engines: the skip path everywhere; the build + run path where ``tensorrt`` imports and a GPU exists."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from distillery.export.tensorrt import ENGINE_FILES, tensorrt_unavailable_reason  # noqa: E402

from .test_runtime import CLASSES, DATA_CONFIG, expected_logits, make_linear_onnx, random_image  # noqa: E402


def test_unavailable_reason_is_one_line():
    reason = tensorrt_unavailable_reason()
    try:
        import tensorrt  # noqa: F401
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        assert reason is not None and "tensorrt is not installed" in reason and "\n" not in reason
        return
    assert (reason is None) == has_gpu  # pragma: no cover - only where TensorRT is installed


def test_export_report_records_the_skip(monkeypatch, tmp_path):
    """export_onnx's TensorRT step records why nothing was built and never fails the export."""
    import distillery.export.tensorrt as et
    from distillery.export.onnx import _onnxruntime_status, _tensorrt_engines
    from distillery.job import ExportCfg

    monkeypatch.setattr(et, "tensorrt_unavailable_reason", lambda: "simulated: no GPU here")
    got = _tensorrt_engines(tmp_path / "model.onnx", tmp_path, {}, ["fp32", "int8"], [], {}, np.zeros((1, 2)),
                            np.zeros((1, 3, 2, 2), np.float32), progress=False, cfg=ExportCfg())
    assert got == {"built": False, "reason": "simulated: no GPU here", "engines": {}}
    none = _tensorrt_engines(tmp_path / "model.onnx", tmp_path, {}, ["fp32"], [], {}, np.zeros((1, 2)),
                             np.zeros((1, 3, 2, 2), np.float32), progress=False, cfg=ExportCfg(tensorrt=[]))
    assert none["built"] is False and "export.tensorrt" in none["reason"]
    status = _onnxruntime_status()
    assert "CPUExecutionProvider" in status["available_providers"] and status["parity_provider"]


# ----------------------------------------------------------------------------------------------
# Where TensorRT is installed


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_and_run_engine(tmp_path, precision):
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from distillery.export.tensorrt import build_engine
    from distillery.runtime import Classifier
    from distillery.runtime.preprocess import contract_from_data_config, preprocess

    onnx_path = make_linear_onnx(tmp_path / "model.onnx")
    contract = contract_from_data_config(DATA_CONFIG)
    images = [random_image(40 + i, 50, seed=i) for i in range(12)]
    batch = np.stack([preprocess(im, contract) for im in images])
    meta = {"class_names": CLASSES, "preprocess": contract, "provenance": "test", "versions": {}}
    out = tmp_path / ENGINE_FILES[precision]
    sidecar = build_engine(onnx_path, out, meta, precision, calibration=batch if precision == "int8" else None,
                           batch_profile=(1, 4, 8))
    assert out.is_file() and json.loads(Path(str(out) + ".json").read_text()) == sidecar
    assert sidecar["tensorrt"] and sidecar["gpu"] and sidecar["profile"]["max"] == 8
    clf = Classifier.load(out)
    assert type(clf).__name__ == "TensorRTClassifier" and clf.class_names == CLASSES
    got = clf.predict_logits(batch)  # 12 > max batch 8: run in two chunks
    ref = np.stack([expected_logits(im) for im in images])
    diff = np.abs(got - ref)
    tol = 0.05 if precision == "fp16" else 0.5
    assert diff.max() < tol, f"{precision}: max |Δlogit| {diff.max():.3g}, mean {diff.mean():.3g}"
    assert [p.index for p in clf.predict(images)] == list(got.argmax(1))
