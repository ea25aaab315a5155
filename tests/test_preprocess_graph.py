"""Preprocessing inside the graph (export.preprocess_in_graph -> model.pre.onnx): its pixels against the runtime's
Pillow path on real images for each contract shape, and the export option end to end."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from distillery.export.preprocess_graph import PRE_INPUT, build_preprocessing_model  # noqa: E402
from distillery.runtime import Classifier  # noqa: E402
from distillery.runtime.preprocess import Preprocessor  # noqa: E402

from .test_cpp_example import _images  # noqa: E402
from .test_runtime import make_linear_onnx  # noqa: E402


CONTRACTS = [([3, 64, 64], 0.875, "center"), ([3, 32, 32], 0.95, "center"), ([3, 40, 56], 0.9, "center"),
             ([3, 40, 56], 1.0, "squash")]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("input_size,crop_pct,crop_mode", CONTRACTS)
def test_in_graph_pixels_match_pillow(tmp_path, interpolation, input_size, crop_pct, crop_mode):
    dc = {"input_size": input_size, "interpolation": interpolation, "mean": [0.485, 0.456, 0.406],
          "std": [0.229, 0.224, 0.225], "crop_pct": crop_pct, "crop_mode": crop_mode}
    src = make_linear_onnx(tmp_path / "model.onnx", data_config=dc)
    pix = build_preprocessing_model(src, tmp_path / "pix.onnx", pixels_only=True)
    sess = ort.InferenceSession(str(pix), providers=["CPUExecutionProvider"])
    clf = Classifier.load(src, providers=["CPUExecutionProvider"])
    pre = Preprocessor(clf.contract)
    levels = np.asarray(dc["std"], dtype=np.float64).reshape(3, 1, 1) * 255
    for im in _images():
        got = sess.run(None, {PRE_INPUT: np.asarray(im)[None]})[0][0]
        want = pre(im)
        assert got.shape == want.shape
        d = np.abs(got.astype(np.float64) - want) * levels
        assert d.max() <= 3.01 and d.mean() < 0.2, (im.size, d.max(), d.mean())


def test_export_option_writes_a_model_the_runtime_runs(tmp_path):
    pytest.importorskip("torch")
    from distillery.export import export_onnx

    from .test_export import make_export_job

    job, paths, images = make_export_job(tmp_path, formats=["fp32"], parity_images=6, deploy_timing_s=0.0,
                                         preprocess_in_graph=True)
    report = export_onnx(job, progress=False)
    pig = report["preprocess_in_graph"]
    assert pig["file"] == "model.pre.onnx" and pig["n_images"] == 6
    assert pig["top1_agreement"] == 1.0 and pig["max_pixel_diff"] <= 3.01
    pre = Classifier.load(paths.export / "model.pre.onnx", providers=["CPUExecutionProvider"])
    plain = Classifier.load(paths.onnx, providers=["CPUExecutionProvider"])
    assert pre.graph_preprocessing and not plain.graph_preprocessing
    files = [str(p) for p in images]
    got, want = pre.predict(files), plain.predict(files)
    assert [p.label for p in got] == [p.label for p in want]
    assert max(abs(a.probability - b.probability) for a, b in zip(got, want)) < 0.05
    assert pre.predict(Image.open(files[0]))[0].label == want[0].label
    with pytest.raises(ValueError, match="preprocesses inside its graph"):
        pre.predict_logits(np.zeros((1, 3, 32, 32), np.float32))
    meta = json.loads(onnx.load(str(paths.export / "model.pre.onnx")).metadata_props[0].value)
    assert meta["input"] == "image_uint8_nhwc" and meta["class_names"] == plain.class_names
