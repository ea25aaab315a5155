"""The runtime under bad or unusual input: threads, image modes, wrong arrays, corrupt files, provider
fallback, fast JPEG decode and the TensorRT engine version check (which needs no TensorRT).

Models are the hand-built linear ONNX graph of test_runtime.py, so everything here runs in seconds.
"""
from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402

from distillery.runtime import Classifier  # noqa: E402
from distillery.runtime.cli import main as run_main  # noqa: E402
from distillery.runtime.preprocess import (DRAFT_MARGIN, Preprocessor, _open_path,  # noqa: E402
                                           contract_from_data_config, preprocess)

from .test_runtime import CLASSES, DATA_CONFIG, make_linear_onnx, random_image  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "eurosat-sample" / "unlabeled"
CONTRACT = contract_from_data_config(DATA_CONFIG)
CPU = ["CPUExecutionProvider"]


@pytest.fixture
def model_path(tmp_path):
    return make_linear_onnx(tmp_path / "model.onnx")


def _same_as(image_a, image_b):
    np.testing.assert_array_equal(preprocess(image_a, CONTRACT), preprocess(image_b, CONTRACT))


# ----------------------------------------------------------------------------------------------
# Threads


def test_eight_threads_get_identical_results(model_path, tmp_path):
    clf = Classifier.load(model_path, providers=CPU)
    images = []
    for i, (h, w) in enumerate([(40, 60), (64, 64), (90, 33), (128, 200), (31, 31), (75, 50)]):
        p = tmp_path / f"im{i}.{'jpg' if i % 2 else 'png'}"
        random_image(h, w, seed=i).save(p)
        images.append(str(p))
    images.append(np.asarray(random_image(50, 70, seed=9)))
    expected = clf.predict(images, topk=3, batch_size=3)
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def work(t):
        try:
            barrier.wait()
            results[t] = [clf.predict(images, topk=3, batch_size=1 + t % 4) for _ in range(5)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for per_thread in results:
        for preds in per_thread:
            assert preds == expected  # dataclass equality: labels, indices and float probabilities, exactly


# ----------------------------------------------------------------------------------------------
# Image modes, converted per the contract


def test_grayscale_palette_bitmap_and_rgba(tmp_path):
    rgb = random_image(48, 40, seed=1)
    gray = rgb.convert("L")
    _same_as(gray, np.stack([np.asarray(gray)] * 3, -1))  # L -> RGB replicates the channel
    gray.save(tmp_path / "g.png")
    _same_as(str(tmp_path / "g.png"), np.asarray(gray))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 7))  # nearly transparent: alpha is dropped, not composited
    rgba.save(tmp_path / "a.png")
    _same_as(str(tmp_path / "a.png"), rgb)
    _same_as(np.asarray(rgba), rgb)  # (H, W, 4) arrays too
    _same_as(rgb.convert("LA"), gray)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    _same_as(str(tmp_path / "p.png"), pal.convert("RGB"))
    pal.save(tmp_path / "p.gif", transparency=0)  # palette + transparency
    _same_as(str(tmp_path / "p.gif"), Image.open(tmp_path / "p.gif").convert("RGB"))
    bw = rgb.convert("1")
    _same_as(bw, bw.convert("L"))


def test_cmyk_jpeg_uses_pillows_conversion(tmp_path):
    cmyk = random_image(40, 56, seed=2).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=95)
    reopened = Image.open(tmp_path / "c.jpg")
    assert reopened.mode == "CMYK"
    x = preprocess(str(tmp_path / "c.jpg"), CONTRACT)
    np.testing.assert_array_equal(x, preprocess(reopened.convert("RGB"), CONTRACT))
    assert np.isfinite(x).all() and x.std() > 0.1


def test_16bit_grayscale_keeps_the_high_byte(tmp_path):
    """A bare convert("RGB") clips 16-bit values above 255 to white; the runtime keeps the high byte, as Pillow
    does for 16-bit RGB."""
    a16 = (np.asarray(random_image(36, 44, seed=3).convert("L"), dtype=np.uint16) * 257 + 100).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    opened = Image.open(tmp_path / "g16.png")
    assert opened.mode.startswith("I"), opened.mode
    expect = (a16 >> 8).astype(np.uint8)  # (v*257+100) >> 8 == v
    _same_as(str(tmp_path / "g16.png"), expect)
    _same_as(opened, expect)
    assert np.asarray(opened.convert("RGB")).mean() > 250  # what the naive conversion would have fed the model


