"""The stand-in world (distillery/standin.py) at test size: S, the saved models, the stamp, label isolation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillery import standin as st

REPO = Path(__file__).resolve().parents[1]
SAMPLE_EVAL = REPO / "examples" / "data" / "eurosat-sample" / "eval"

# Test size: 3 + 2 images per class, a 1-layer ViT and text tower, one epoch each.
TINY = dict(pretrain_per_class=3, generator_per_class=2, clip_epochs=1, clip_batch=10, expert_epochs=1,
            expert_batch=10,
            clip_config={"model_cfg": {"embed_dim": 16,
                                       "vision_cfg": {"width": 32, "layers": 1, "head_width": 16, "patch_size": 16},
                                       "text_cfg": {"width": 32, "layers": 1, "heads": 2}}},
            expert_config={"model_args": {"channels": [8, 16, 32, 64]}})


@pytest.fixture()
def pool(tmp_path) -> Path:
    """A labeled_pool/ layout with 5 committed sample images per class."""
    root = tmp_path / "eurosat"
    for folder, _ in st.CLASSES:
        d = root / "labeled_pool" / folder
        d.mkdir(parents=True)
        for p in sorted((SAMPLE_EVAL / folder).glob("*.jpg"))[:5]:
            shutil.copy(p, d / p.name)
    return root


def test_source_transform_is_deterministic_and_changes_the_image():
    p = sorted((SAMPLE_EVAL / "Forest").glob("*.jpg"))[0]
    with Image.open(p) as im:
        im = im.convert("RGB")
    a, b = st.source_transform(im), st.source_transform(im.copy())
    assert a.tobytes() == b.tobytes()
    assert a.size == im.size and a.mode == "RGB"
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(im, np.int16))
    assert diff.mean() > 5  # visibly shifted
    # less saturated: the channel spread shrinks
    assert np.asarray(a, np.float32).std(axis=2).mean() < np.asarray(im, np.float32).std(axis=2).mean()


def test_split_is_deterministic_and_disjoint(pool):
    s = st.StandinSettings(**TINY)
    a, b = st.split_pool(pool / "labeled_pool", s), st.split_pool(pool / "labeled_pool", s)
    assert [(i["path"], i["part"]) for i in a] == [(i["path"], i["part"]) for i in b]
    pre = {i["path"] for i in a if i["part"] == "pretrain"}
    gen = {i["path"] for i in a if i["part"] == "generator"}
    assert len(pre) == 30 and len(gen) == 20 and not pre & gen


def test_build_loads_through_the_product_loaders_and_is_stamped(pool, tmp_path, capsys):
    import torch

    from distillery.models import load_clip, load_expert

    out = tmp_path / "standin"
    s = st.StandinSettings(**TINY)
    info = st.build_standin(out, pool, s, progress=False)
    assert 0.0 <= info["calibration"]["real_top1"] <= 1.0 and "shifted_top1" in info["calibration"]
    assert json.loads((out / "standin.json").read_text())["key"] == info["key"]

    cfg = json.loads((out / "clip" / "open_clip_config.json").read_text())
    model, preprocess, tok = load_clip(str(out / "clip"))
    with Image.open(next((pool / "labeled_pool" / "River").glob("*.jpg"))) as im:
        x = preprocess(im.convert("RGB")).unsqueeze(0)
    assert tuple(x.shape) == (1, 3, 64, 64)
    with torch.no_grad():
        assert tuple(model.encode_image(x).shape) == (1, cfg["model_cfg"]["embed_dim"])
        t = tok(["a satellite photo of a river.", "a photo of a forest."])
        assert tuple(t.shape) == (2, 77)
        assert tuple(model.encode_text(t).shape) == (2, cfg["model_cfg"]["embed_dim"])
    assert cfg["preprocess_cfg"]["mean"] == list(preprocess.transforms[-1].mean)

    expert = load_expert(str(out / "expert"))
    with torch.no_grad():
        assert expert(torch.zeros(1, 3, 64, 64)).shape == (1, 64)
        assert len(expert.forward_intermediates(torch.zeros(1, 3, 64, 64), intermediates_only=True)) == 5

    rows = __import__("distillery.rundir", fromlist=["read_table"]).read_table(out / "generator.parquet")
    assert len(rows) == 20 and {r["class_index"] for r in rows} == set(range(10))
    from distillery.rundir import sha256_file

    assert all(sha256_file(r["path"]) == r["sha256"] for r in rows)
    # stored relative to the table's folder (the stand-ins can be moved), read back absolute
    import pyarrow.parquet as pq

    stored = pq.read_table(out / "generator.parquet").column("path").to_pylist()
    assert [str((out / p).resolve()) for p in stored] == [str(Path(r["path"]).resolve()) for r in rows]
    assert all(Path(p).parts[1] == f"{r['class_index']}-{st._slug(r['class_name'])}" for p, r in zip(stored, rows))

    # unchanged inputs: nothing is rebuilt
    before = (out / "clip" / "open_clip_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = st.build_standin(out, pool, s, progress=False)
    assert again["key"] == info["key"]
    assert "up to date" in capsys.readouterr().err
    assert (out / "clip" / "open_clip_model.safetensors").stat().st_mtime_ns == before

    # a changed input image: rebuilt, new key, no temporary folder left behind
    img = next((pool / "labeled_pool" / "Forest").glob("*.jpg"))
    with Image.open(img) as im:
        arr = np.asarray(im.convert("RGB")).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(img, format="JPEG")
    rebuilt = st.build_standin(out, pool, s, progress=False)
    assert rebuilt["key"] != info["key"]
    assert json.loads((out / st.STAMP).read_text())["key"] == rebuilt["key"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".standin")]


def test_only_the_standin_command_reads_labeled_pool():
    """The label-free product code never names the labeled folder; distillery/standin.py is the one place."""
    product = [REPO / "distillery", REPO / "teacher", REPO / "student", REPO / "export", REPO / "runtime"]
    hits = sorted(str(p.relative_to(REPO)) for d in product for p in d.rglob("*.py")
                  if "labeled_pool" in p.read_text(encoding="utf-8"))
    assert hits == ["distillery/standin.py"], hits
