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
from distillery.student.cache import file_sha256
from distillery.student.data import list_eval_images
from distillery.student.model import build_student

MODEL = "mobilenetv3_small_050"
CLASSES = ["red", "green", "blue"]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
CONFIG_KEYS = {"architecture", "num_classes", "class_names", "model_args", "data_config", "weights", "job_hash",
               "versions"}
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
            rows.append({"path": str(p), "source": "real", "sha256": file_sha256(p), "label": c, "soft_target": soft,
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


def _log_softmax(a):
    a = a - a.max(axis=1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


def test_distillation_loss_matches_hand_computation():
    """SPEC §7: alpha tau^2 KL(softmax(log p / tau) || softmax(z / tau)) + (1 - alpha) CE, on 2 x 3 numbers."""
    z = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    p = np.array([[0.7, 0.2, 0.1], [0.0, 0.25, 0.75]])  # a zero entry: it stays 0 at any tau, 0·log 0 = 0
    y = np.array([0, 1])
    w = np.array([1.0, 3.0])
    tau, alpha = 2.0, 0.5

    # the teacher softened at tau by hand: sqrt of each probability, renormalised
    q = np.array([[math.sqrt(0.7), math.sqrt(0.2), math.sqrt(0.1)], [0.0, math.sqrt(0.25), math.sqrt(0.75)]])
    q /= q.sum(axis=1, keepdims=True)
    log_q = _log_softmax(z / tau)
    kl = np.array([sum(qi * (math.log(qi) - lq) for qi, lq in zip(qr, lr) if qi > 0) for qr, lr in zip(q, log_q)])
    ce = -_log_softmax(z)[np.arange(2), y]
    expected = (w * (alpha * tau**2 * kl + (1 - alpha) * ce)).sum() / w.sum()

    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = distillation_loss(t(z), t(p), torch.tensor(y), t(w), temperature=tau, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # alpha = 0 is plain weighted cross-entropy, whatever the soft targets and temperature
    ce_only = distillation_loss(t(z), t(p), torch.tensor(y), t(w), temperature=tau, alpha=0.0)
    assert ce_only.item() == pytest.approx((w * ce).sum() / w.sum(), rel=1e-6)
    plain = torch.nn.functional.cross_entropy(t(z), torch.tensor(y))
    assert distillation_loss(t(z), t(p), torch.tensor(y)).item() == pytest.approx(plain.item(), rel=1e-6)


def _fit_free_logits(loss_fn, steps=3000):
    """Free logits z (one row) minimising ``loss_fn(z)``, from z = 0."""
    z = torch.zeros(1, 3, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(z).backward()
        opt.step()
    return torch.softmax(z.detach(), dim=1)[0]


def test_distillation_recovers_the_teacher_distribution():
    """Minimising the KL at tau = 2 (alpha 1) over free logits gives softmax(z) = p, the teacher's distribution.
    Softening only the student (the old formula) would give p^tau renormalised instead."""
    p = torch.tensor([[0.6, 0.3, 0.1]])
    label = torch.tensor([0])
    tau = 2.0
    got = _fit_free_logits(lambda z: distillation_loss(z, p, label, temperature=tau, alpha=1.0))
    assert torch.allclose(got, p[0], atol=1e-3), got

    def student_only(z):  # tau^2 KL(p || softmax(z / tau))
        return tau**2 * (torch.xlogy(p, p) - p * torch.log_softmax(z / tau, dim=1)).sum()

    old = _fit_free_logits(student_only)
    sharpened = p[0] ** tau / (p[0] ** tau).sum()
    assert torch.allclose(old, sharpened, atol=1e-3), old  # what the old formula taught: p^tau renormalised
    assert (old - p[0]).abs().max() > 0.1 and (got - sharpened).abs().max() > 0.1


def test_soft_targets_written_at_another_temperature():
    """p stored at T_m = softmax(z_t / T_m): the loss compares the student with softmax(z_t / tau), per row."""
    z_t = torch.tensor([[3.0, 1.0, -2.0], [0.5, 0.0, 2.5]])  # the teacher's logits
    t_m = torch.tensor([4.0, 1.0])  # each row's manifest temperature
    p = torch.softmax(z_t / t_m[:, None], dim=1)
    z = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 2.0, 0.0]])
    label = p.argmax(1)
    tau = 2.0
    q = torch.softmax(z_t / tau, dim=1)  # what the student is compared with
    by_hand = tau**2 * (q * (q.log() - torch.log_softmax(z / tau, dim=1))).sum(1).mean()
    got = distillation_loss(z, p, label, temperature=tau, alpha=1.0, target_temperature=t_m)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # a float temperature is the same as that value in every row; tau = T_m uses p as it is
    row0 = distillation_loss(z[:1], p[:1], label[:1], temperature=tau, alpha=1.0, target_temperature=4.0)
    assert row0.item() == pytest.approx(distillation_loss(z[:1], p[:1], label[:1], temperature=tau, alpha=1.0,
                                                          target_temperature=t_m[:1]).item(), rel=1e-6)
    same = distillation_loss(z, p, label, temperature=4.0, alpha=1.0, target_temperature=4.0)
    assert same.item() == pytest.approx((16 * (p * (p.log() - torch.log_softmax(z / 4, 1))).sum(1).mean()).item(),
                                        rel=1e-6)
    # and free logits recover the teacher's own distribution softmax(z_t) from targets stored at T_m = 4
    got = _fit_free_logits(lambda z: distillation_loss(z, p[:1], label[:1], temperature=tau, alpha=1.0,
                                                       target_temperature=4.0))
    assert torch.allclose(got, torch.softmax(z_t[0], 0), atol=1e-3), got


TEMP_SCHEMA = pa.schema([*SCHEMA, ("temperature", pa.float32())])


def test_manifest_temperature_reaches_the_loss(tmp_path, monkeypatch):
    """The manifest's temperature column (null = 1) is passed to the loss row by row."""
    rows = _rows(tmp_path / "unlabeled")
    for i, r in enumerate(rows):
        r["temperature"] = None if i % 3 == 0 else 4.0
    job = _job(tmp_path, rows=rows, distill_alpha=0.5, epochs=1, cache=False)
    seen = []
    loss = train_mod.distillation_loss

    def spy(*args, target_temperature=1.0, **kwargs):
        seen.append(target_temperature)
        return loss(*args, target_temperature=target_temperature, **kwargs)

    monkeypatch.setattr(train_mod, "distillation_loss", spy)
    write_table(RunPaths(job.run_path).manifest, rows, schema=TEMP_SCHEMA)
    train_student(job, progress=False)
    got = sorted(float(t) for batch in seen for t in batch)
    assert got == sorted(1.0 if i % 3 == 0 else 4.0 for i, r in enumerate(rows) if r["weight"] > 0)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_manifest_temperature_names_the_row(tmp_path, value):
    rows = _rows(tmp_path / "unlabeled")
    rows[4]["temperature"] = value
    job = _job(tmp_path)
    write_table(RunPaths(job.run_path).manifest, rows, schema=TEMP_SCHEMA)
    with pytest.raises(ValueError, match=r"row 4 .*temperature .*must be a finite number > 0"):
        train_student(job, progress=False)


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


# ----------------------------------------------------------------------------------------------
# Recipe options, decode cache, determinism


def _weights_diff(job_a, job_b) -> float:
    from safetensors.torch import load_file

    a = load_file(str(RunPaths(job_a.run_path).student_weights))
    b = load_file(str(RunPaths(job_b.run_path).student_weights))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


RECIPE = {"epochs": 2, "ema_decay": 0.9, "mixup": 0.4, "cutmix": 1.0, "randaugment": "rand-m9-n2-mstd0.5",
          "channels_last": True, "checkpoint_steps": 1}


def test_kill_mid_epoch_resumes_to_the_same_weights_with_every_option(tmp_path, monkeypatch):
    """EMA, mixup/CutMix, RandAugment, channels_last and step checkpoints: killed after step 2 of epoch 1
    (inside the epoch), the rerun reaches exactly the uninterrupted run's weights."""
    straight = _job(tmp_path, name="straight", **RECIPE)
    ref = train_student(straight, progress=False)
    assert ref["weights"] == "ema" and json.loads(RunPaths(straight.run_path).student_config.read_text())["weights"] == "ema"

    job = _job(tmp_path, name="killed", **RECIPE)
    save = train_mod._save_checkpoint
    saved = []

    def save_then_maybe_die(path, state):
        save(path, state)
        saved.append((state["epoch"], state["step"]))
        if (state["epoch"], state["step"]) == (1, 2):
            raise KeyboardInterrupt  # killed inside epoch 2, after its second step

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_maybe_die)
    with pytest.raises(KeyboardInterrupt):
        train_student(job, progress=False)
    assert saved == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # 3 steps per epoch: step checkpoints + epoch end
    monkeypatch.setattr(train_mod, "_save_checkpoint", save)
    metrics = train_student(job, progress=False)
    assert metrics["resumed_from"] == {"epoch": 1, "step": 2}
    assert [h["loss"] for h in metrics["history"]] == pytest.approx([h["loss"] for h in ref["history"]], rel=1e-6)
    assert _weights_diff(straight, job) == 0.0


def test_worker_count_does_not_change_the_weights(tmp_path):
    """Augmentation is seeded per (seed, epoch, sample), so 0 and 2 DataLoader workers train identically."""
    a = _job(tmp_path, name="w0", epochs=1, randaugment="rand-m9-mstd0.5", workers=0)
    b = _job(tmp_path, name="w2", epochs=1, randaugment="rand-m9-mstd0.5", workers=2)
    train_student(a, progress=False)
    train_student(b, progress=False)
    assert _weights_diff(a, b) == 0.0


def test_ema_weights_are_the_saved_ones_and_differ_from_the_raw_model(tmp_path):
    job = _job(tmp_path, name="ema", epochs=1, ema_decay=0.5, eval_dir=_eval_dir(tmp_path))
    metrics = train_student(job, progress=False)
    ckpt = torch.load(RunPaths(job.run_path).student / "checkpoint.pt", weights_only=True)
    from safetensors.torch import load_file

    saved = load_file(str(RunPaths(job.run_path).student_weights))
    k = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and "weight" in k)
    assert torch.equal(saved[k], ckpt["ema"][k])
    assert not torch.equal(saved[k], ckpt["model"][k])
    assert "top1_without_ema" in metrics["eval"]