def test_32bit_and_float_images_are_refused():
    with pytest.raises(ValueError, match="32-bit integer"):
        preprocess(Image.fromarray(np.full((8, 8), 1000, np.int32)), CONTRACT)
    with pytest.raises(ValueError, match="float"):
        preprocess(Image.fromarray(np.full((8, 8), 0.5, np.float32)), CONTRACT)


# ----------------------------------------------------------------------------------------------
# Wrong arrays and batches


@pytest.mark.parametrize("array, match", [
    (np.zeros((16, 16, 3), np.float32), "dtype float32.*uint8"),
    (np.zeros((16, 16, 3), np.uint16), r"a >> 8"),
    (np.zeros((16, 16, 3), bool), "dtype bool"),
    (np.zeros((16, 16, 2), np.uint8), r"shape \(16, 16, 2\)"),
    (np.zeros((3, 16, 16), np.uint8), r"transpose\(1, 2, 0\)"),
    (np.zeros((16,), np.uint8), r"shape \(16,\)"),
    (np.zeros((0, 16, 3), np.uint8), "empty"),
], ids=["float", "uint16", "bool", "2-channel", "CHW", "1-D", "empty"])
def test_bad_arrays_give_clear_errors(model_path, array, match):
    clf = Classifier.load(model_path, providers=CPU)
    with pytest.raises(ValueError, match=match):
        clf.predict(array)


def test_bad_batches_give_clear_errors(model_path):
    clf = Classifier.load(model_path, providers=CPU)
    good = np.zeros((2, 3, 32, 32), np.float32)
    assert clf.predict_logits(good).shape == (2, len(CLASSES))
    assert clf.predict_logits(good.astype(np.float64)).dtype == np.float32
    with pytest.raises(ValueError, match="not a float type"):
        clf.predict_logits(good.astype(np.uint8))
    with pytest.raises(ValueError, match=r"channels-last.*transpose\(0, 3, 1, 2\)"):
        clf.predict_logits(good.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"batch\[None\]"):
        clf.predict_logits(good[0])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        clf.predict_logits(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="image: expected a path"):
        clf.predict([{"not": "an image"}])
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="topk"):
            clf.predict(np.zeros((8, 8, 3), np.uint8), topk=bad)
    with pytest.raises(ValueError, match="batch_size"):
        clf.predict(np.zeros((8, 8, 3), np.uint8), batch_size=0)
    assert clf.predict([]) == []


# ----------------------------------------------------------------------------------------------
# Corrupt files


