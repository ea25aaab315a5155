"""The C++ example (examples/cpp): its preprocessing equals the Python runtime's pixel for pixel and tensor value
for value on real images; with an ONNX Runtime C++ install it builds ``classify`` and reproduces a bundle's golden
predictions. Skipped with one line where there is no C++ compiler / cmake, or no ONNX Runtime C++ headers."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillery.runtime.preprocess import Preprocessor, contract_from_data_config

from .test_bundle import bundle  # noqa: F401  (the module-scoped bundle fixture)

CPP = Path(__file__).resolve().parents[1] / "examples" / "cpp"
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "eurosat-sample" / "unlabeled"


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory):
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"C++ example: {' and '.join(missing)} not found (apt-get install cmake g++)")
    build = tmp_path_factory.mktemp("cpp")
    cfg = subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                         capture_output=True, text=True, timeout=120)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    res = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return build


def _images():
    tiles = [Image.open(p).convert("RGB") for p in sorted(SAMPLE.glob("*.jpg"))[:4]]
    mosaic = Image.fromarray(np.concatenate([np.concatenate([np.asarray(t) for t in tiles], 1)] * 3, 0))  # 256x192
    return tiles + [mosaic, mosaic.crop((0, 0, 61, 190)), mosaic.crop((0, 0, 250, 47))]


CONTRACTS = [([3, 64, 64], 0.875, "center"), ([3, 32, 32], 0.95, "center"), ([3, 40, 56], 0.9, "center"),
             ([3, 40, 56], 1.0, "squash")]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("input_size,crop_pct,crop_mode", CONTRACTS)
def test_cpp_preprocessing_equals_the_python_runtime(cpp_build, tmp_path, interpolation, input_size, crop_pct,
                                                     crop_mode):
    contract = contract_from_data_config({"input_size": input_size, "interpolation": interpolation,
                                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                          "crop_pct": crop_pct, "crop_mode": crop_mode})
    (tmp_path / "c.json").write_text(json.dumps({"preprocess": contract}))
    pre = Preprocessor(contract)
    for i, im in enumerate(_images()):
        im.save(tmp_path / "in.ppm")
        res = subprocess.run([str(cpp_build / "preprocess_check"), str(tmp_path / "c.json"), str(tmp_path / "in.ppm"),
                              str(tmp_path / "out.ppm"), str(tmp_path / "out.f32")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        want = np.asarray(pre.image(im))
        got = np.asarray(Image.open(tmp_path / "out.ppm"))
        assert got.shape == want.shape and np.array_equal(got, want), (i, im.size, np.abs(got - want.astype(int)).max())
        x = np.fromfile(tmp_path / "out.f32", dtype=np.float32).reshape(3, *want.shape[:2])
        assert np.array_equal(x, pre(im)), (i, im.size)


def test_cpp_classify_reproduces_the_golden_predictions(cpp_build, bundle, tmp_path):  # noqa: F811
    classify = cpp_build / "classify"
    if not classify.exists():
        pytest.skip("C++ classify: no ONNX Runtime C++ headers/library here (Debian bookworm has no libonnxruntime-dev;"
                    " set ONNXRUNTIME_ROOT to an ONNX Runtime release); its preprocessing is tested above")
    out, _, _ = bundle  # pragma: no cover - needs ONNX Runtime's C++ API
    device = tmp_path / "bundle"
    shutil.copytree(out, device)
    for p in (device / "images").iterdir():  # the caller decodes (Pillow, like the Python runtime)
        Image.open(p).convert("RGB").save(p.with_suffix(".ppm"))
    for extra in ([], ["--full"]):
        res = subprocess.run([str(classify), "--golden", str(device), *extra], capture_output=True, text=True)
        assert res.returncode == 0 and "C++ smoke test passed" in res.stdout, res.stdout + res.stderr
