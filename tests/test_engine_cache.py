"""TensorRT engines built where they run: the cache key and the rebuild decision (pure, no TensorRT), the
provider options, the one-line skip without TensorRT; the build/reuse path where onnxruntime has TensorRT."""
from __future__ import annotations

import json
import warnings

import pytest

from distillery.runtime import engine_cache as ec

pytest.importorskip("onnx")

from .test_runtime import make_linear_onnx, random_image  # noqa: E402

BASE = dict(model_sha256="a" * 64, tensorrt="10.3.0", gpu="Orin (nvgpu)", precision="fp16", batch_profile=(1, 8, 32))


def test_key_changes_with_each_component():
    key = ec.engine_key(**BASE)
    assert ec.engine_key(**BASE) == key and set(ec.KEY_FIELDS) < set(key)
    changed = {"model_sha256": "b" * 64, "tensorrt": "10.3.1", "gpu": "NVIDIA H100", "precision": "fp32",
               "batch_profile": (1, 8, 16)}
    ids = {key["id"]}
    for field, value in changed.items():
        other = ec.engine_key(**{**BASE, field: value})
        assert other["id"] != key["id"], field
        ids.add(other["id"])
    assert len(ids) == 1 + len(changed)


def test_key_rejects_bad_precision_and_profile():
    with pytest.raises(ValueError, match="precision"):
        ec.engine_key(**{**BASE, "precision": "bf16"})
    with pytest.raises(ValueError, match="batch_profile"):
        ec.engine_key(**{**BASE, "batch_profile": (8, 1, 32)})


def _cached(folder, key, engine=True):
    folder.mkdir(parents=True, exist_ok=True)
    if engine:
        (folder / "TensorrtExecutionProvider_TRTKernel_graph_main_123_0_0_fp16_sm87.engine").write_bytes(b"plan")
    (folder / ec.KEY_FILE).write_text(json.dumps(key))


def test_cache_decision(tmp_path):
    key = ec.engine_key(**BASE)
    folder = ec.cache_dir_for(tmp_path, key)
    assert ec.cache_decision(folder, key)[0] == "build"  # nothing yet
    _cached(folder, key)
    assert ec.cache_decision(folder, key) == ("reuse", ec.cache_decision(folder, key)[1])
    for field, value in {"tensorrt": "8.6.2", "gpu": "NVIDIA A100", "model_sha256": "c" * 64,
                         "precision": "fp32", "batch_profile": (1, 1, 1)}.items():
        foreign = ec.engine_key(**{**BASE, field: value})
        _cached(folder, foreign)  # a cache entry copied from elsewhere / left by an older TensorRT
        decision, why = ec.cache_decision(folder, key)
        assert decision == "rebuild" and field in why, (field, why)
    (folder / ec.KEY_FILE).unlink()
    assert ec.cache_decision(folder, key)[0] == "rebuild"  # an engine without a key file is not trusted
    (folder / ec.KEY_FILE).write_text("{not json")
    assert ec.cache_decision(folder, key)[0] == "rebuild"
    empty = tmp_path / "other"
    _cached(empty, key, engine=False)
    decision, why = ec.cache_decision(empty, key)
    assert decision == "rebuild" and "missing" in why


def test_provider_options():
    opts = ec.tensorrt_provider_options("/c", "fp16", (1, 4, 16), "input", [3, 224, 224])
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == "/c"
    assert opts["trt_timing_cache_enable"] == "True" and opts["trt_fp16_enable"] == "True"
    assert opts["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert opts["trt_profile_opt_shapes"] == "input:4x3x224x224"
    assert opts["trt_profile_max_shapes"] == "input:16x3x224x224"
    assert ec.tensorrt_provider_options("/c", "fp32", (1, 1, 1), "x", [3, 8, 8])["trt_fp16_enable"] == "False"


def test_without_tensorrt_one_line_and_default_providers(tmp_path):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT; the skip path is not taken")
    from distillery.runtime import Classifier

    model = make_linear_onnx(tmp_path / "model.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = Classifier.load_tensorrt(model, cache_root=tmp_path / "cache")
    lines = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(lines) == 1 and lines[0].startswith("TensorRT engine skipped:") and "\n" not in lines[0]
    assert clf.engine_cache["status"] == "skipped" and clf.predict(random_image(40, 50))[0].label
    assert not (tmp_path / "cache").exists()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_first_load_builds_then_reuses_and_foreign_entry_rebuilds(tmp_path):  # pragma: no cover - needs TensorRT
    import onnxruntime as ort

    reason = ec.tensorrt_unavailable_reason(ort.get_available_providers())
    if reason:
        pytest.skip(f"TensorRT engine cache: {reason}")
    from distillery.runtime import Classifier

    model = make_linear_onnx(tmp_path / "model.onnx")
    img = random_image(40, 50)
    first = Classifier.load_tensorrt(model, cache_root=tmp_path / "cache", precision="fp16")
    assert first.engine_cache["status"] == "built" and "TensorrtExecutionProvider" in first.providers_in_use
    second = Classifier.load_tensorrt(model, cache_root=tmp_path / "cache", precision="fp16")
    assert second.engine_cache["status"] == "reused"
    assert first.predict(img)[0].label == second.predict(img)[0].label
    folder = tmp_path / "cache" / first.engine_cache["key"]["id"]
    key = json.loads((folder / ec.KEY_FILE).read_text())
    (folder / ec.KEY_FILE).write_text(json.dumps({**key, "tensorrt": "0.0.0"}))
    third = Classifier.load_tensorrt(model, cache_root=tmp_path / "cache", precision="fp16")
    assert third.engine_cache["status"] == "rebuilt" and "tensorrt" in third.engine_cache["why"]
