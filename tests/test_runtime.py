"""The runtime: preprocessing equals timm's eval transform, Classifier/CLI work, and torch is never imported.

The model here is a hand-built ONNX graph (mean over pixels, then a linear layer), so the expected
logits can be computed with numpy from the preprocessed image.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

onnx = pytest.importorskip("onnx")

from distillery.runtime import Classifier, Prediction, preprocess  # noqa: E402
from distillery.runtime.cli import main as run_main  # noqa: E402
from distillery.runtime.preprocess import contract_from_data_config  # noqa: E402

CLASSES = ["cat", "dog", "fish", "owl"]
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
               "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}


def _weights():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, len(CLASSES))).astype(np.float32) * 4, rng.normal(size=len(CLASSES)).astype(np.float32)


def make_linear_onnx(path, data_config=DATA_CONFIG, metadata=True, meta_class_names=CLASSES):
    """logits = mean_hw(x) @ W + b, with a dynamic batch axis and the distillery metadata."""
    from onnx import TensorProto, helper, numpy_helper

    w, b = _weights()
    _, h, wd = data_config["input_size"]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("Gemm", ["pooled", "W", "b"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, h, wd])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        meta = {"class_names": meta_class_names, "preprocess": contract_from_data_config(data_config),
                "provenance": "test", "versions": {}, "format": "fp32"}
        helper.set_model_props(model, {"distillery": json.dumps(meta)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def expected_logits(image, data_config=DATA_CONFIG):
    w, b = _weights()
    x = preprocess(image, contract_from_data_config(data_config))
    return x.mean(axis=(1, 2)) @ w + b


def random_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    # smooth gradients + noise: exercises interpolation without being pure noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)), ((xx + yy) * 127 / max(h + w, 1))], -1)
    arr = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


@pytest.fixture
def model_path(tmp_path):
    return make_linear_onnx(tmp_path / "model.onnx")


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, (h, w, mode, ext) in enumerate([(48, 64, "RGB", ".png"), (90, 40, "L", ".png"), (33, 33, "RGBA", ".png"),
                                           (120, 200, "RGB", ".jpg")]):
        p = tmp_path / f"img{i}{ext}"
        random_image(h, w, mode, seed=i).save(p)
        paths.append(str(p))
    return paths


# ----------------------------------------------------------------------------------------------
# preprocess == timm eval transform


@pytest.mark.parametrize("data_config", [
    DATA_CONFIG,
    {**DATA_CONFIG, "interpolation": "bicubic", "crop_pct": 0.95, "input_size": (3, 48, 48)},
    {**DATA_CONFIG, "crop_pct": 1.0, "input_size": (3, 40, 40), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    {**DATA_CONFIG, "input_size": (3, 32, 48), "interpolation": "bicubic"},  # non-square: timm ResizeKeepRatio
    {**DATA_CONFIG, "crop_mode": "squash", "crop_pct": 0.9},
], ids=["bilinear-32", "bicubic-48", "crop1.0-40", "nonsquare-32x48", "squash"])
def test_preprocess_matches_timm_eval_transform(data_config):
    timm_data = pytest.importorskip("timm.data")
    transform = timm_data.create_transform(**data_config)
    contract = contract_from_data_config(data_config)
    for i, (h, w, mode) in enumerate([(37, 53, "RGB"), (64, 64, "RGB"), (200, 90, "L"), (20, 31, "RGBA"),
                                      (57, 211, "RGB")]):
        img = random_image(h, w, mode, seed=i)
        ours = preprocess(img, contract)
        ref = transform(img.convert("RGB")).numpy()
        assert ours.shape == ref.shape == tuple(data_config["input_size"]), (ours.shape, ref.shape)
        assert ours.dtype == np.float32
        diff = np.abs(ours - ref)
        assert diff.max() <= 1e-5, f"{h}x{w} {mode}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"


SAMPLE_EVAL = Path(__file__).resolve().parents[1] / "examples" / "data" / "eurosat-sample" / "eval"


def _timm_pixels(transform, img):
    """timm's eval transform up to (not including) ToTensor/Normalize: the uint8 pixels the network sees."""
    for t in transform.transforms:
        if type(t).__name__ in ("ToTensor", "MaybeToTensor", "Normalize"):
            break
        img = t(img)
    return np.asarray(img)


