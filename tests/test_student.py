"""The student room: training writes its three files, load_student round-trips, reruns are no-ops,
interrupted runs resume to the same weights, the KD loss matches SPEC §7 by hand, bad manifests fail."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from distillery.job import job_from_dict
from distillery.rundir import RunPaths, write_table
from distillery.student import distillation_loss, load_student, train_student
from distillery.student import train as train_mod
from distillery.student.data import list_eval_images
from distillery.student.model import build_student

MODEL = "mobilenetv3_small_050"
CLASSES = ["red", "green", "blue"]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
CONFIG_KEYS = {"architecture", "num_classes", "class_names", "model_args", "data_config", "job_hash", "versions"}
DATA_CONFIG_KEYS = {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}
SCHEMA = pa.schema([("path", pa.string()), ("source", pa.string()), ("sha256", pa.string()), ("label", pa.int64()),
                    ("soft_target", pa.list_(pa.float32())), ("weight", pa.float32())])


def _png(path, color, seed, size=32):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _rows(folder, per_class=4):
    rows = []
    for c, color in enumerate(COLORS):
        for k in range(per_class):
            p = _png(folder / f"{c}_{k}.png", color, seed=10 * c + k, size=32 + 8 * (k % 2))  # mixed sizes
            soft = [0.1] * len(COLORS)
            soft[c] = 1.0 - 0.1 * (len(COLORS) - 1)
            rows.append({"path": str(p), "source": "real", "sha256": "0" * 64, "label": c, "soft_target": soft,
                         "weight": 0.0 if k == 3 and c == 0 else 1.0})  # one ignored row
    return rows


def _job(tmp_path, name="tiny", rows=None, eval_dir=None, **student):
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir(exist_ok=True)
    raw = {"name": name, "classes": [{"name": c, "folder": c.upper()} for c in CLASSES],
           "data": {"unlabeled": str(unlabeled), **({"eval": str(eval_dir)} if eval_dir else {})},
           "run_dir": str(tmp_path / "runs" / name),
           "student": {"model": MODEL, "epochs": 1, "batch_size": 4, "input_size": 32, **student}}
    job = job_from_dict(raw, base=tmp_path)
    write_table(RunPaths(job.run_path).manifest, rows if rows is not None else _rows(unlabeled), schema=SCHEMA)
    return job


def test_train_writes_outputs_roundtrips_and_reruns_as_noop(tmp_path, capsys):
    eval_dir = tmp_path / "eval"
    for c, color in enumerate(COLORS):
        for k in range(2):
            _png(eval_dir / CLASSES[c].upper() / f"{k}.png", color, seed=100 + 10 * c + k)
    job = _job(tmp_path, eval_dir=eval_dir)
    paths = RunPaths(job.run_path)

    metrics = train_student(job, progress=False)
    for p in (paths.student_weights, paths.student_config, paths.student_metrics, paths.student / "checkpoint.pt",
              paths.student / "job.resolved.json"):
        assert p.is_file(), p
    config = json.loads(paths.student_config.read_text())
    assert set(config) == CONFIG_KEYS
    assert set(config["data_config"]) == DATA_CONFIG_KEYS
    assert config["architecture"] == MODEL and config["num_classes"] == 3 and config["class_names"] == CLASSES
    assert config["data_config"]["input_size"] == [3, 32, 32] and config["data_config"]["crop_mode"] == "center"
    assert set(config["versions"]) == {"torch", "timm"}
    assert metrics["epochs"] == 1 and math.isfinite(metrics["train_loss"]) and metrics["images_per_s"] > 0
    assert metrics["train_images"] == 11 and metrics["ignored_rows"] == 1
    ev = metrics["eval"]
    assert ev["images"] == 6 and set(ev["per_class"]) == set(CLASSES) and 0.0 <= ev["top1"] <= 1.0
    assert json.loads(paths.student_metrics.read_text()) == metrics

    # load_student gives the same logits as the trained weights in the last checkpoint
    model, cfg2 = load_student(paths.student)
    assert cfg2 == config and not model.training
    import timm

    ref = timm.create_model(MODEL, pretrained=False, num_classes=3)
    ref.load_state_dict(torch.load(paths.student / "checkpoint.pt", weights_only=True)["model"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), ref.eval()(x)
    assert torch.equal(a, b), f"max diff {(a - b).abs().max():.3g}, mean {(a - b).abs().mean():.3g}"

    # same inputs and settings: nothing is redone
    mtimes = [p.stat().st_mtime_ns for p in (paths.student_weights, paths.student_config, paths.student_metrics)]
    capsys.readouterr()
    assert train_student(job, progress=False) == metrics
    assert "up to date" in capsys.readouterr().err
    assert mtimes == [p.stat().st_mtime_ns for p in (paths.student_weights, paths.student_config, paths.student_metrics)]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    straight = _job(tmp_path, name="straight", epochs=2)
    train_student(straight, progress=False)

    job = _job(tmp_path, name="killed", epochs=2)
    save = train_mod._save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_student(job, progress=False)
    assert not RunPaths(job.run_path).student_weights.exists()
    monkeypatch.setattr(train_mod, "_save_checkpoint", save)
    metrics = train_student(job, progress=False)
    assert metrics["resumed_from_epoch"] == 1 and len(metrics["history"]) == 2

    a = load_file(str(RunPaths(straight.run_path).student_weights))
    b = load_file(str(RunPaths(job.run_path).student_weights))
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0.0, f"max diff {diffs[worst]:.3g} in {worst}"


def test_distillation_loss_matches_hand_computation():
    z = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    p = np.array([[0.7, 0.2, 0.1], [0.0, 0.25, 0.75]])  # a zero entry: 0·log 0 = 0
    y = np.array([0, 1])
    w = np.array([1.0, 3.0])
    tau, alpha = 2.0, 0.5

    def log_softmax(a):
        a = a - a.max(axis=1, keepdims=True)
        return a - np.log(np.exp(a).sum(axis=1, keepdims=True))

    log_q = log_softmax(z / tau)
    kl = np.array([sum(pi * (math.log(pi) - lq) for pi, lq in zip(pr, lr) if pi > 0) for pr, lr in zip(p, log_q)])
    ce = -log_softmax(z)[np.arange(2), y]
    expected = (w * (alpha * tau**2 * kl + (1 - alpha) * ce)).sum() / w.sum()

    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = distillation_loss(t(z), t(p), torch.tensor(y), t(w), temperature=tau, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # alpha = 0 is plain weighted cross-entropy, whatever the soft targets and temperature
    ce_only = distillation_loss(t(z), t(p), torch.tensor(y), t(w), temperature=tau, alpha=0.0)
    assert ce_only.item() == pytest.approx((w * ce).sum() / w.sum(), rel=1e-6)
    plain = torch.nn.functional.cross_entropy(t(z), torch.tensor(y))
    assert distillation_loss(t(z), t(p), torch.tensor(y)).item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("field,value,needle", [
    ("path", "MISSING", "does not exist"),
    ("soft_target", [float("nan"), 0.5, 0.5], "NaN"),
    ("soft_target", [0.5, 0.5], "length 2, expected 3"),
    ("label", 7, "label 7"),
])
def test_bad_manifest_names_the_row(tmp_path, field, value, needle):
    rows = _rows(tmp_path / "unlabeled")
    if value == "MISSING":
        value = str(tmp_path / "gone.png")
    rows[5][field] = value
    job = _job(tmp_path, rows=rows)
    with pytest.raises(ValueError) as err:
        train_student(job, progress=False)
    msg = str(err.value)
    assert "row 5" in msg and needle in msg and rows[5]["path"] in msg, msg


def test_pretrained_local_folder_reuses_weights_and_reinitialises_head(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src, _, _ = build_student(MODEL, num_classes=5)
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": MODEL, "num_classes": 5, "model_args": {},
        "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                           "crop_pct": 1.0, "classifier": "classifier"}}))
    for ref in (str(folder), f"local-dir:{folder}"):
        model, arch, _ = build_student(MODEL, num_classes=3, pretrained=ref)
        assert arch == MODEL
        own, theirs = model.state_dict(), src.state_dict()
        assert model.get_classifier().out_features == 3
        assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("classifier.")), ref
    with pytest.raises(ValueError, match="resnet10t"):
        build_student("resnet10t", num_classes=3, pretrained=str(folder))


def test_eval_folder_that_matches_no_class_is_an_error(tmp_path):
    _png(tmp_path / "RED" / "a.png", COLORS[0], 0)
    _png(tmp_path / "Purple" / "b.png", COLORS[1], 1)
    with pytest.raises(ValueError, match="Purple"):
        list_eval_images(tmp_path, ["RED", "GREEN", "BLUE"], [".png"])
    assert [lab for _, lab in list_eval_images(tmp_path, ["RED", "Purple"], [".png"])] == [1, 0]