def test_corrupt_truncated_and_non_image_files(model_path, tmp_path):
    clf = Classifier.load(model_path, providers=CPU)
    buf = io.BytesIO()
    random_image(200, 300, seed=4).save(buf, "JPEG", quality=90)
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("hello, not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    for name in ("trunc.jpg", "text.jpg", "empty.png"):
        with pytest.raises(ValueError, match=f"{name}.*could not be decoded") as e:
            clf.predict(str(tmp_path / name))
        assert e.value.__cause__ is not None  # the decoder's own error is chained
    with pytest.raises(FileNotFoundError, match="is a directory"):
        clf.predict(str(tmp_path / "folder.jpg"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clf.predict(str(tmp_path / "missing.jpg"))
    assert run_main([str(model_path), str(tmp_path / "trunc.jpg")]) == 2  # the CLI exits 2


# ----------------------------------------------------------------------------------------------
# Provider fallback


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has CUDA, so a request for it may not fall back")
@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_fallback_to_cpu_is_detected(model_path, capsys):
    with pytest.warns(RuntimeWarning, match="requested CUDAExecutionProvider but onnxruntime runs on CPU"):
        clf = Classifier.load(model_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert clf.providers_in_use == ["CPUExecutionProvider"]
    assert clf.provider_fallback == ["CUDAExecutionProvider"]
    assert clf.requested_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        Classifier.load(model_path, providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
                        strict_providers=True)
    assert Classifier.load(model_path, providers=CPU).provider_fallback == []
    img = Path(model_path).with_name("x.png")
    random_image(20, 20).save(img)
    assert run_main([str(model_path), str(img), "--providers", "CUDAExecutionProvider,CPUExecutionProvider"]) == 0
    assert "warning: " in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Export folders: the runtime loads the format the export chose to deploy


def test_export_folder_loads_the_deployed_file(tmp_path, capsys):
    import shutil

    folder = tmp_path / "export"
    folder.mkdir()
    make_linear_onnx(folder / "model.onnx")
    img = tmp_path / "x.png"
    random_image(30, 30).save(img)
    assert Classifier.load(folder, providers=CPU).path == str(folder / "model.onnx")  # no report: model.onnx
    shutil.copy(folder / "model.onnx", folder / "model.int8.onnx")
    report = {"formats": {}, "deploy": {"format": "int8", "file": "model.int8.onnx", "why": "int8: fastest"}}
    (folder / "report.json").write_text(json.dumps(report))
    assert Classifier.load(folder, providers=CPU).path == str(folder / "model.int8.onnx")
    assert run_main([str(folder), str(img)]) == 0 and capsys.readouterr().out.startswith(str(img))
    (folder / "model.int8.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="deploys 'model.int8.onnx', which is missing"):
        Classifier.load(folder)
    (folder / "report.json").write_text(json.dumps({"deploy": {"format": None, "file": None,
                                                               "why": "no format passed its parity gate"}}))
    with pytest.raises(ValueError, match="deploys no model.*no format passed"):
        Classifier.load(folder)
    assert run_main([str(folder), str(img)]) == 2 and "deploys no model" in capsys.readouterr().err
    (folder / "report.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a readable export report"):
        Classifier.load(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no report.json deploy entry and no model.onnx"):
        Classifier.load(empty)


# ----------------------------------------------------------------------------------------------
# Fast decode


def _large_jpeg(path, size=(2048, 1536)):
    """A mosaic of real EuroSAT tiles (full-frequency texture) when the sample is there, else a noisy gradient."""
    tiles = [Image.open(p).convert("RGB") for p in sorted(SAMPLE.glob("*.jpg"))[:47]]
    if tiles:
        canvas, k = Image.new("RGB", size), 0
        for y in range(0, size[1], 64):
            for x in range(0, size[0], 64):
                canvas.paste(tiles[k % len(tiles)], (x, y))
                k += 1
    else:
        canvas = random_image(size[1], size[0], seed=5)
    canvas.save(path, quality=90)
    return str(path)


def test_fast_decode_is_within_tolerance_and_only_for_large_jpegs(tmp_path):
    contract = contract_from_data_config({**DATA_CONFIG, "input_size": (3, 224, 224), "interpolation": "bicubic"})
    exact, fast = Preprocessor(contract), Preprocessor(contract, fast_decode=True)
    big = _large_jpeg(tmp_path / "big.jpg")
    drafted, size = _open_path(big, fast._draft_size)
    assert size == (2048, 1536) and drafted.size == (1024, 768)  # decoded at 1/2: >= DRAFT_MARGIN x the 256 px resize
    assert min(drafted.size) >= DRAFT_MARGIN * contract["resize"]
    a = np.asarray(exact.image(big), dtype=np.int16)
    b = np.asarray(fast.image(big), dtype=np.int16)
    d = np.abs(a - b)
    assert d.max() <= 8 and d.mean() <= 0.6, f"fast vs exact decode: max |Δ| {d.max()}, mean {d.mean():.3f} (of 255)"
    # small JPEGs, PNGs, PIL images and arrays are never drafted: bit-identical
    small = tmp_path / "small.jpg"
    random_image(300, 400, seed=6).save(small)
    big_png = tmp_path / "big.png"
    Image.open(big).save(big_png)
    for item in (str(small), str(big_png), Image.open(big), np.asarray(Image.open(big))):
        np.testing.assert_array_equal(exact(item), fast(item))
    clf_exact = Classifier.load(make_linear_onnx(tmp_path / "m.onnx", data_config={**DATA_CONFIG,
                                "input_size": (3, 224, 224)}), providers=CPU, fast_decode=False)
    assert clf_exact.fast_decode is False and Classifier.load(tmp_path / "m.onnx", providers=CPU).fast_decode is True


# ----------------------------------------------------------------------------------------------
# TensorRT engines: the version check needs no TensorRT


def _fake_engine(tmp_path, trt_version="10.3.0", **extra):
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"not really a plan")
    meta = {"class_names": CLASSES, "preprocess": CONTRACT, "format": "fp16", "backend": "tensorrt"}
    side = {"tensorrt": trt_version, "cuda": "12.6", "gpu": "Orin", "jetpack": "6.1",
            "profile": {"input": "input", "min": 1, "opt": 8, "max": 32}, "distillery": meta, **extra}
    Path(str(engine) + ".json").write_text(json.dumps(side))
    return engine


def test_engine_with_other_tensorrt_version_is_refused(tmp_path, monkeypatch):
    import distillery.runtime.tensorrt as rt

    engine = _fake_engine(tmp_path)
    monkeypatch.setattr(rt, "installed_tensorrt_version", lambda: "10.0.1")
    with pytest.raises(RuntimeError, match=r"built with TensorRT 10\.3\.0 but TensorRT 10\.0\.1 is installed.*Rebuild"):
        Classifier.load(engine)
    img = tmp_path / "x.png"
    random_image(20, 20).save(img)
    assert run_main([str(engine), str(img)]) == 2
    monkeypatch.setattr(rt, "installed_tensorrt_version", lambda: None)
    with pytest.raises(ImportError, match=r"needs TensorRT 10\.3\.0, which is not installed"):
        Classifier.load(engine)


def test_engine_sidecar_problems(tmp_path):
    from distillery.runtime.tensorrt import read_sidecar

    with pytest.raises(FileNotFoundError, match="does not exist"):
        Classifier.load(tmp_path / "none.engine")
    engine = _fake_engine(tmp_path)
    info = read_sidecar(engine)
    assert info["tensorrt"] == "10.3.0" and info["distillery"]["class_names"] == CLASSES
    side = Path(str(engine) + ".json")
    side.write_text(json.dumps({"tensorrt": "10.3.0", "distillery": {"class_names": [], "preprocess": CONTRACT}}))
    with pytest.raises(ValueError, match="class_names"):
        Classifier.load(engine)
    side.write_text("{broken")
    with pytest.raises(ValueError, match="not readable JSON"):
        Classifier.load(engine)
    side.unlink()
    with pytest.raises(ValueError, match="has no sidecar"):
        Classifier.load(engine)


def test_installed_tensorrt_version_matches_the_package():
    from distillery.runtime.tensorrt import installed_tensorrt_version

    try:
        import tensorrt
    except ImportError:
        assert installed_tensorrt_version() is None
    else:  # pragma: no cover - only where TensorRT is installed
        assert installed_tensorrt_version() == tensorrt.__version__


# ----------------------------------------------------------------------------------------------
# Damaged metadata


def _with_contract(path, **changes):
    import onnx

    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "distillery":
            meta = json.loads(prop.value)
            meta["preprocess"].update(changes)
            prop.value = json.dumps(meta)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("changes,needle", [
    ({"input_size": [3, 100000, 100000], "resize": 100000}, "absurd"),
    ({"input_size": [3, 48, 48], "resize": 54}, r"input_size \[3, 48, 48\] disagrees with the graph's input"),
])
def test_metadata_input_size_absurd_or_not_the_graphs(model_path, changes, needle, capsys):
    _with_contract(model_path, **changes)
    with pytest.raises(ValueError, match=needle):
        Classifier.load(model_path, providers=CPU)
    img = model_path.parent / "x.png"
    random_image(40, 40).save(img)
    assert run_main([str(model_path), str(img)]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("absurd" in err or "disagrees" in err), err