def test_preprocess_matches_timm_on_real_eurosat_images():
    """The deployed geometry (64 px JPEG tiles -> resize 256 -> crop 224, bicubic) on real images: the same
    pixels as timm's transform (here through the one-call resize + crop), tensors within float32 rounding."""
    timm_data = pytest.importorskip("timm.data")
    from distillery.runtime.preprocess import Preprocessor

    data_config = {**DATA_CONFIG, "input_size": (3, 224, 224), "interpolation": "bicubic"}
    transform = timm_data.create_transform(**data_config)
    pre = Preprocessor(contract_from_data_config(data_config))
    paths = sorted(SAMPLE_EVAL.rglob("*.jpg"))[::10]
    assert len(paths) >= 10
    worst = 0.0
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        assert pre._plan(*rgb.size)[2] is not None  # 64 -> 256 is a dyadic 1/4: the one-call path
        np.testing.assert_array_equal(np.asarray(pre.image(str(p))), _timm_pixels(transform, rgb))
        worst = max(worst, float(np.abs(pre(str(p)) - transform(rgb).numpy()).max()))
    assert worst <= 1e-6, f"max |Δ| {worst:.3g} vs timm on {len(paths)} EuroSAT images"


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest", "lanczos"])
@pytest.mark.parametrize("input_size,crop_pct,image_wh,one_call", [
    ((3, 224, 224), 0.875, (64, 64), True),     # EuroSAT tiles: 64 -> 256 is 1/4
    ((3, 224, 224), 0.875, (128, 96), False),   # 96 -> 256 is 3/8, but 128 -> 341 is not dyadic
    ((3, 48, 48), 0.75, (128, 128), True),      # downscale by 2
    ((3, 32, 32), 1.0, (64, 128), False),       # Pillow >= 13 would run the one call's vertical pass first
    ((3, 32, 32), 1.0, (37, 53), False),        # not dyadic
    ((3, 32, 48), 0.875, (27, 18), True),       # non-square input (timm ResizeKeepRatio to 54 x 36): 1/2
], ids=["64-224", "128x96-224", "down2-48", "vertical-first", "37x53", "nonsquare"])
def test_one_call_resize_and_crop_gives_timms_pixels(interpolation, input_size, crop_pct, image_wh, one_call):
    """Resize + centre crop as one ``Image.resize(box=...)`` call is used only where it gives the same pixels."""
    timm_data = pytest.importorskip("timm.data")
    from distillery.runtime.preprocess import Preprocessor

    data_config = {**DATA_CONFIG, "input_size": input_size, "crop_pct": crop_pct, "interpolation": interpolation}
    pre = Preprocessor(contract_from_data_config(data_config))
    img = random_image(image_wh[1], image_wh[0], seed=3)
    assert (pre._plan(*image_wh)[2] is not None) == one_call, pre._plan(*image_wh)
    expected = _timm_pixels(timm_data.create_transform(**data_config), img)
    np.testing.assert_array_equal(np.asarray(pre.image(img)), expected)


def test_preprocess_accepts_paths_pil_and_arrays(image_files):
    contract = contract_from_data_config(DATA_CONFIG)
    img = Image.open(image_files[0])
    a = preprocess(image_files[0], contract)
    np.testing.assert_array_equal(a, preprocess(img, contract))
    np.testing.assert_array_equal(a, preprocess(np.asarray(img.convert("RGB")), contract))
    gray = np.asarray(Image.open(image_files[1]))  # (H, W) uint8
    np.testing.assert_array_equal(preprocess(gray, contract), preprocess(image_files[1], contract))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), dtype=np.float32), contract)
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((8, 8, 2), dtype=np.uint8), contract)


# ----------------------------------------------------------------------------------------------
# Classifier