def _eval_dir(tmp_path, per_class=2):
    folder = tmp_path / "eval"
    for c, (name, color) in enumerate(zip(CLASSES, COLORS)):
        for k in range(per_class):
            _png(folder / name.upper() / f"{k}.png", color, seed=500 + 10 * c + k)
    return folder


def test_evaluation_writes_confusion_matrix_and_report(tmp_path):
    job = _job(tmp_path, name="cm", epochs=1, eval_dir=_eval_dir(tmp_path, per_class=3))
    metrics = train_student(job, progress=False)
    ev = metrics["eval"]
    cm = np.asarray(ev["confusion"])
    assert cm.shape == (3, 3) and cm.sum() == ev["images"] == 9
    assert cm.sum(axis=1).tolist() == [ev["per_class_images"][c] for c in CLASSES]
    assert [cm[i, i] / cm[i].sum() for i in range(3)] == pytest.approx([ev["per_class"][c] for c in CLASSES])
    assert np.trace(cm) / cm.sum() == pytest.approx(ev["top1"])
    out = RunPaths(job.run_path).student
    with Image.open(out / "confusion.png") as im:
        assert im.format == "PNG" and im.width > 3 * 44 and im.height > 3 * 44
    report = (out / "report.md").read_text()
    assert f"{ev['top1']:.4f}" in report and "confusion.png" in report