def test_classifier_predict_matches_hand_computed_logits(model_path, image_files):
    clf = Classifier.load(model_path, providers=["CPUExecutionProvider"])
    assert clf.class_names == CLASSES and clf.providers_in_use == ["CPUExecutionProvider"]
    inputs = [image_files[0], Image.open(image_files[1]), np.asarray(Image.open(image_files[3]))]
    preds = clf.predict(inputs, topk=3, batch_size=2)
    assert len(preds) == 3 and all(isinstance(p, Prediction) for p in preds)
    for inp, pred in zip(inputs, preds):
        z = expected_logits(inp).astype(np.float64)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert pred.index == int(np.argmax(z)) and pred.label == CLASSES[pred.index]
        assert abs(pred.probability - p.max()) < 1e-5, (pred.probability, p.max())
        assert [lab for lab, _ in pred.topk] == [CLASSES[i] for i in np.argsort(-p)[:3]]
        assert pred.topk[0] == (pred.label, pred.probability)
    # a single image still gives a list; logits on a prepared batch
    assert len(clf.predict(image_files[2])) == 1
    batch = np.stack([clf.preprocess(f) for f in image_files])
    np.testing.assert_allclose(clf.predict_logits(batch), np.stack([expected_logits(f) for f in image_files]),
                               atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        clf.predict_logits(batch[:, :, :16])


def test_model_without_metadata_is_refused(tmp_path):
    path = make_linear_onnx(tmp_path / "plain.onnx", metadata=False)
    with pytest.raises(ValueError, match="no 'distillery' metadata"):
        Classifier.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Classifier.load(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="could not be opened"):
        Classifier.load(bad)
    mismatch = make_linear_onnx(tmp_path / "mismatch.onnx", meta_class_names=CLASSES + ["extra"])
    with pytest.raises(ValueError, match="outputs 4 logits"):
        Classifier.load(mismatch)


@pytest.mark.parametrize("block", [True, False], ids=["torch-blocked", "torch-not-loaded"])
def test_runtime_never_imports_torch(model_path, image_files, block):
    """Import and use the runtime in a fresh interpreter where `import torch` raises (or is merely never done)."""
    code = textwrap.dedent(f"""
        import sys
        if {block}:
            sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from distillery.runtime import Classifier
        from distillery.runtime.cli import main
        clf = Classifier.load({str(model_path)!r}, providers=["CPUExecutionProvider"])
        preds = clf.predict({image_files!r}, topk=2)
        assert len(preds) == {len(image_files)}, preds
        assert main([{str(model_path)!r}, {image_files[0]!r}]) == 0
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "yaml", "pyarrow", "timm", "safetensors")
                       or m in ("distillery.job", "distillery.rundir"))
        assert not heavy or heavy == ["torch"] and sys.modules["torch"] is None, heavy
        print("OK", preds[0].label)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_prints_class_and_probability(model_path, image_files, capsys):
    assert run_main([str(model_path), *image_files[:2]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for f, line in zip(image_files, lines):
        path, label, prob = line.split("\t")
        assert path == f and label in CLASSES and 0.0 < float(prob) <= 1.0
        assert label == CLASSES[int(np.argmax(expected_logits(f)))]

    assert run_main([str(model_path), image_files[0], "--json", "--topk", "2"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["path"] == image_files[0] and rec["label"] in CLASSES and len(rec["topk"]) == 2


def test_cli_takes_folders(model_path, image_files, tmp_path, capsys):
    """A folder stands for every image under it (sorted, recursive, hidden files skipped); an empty one is refused."""
    import shutil

    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(image_files[0], folder / "b.png")
    shutil.copy(image_files[3], folder / "sub" / "a.jpg")
    shutil.copy(image_files[1], folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    assert run_main([str(model_path), str(folder), image_files[2]]) == 0
    paths = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert paths == [str(folder / "b.png"), str(folder / "sub" / "a.jpg"), image_files[2]]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main([str(model_path), str(empty)]) == 2
    assert "has no images" in capsys.readouterr().err


def test_cli_exit_codes(model_path, image_files, tmp_path, capsys):
    assert run_main([str(model_path), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert run_main([str(model_path), str(corrupt)]) == 2
    assert "could not be decoded" in capsys.readouterr().err
    plain = make_linear_onnx(tmp_path / "plain.onnx", metadata=False)
    assert run_main([str(plain), image_files[0]]) == 2
    assert "metadata" in capsys.readouterr().err
    assert run_main([str(tmp_path / "none.onnx"), image_files[0]]) == 2
    assert run_main([str(model_path), image_files[0], "--topk", "0"]) == 2