def test_decode_cache_is_keyed_by_content(tmp_path):
    from distillery.student.cache import DecodeCache, decode_square

    a = _png(tmp_path / "a.png", (10, 200, 30), seed=1, size=48)
    b = _png(tmp_path / "b.png", (200, 10, 30), seed=2, size=40)
    cache = DecodeCache(tmp_path / "cache", 32)
    assert cache.add([(file_sha256(a), a), (file_sha256(b), b)]) == 2
    np.testing.assert_array_equal(cache.get(file_sha256(a)), decode_square(a, 32))
    assert decode_square(a, 32).shape == (32, 32, 3)

    # a copy under another name reuses the slot; a fresh instance reads the index back
    c = tmp_path / "copy.png"
    c.write_bytes(a.read_bytes())
    again = DecodeCache(tmp_path / "cache", 32)
    assert len(again) == 2 and again.add([(file_sha256(c), c), (file_sha256(b), b)]) == 0

    # a torn tail (crash while appending) is padded over, never read as an image
    with open(again.pixels_path, "ab") as f:
        f.write(b"\1" * 100)
    d = _png(tmp_path / "d.png", (90, 90, 90), seed=3, size=32)
    assert again.add([(file_sha256(d), d)]) == 1
    np.testing.assert_array_equal(again.get(file_sha256(d)), decode_square(d, 32))
    np.testing.assert_array_equal(again.get(file_sha256(b)), decode_square(b, 32))
    # another resolution is another folder
    assert DecodeCache(tmp_path / "cache", 16).folder != cache.folder


def test_image_changed_after_the_teacher_stage_is_a_clear_error(tmp_path):
    rows = _rows(tmp_path / "unlabeled")
    job = _job(tmp_path, rows=rows)
    _png(tmp_path / "unlabeled" / "1_2.png", (0, 0, 0), seed=99)  # edited after the manifest was written
    with pytest.raises(ValueError, match=r"row 6 .*1_2\.png.*changed after the teacher stage"):
        train_student(job, progress=False)


def test_uncached_run_reads_the_files(tmp_path):
    job = _job(tmp_path, name="nocache", epochs=1, cache=False)
    metrics = train_student(job, progress=False)
    assert metrics["train_images"] == 11 and not (RunPaths(job.run_path).root / "cache").exists()


def test_device_normalisation_matches_timm_transform():
    """uint8 batch -> Normalize on the device equals ToTensor + Normalize(mean, std) per image."""
    from torchvision import transforms as T

    from distillery.student.data import Normalize

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    arr = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    ours = Normalize(mean, std)(x)
    ref = torch.stack([T.Compose([T.ToTensor(), T.Normalize(mean, std)])(Image.fromarray(a)) for a in arr])
    assert (ours - ref).abs().max().item() < 1e-5


def test_mix_batch_mixes_inputs_as_stated():
    from distillery.student.mix import mix_batch

    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8)
    same, perm, lam = mix_batch(x, 0, 0, 0)
    assert perm is None and lam == 1.0 and same is x
    m, perm, lam = mix_batch(x, 0, 0, 0, mixup=0.4)
    assert 0 <= lam <= 1 and sorted(perm.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(m, lam * x + (1 - lam) * x[perm])
    assert torch.equal(mix_batch(x, 0, 0, 0, mixup=0.4)[0], m)  # same (seed, epoch, step): same mix
    c, perm, lam = mix_batch(x, 0, 0, 1, cutmix=1.0)
    pasted = (c != x).any(dim=1)  # (B, H, W) pixels taken from the partner (all distinct values here)
    kept = 1 - pasted[perm != torch.arange(4)].float().mean().item() if (perm != torch.arange(4)).any() else 1.0
    assert lam == pytest.approx(kept)


def test_mixed_loss_equals_loss_to_mixed_targets_up_to_a_constant():
    """lam*L(a) + (1-lam)*L(b) has the same gradient as the loss to the mixed softened target and mixed one-hot label."""
    torch.manual_seed(0)
    z = torch.randn(5, 4, requires_grad=True)
    pa_, pb = torch.softmax(torch.randn(5, 4), 1), torch.softmax(torch.randn(5, 4), 1)
    ya, yb = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([3, 2, 1, 0, 1])
    lam, tau, alpha = 0.3, 2.0, 0.6
    ours = lam * distillation_loss(z, pa_, ya, None, tau, alpha) + (1 - lam) * distillation_loss(z, pb, yb, None, tau, alpha)
    g1, = torch.autograd.grad(ours, z)
    # by hand: mixed soft target (each softened to tau, i.e. softmax(log p / tau)) and mixed one-hot label y
    p = lam * torch.softmax(pa_.log() / tau, 1) + (1 - lam) * torch.softmax(pb.log() / tau, 1)
    y = lam * torch.nn.functional.one_hot(ya, 4) + (1 - lam) * torch.nn.functional.one_hot(yb, 4)
    ref = (alpha * tau ** 2 * -(p * torch.log_softmax(z / tau, 1)).sum(1) - (1 - alpha) * (y * torch.log_softmax(z, 1)).sum(1)).mean()
    g2, = torch.autograd.grad(ref, z)
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("key,value,needle", [("ema_decay", 1.0, "ema_decay"), ("mixup", -1, "mixup"),
                                              ("randaugment", "m9", "randaugment"), ("checkpoint_steps", -2, "checkpoint_steps")])
def test_bad_recipe_settings_name_the_key(tmp_path, key, value, needle):
    from distillery.job import JobError

    with pytest.raises(JobError, match=needle):
        _job(tmp_path, **{key: value})


def test_bad_randaugment_string_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="student.randaugment"):
        train_student(_job(tmp_path, randaugment="rand-zz"), progress=False)


def test_dist_info_reads_the_torchrun_variables(monkeypatch):
    from distillery.student.dist import get_dist_info, is_main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert get_dist_info() == (0, 1, 0) and is_main()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert get_dist_info() == (3, 4, 1) and not is_main()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4, WORLD_SIZE=4"):
        get_dist_info()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one'"):
        get_dist_info()


def test_a_rank_without_a_process_group_is_refused(tmp_path, monkeypatch):
    """RANK/WORLD_SIZE set by hand without torchrun's process group: a clear error before any write (the real
    2-process run, where rank 1 writes nothing, is tests/test_student_ddp.py)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    job = _job(tmp_path, name="rank1", epochs=1, cache=False, eval_dir=_eval_dir(tmp_path))
    with pytest.raises(RuntimeError, match="joined no process group; launch several processes with "
                                           "`distillery student --nproc 2`"):
        train_student(job, progress=False)
    out = RunPaths(job.run_path).student
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_temp_file_of_a_killed_checkpoint_write_is_gone_after_the_rerun(tmp_path):
    job = _job(tmp_path)
    student = RunPaths(job.run_path).student
    student.mkdir(parents=True, exist_ok=True)
    torn = student / ".checkpoint.pt.k1ll3d_x.tmp.pt"  # what a SIGKILL inside torch.save leaves
    torn.write_bytes(b"")
    train_student(job, progress=False)
    assert not torn.exists() and not list(student.glob(".*.tmp*"))
