"""The embedding student (student.head: embedding): it learns the teacher CLIP's image embeddings (loss falls,
cosine to the teacher rises), the export's cosine classification agrees with PyTorch, a swapped class matrix
changes the classes, the numpy tokenizer equals open_clip's, and the exported text encoder matches open_clip and
embeds class names into the exported matrix. Tiny models (tests/conftest.py)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from distillery.rundir import RunPaths, read_json

CLIP_ONLY = {"teacher.synth.enabled": False, "teacher.lora.enabled": False, "teacher.air.enabled": False,
             "teacher.latte.enabled": False, "teacher.vermouth.enabled": False}
STRINGS = ["a satellite photo of a sea or lake.", "Café crème brûlée", "naïve résumé", "東京タワー 北京",
           "emoji 🛰️🌊!!", "“quoted” ‘single’ it's", "ﬁne ﬂour", "ＦＵＬＬ　ｗｉｄｔｈ １２３", "don't WE'LL they'RE",
           "x² ½ ① Ⅻ ٣ 42", "a\tb\nc   d", "&amp; &lt;tag&gt; &amp;amp;", "Ελληνικά Русский עברית العربية",
           "e\u0301 combining", "...!?;:--()[]{}", "x" * 300, "ß ǅ İstanbul", "", "hello\u200bworld"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models):
    """Teacher (clip only), embedding student (4 epochs) and export (+ text encoder) on 20 real images."""
    import shutil

    from distillery.export import export_onnx
    from distillery.job import job_from_dict
    from distillery.student import train_student
    from distillery.teacher import run_teacher

    from .conftest import EUROSAT_CLASSES, SAMPLE

    tmp = tmp_path_factory.mktemp("emb")
    unl = tmp / "unlabeled"
    unl.mkdir()
    for p in sorted((SAMPLE / "unlabeled").glob("*.jpg"))[:20]:
        shutil.copy(p, unl / p.name)
    raw = {"name": "emb", "seed": 0, "domain": "satellite photo",
           "classes": [{"name": n, "folder": f} for n, f in EUROSAT_CLASSES[:4]],
           "data": {"unlabeled": str(unl)}, "run_dir": str(tmp / "run"),
           "models": {k: str(v) for k, v in tiny_models.items()},
           "teacher": {"air": {"enabled": False}, "latte": {"enabled": False}, "vermouth": {"enabled": False},
                       "synth": {"enabled": False}, "lora": {"enabled": False}},
           "student": {"model": "mobilenetv3_small_050", "input_size": 32, "epochs": 4, "batch_size": 5, "lr": 3e-3,
                       "weight_decay": 0.0, "crop_scale": [0.9, 1.0], "head": "embedding"},
           "export": {"formats": ["fp32"], "parity_images": 12, "deploy_timing_s": 0, "text_encoder": True,
                      "tensorrt": []}}
    job = job_from_dict(raw, base=tmp)
    run_teacher(job, progress=False)
    metrics = train_student(job, progress=False)
    report = export_onnx(job, progress=False)
    return {"job": job, "metrics": metrics, "report": report, "paths": RunPaths(job.run_path), "raw": raw, "tmp": tmp}


def _images(paths, n=12):
    from distillery.rundir import read_table

    return [r["path"] for r in read_table(paths.manifest, "manifest")][:n]


def test_embedding_loss_by_hand():
    from distillery.student.embedding import embedding_loss

    e = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    w = torch.tensor([1.0, 3.0])
    # rows: cos 0 -> 1, cos 1 -> 0; weighted mean (1*1 + 3*0) / 4
    assert embedding_loss(e, t, w).item() == pytest.approx(0.25)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    soft = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    labels = torch.tensor([1, 0])
    got = embedding_loss(e, t, w, text=text, logit_scale=2.0, distill=0.5, soft=soft, labels=labels, alpha=0.0)
    logits = 2.0 * torch.nn.functional.normalize(e, dim=-1) @ text.T
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert got.item() == pytest.approx(0.25 + 0.5 * ((w * ce).sum() / w.sum()).item(), rel=1e-6)


def test_student_learns_the_clip_embeddings(run):
    from distillery.models import load_clip
    from distillery.student import load_student
    from distillery.student.data import eval_transform, load_rgb
    from distillery.student.model import build_student
    from distillery.teacher.features import clip_feature_store

    job, paths, m = run["job"], run["paths"], run["metrics"]
    losses = [h["loss"] for h in m["history"]]
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    config = read_json(paths.student_config)
    assert config["head"] == "embedding" and config["embedding_dim"] == 32 and config["num_classes"] == 4
    assert config["embedding"]["computed_here"] == 0  # every target came from the teacher's feature store
    assert (paths.student / "text_embeddings.npz").is_file()

    # cosine to the teacher's embedding of the un-augmented images: trained vs the same seeded initialisation
    _, preprocess, _ = load_clip(job.models.clip)
    from distillery.rundir import read_table

    rows = [r for r in read_table(paths.manifest, "manifest")]
    target = torch.nn.functional.normalize(torch.as_tensor(clip_feature_store(job, preprocess).get(
        [r["sha256"] for r in rows])), dim=-1)
    tf = eval_transform(config["data_config"])
    x = torch.stack([tf(load_rgb(r["path"])) for r in rows])
    trained, _ = load_student(paths.student)
    torch.manual_seed(job.seed)
    init, _, _ = build_student(job.student.model, 32)
    with torch.no_grad():
        cos_after = torch.nn.functional.cosine_similarity(trained(x), target).mean().item()
        cos_before = torch.nn.functional.cosine_similarity(init.eval()(x), target).mean().item()
    assert cos_after > cos_before + 0.05, (cos_before, cos_after)


def test_text_matrix_is_the_clip_teachers(run):
    from distillery.models import load_clip
    from distillery.runtime.embeddings import load_class_embeddings
    from distillery.teacher.clip import class_weights

    job, paths = run["job"], run["paths"]
    model, _, tok = load_clip(job.models.clip)
    want = class_weights(model, tok, job.teacher.clip.templates, job.class_names, job.domain_phrase, "cpu")
    got, names = load_class_embeddings(paths.student / "text_embeddings.npz")
    assert names == job.class_names
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_export_runtime_cosine_agrees_with_torch_and_swaps_classes(run, tmp_path, capsys):
    import shutil

    from distillery.runtime import Classifier
    from distillery.runtime.embeddings import file_sha256, save_class_embeddings
    from distillery.runtime.cli import main as run_main
    from distillery.student import load_student
    from distillery.student.embedding import CosineClassifier

    paths, report = run["paths"], run["report"]
    fp32 = report["formats"]["fp32"]
    assert fp32["passed"] and fp32["max_abs_diff"] < 1e-3, fp32
    clf = Classifier.load(paths.export)
    meta = clf.metadata
    assert meta["head"] == "embedding" and meta["embedding"]["dim"] == 32
    assert meta["embedding"]["text_embeddings_sha256"] == file_sha256(paths.export / "text_embeddings.npz")
    assert [o.name for o in clf.session.get_outputs()] == ["embedding"]

    images = _images(paths)
    batch = clf.preprocess_batch(images)
    emb = clf.predict_embeddings(batch)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    model, config = load_student(paths.student)
    from distillery.runtime.embeddings import load_class_embeddings

    text, names = load_class_embeddings(paths.student / "text_embeddings.npz")
    with torch.no_grad():
        ref = CosineClassifier(model, text, config["logit_scale"])(torch.from_numpy(batch)).numpy()
    got = clf.predict_logits(batch)
    d = np.abs(got - ref)
    assert d.max() < 1e-3, f"max |Δlogit| {d.max():.3g}, mean {d.mean():.3g}"
    assert (got.argmax(1) == ref.argmax(1)).all()
    before = [p.label for p in clf.predict(images)]

    # swap: reversed rows under new names -> the same images map to the mirrored classes
    new_names = [f"new {n}" for n in reversed(names)]
    clf.set_class_embeddings(text[::-1], new_names)
    after = [p.label for p in clf.predict(images)]
    assert after == [f"new {n}" for n in before]
    # a new class equal to an image's own embedding wins that image
    clf.set_class_embeddings(np.concatenate([text, emb[:1]]), names + ["glacier"])
    assert clf.predict(images[:1])[0].label == "glacier"

    # a side file from the CLI
    side = tmp_path / "mine.npz"
    save_class_embeddings(side, text[::-1], new_names)
    capsys.readouterr()
    rc = run_main([str(paths.export), images[0], "--json", "--text-embeddings", str(side)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"] == f"new {before[0]}"

    # clear errors: wrong dimension, missing or altered side file (naming it)
    with pytest.raises(ValueError, match="dimension 5 but the model's embedding has 32"):
        clf.set_class_embeddings(np.ones((2, 5)), ["a", "b"])
    with pytest.raises(ValueError, match="2 class names for 3"):
        clf.set_class_embeddings(np.ones((3, 32)), ["a", "b"])
    copy = tmp_path / "export"
    shutil.copytree(paths.export, copy)
    (copy / "text_embeddings.npz").unlink()
    with pytest.raises(FileNotFoundError, match="text_embeddings.npz"):
        Classifier.load(copy / "model.onnx")
    save_class_embeddings(copy / "text_embeddings.npz", text[::-1], names)
    with pytest.raises(ValueError, match="text_embeddings.npz.*sha256"):
        Classifier.load(copy / "model.onnx")


def test_runtime_tokenizer_equals_open_clip():
    from open_clip.tokenizer import SimpleTokenizer as OpenClip
    from open_clip.tokenizer import default_bpe

    from distillery.runtime.tokenizer import SimpleTokenizer

    ours, theirs = SimpleTokenizer(default_bpe()), OpenClip()
    for s in STRINGS:
        a, b = ours([s]), theirs([s]).numpy()
        assert np.array_equal(a, b), f"{s!r}: ours {a[0][:12]} vs open_clip {b[0][:12]}"
    assert np.array_equal(ours(STRINGS), theirs(STRINGS).numpy())
    # the documented difference: ftfy repairs mojibake, the runtime does not
    assert not np.array_equal(ours(["cafÃ©"]), theirs(["cafÃ©"]).numpy())


def test_text_encoder_onnx_matches_open_clip_and_embeds_the_exported_matrix(run):
    from distillery.models import load_clip
    from distillery.runtime import Classifier
    from distillery.runtime.embeddings import load_class_embeddings
    from distillery.runtime.text import TextEncoder

    job, paths = run["job"], run["paths"]
    te = run["report"]["text_encoder"]
    assert te["tokens_equal"] and te["max_abs_diff"] < 1e-4, te
    enc = TextEncoder.load(paths.export)
    model, _, tok = load_clip(job.models.clip)
    texts = STRINGS[:8] + ["a satellite photo of a glacier.", "a photo of a volcano."]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(tok(texts)), dim=-1).numpy()
    got = enc.embed(texts)
    d = np.abs(got - ref)
    assert d.max() < 1e-4, f"max |Δ| {d.max():.3g}, mean {d.mean():.3g}"

    exported, names = load_class_embeddings(paths.export / "text_embeddings.npz")
    device = enc.class_embeddings(names)
    np.testing.assert_allclose(device, exported, atol=1e-5)
    clf = Classifier.load(paths.export)
    images = _images(paths)
    with_exported = [p.label for p in clf.predict(images)]
    clf.set_class_embeddings(device, names)
    assert [p.label for p in clf.predict(images)] == with_exported


def test_logits_head_key_unchanged(tmp_path):
    """The default head hashes exactly the settings it hashed before student.head existed."""
    import dataclasses

    from distillery.job import job_from_dict
    from distillery.student.embedding import stage_settings

    (tmp_path / "u").mkdir()
    job = job_from_dict({"name": "k", "classes": ["a", "b"], "data": {"unlabeled": str(tmp_path / "u")}}, tmp_path)
    settings = {"student": dataclasses.asdict(job.student), "classes": job.class_names, "seed": 0}
    old = {k: v for k, v in settings["student"].items() if k not in ("head", "embedding_distill")}
    assert stage_settings(settings, job) == {**settings, "student": old}


def test_bad_head_setting_names_the_key(tmp_path):
    from distillery.job import JobError, job_from_dict

    (tmp_path / "u").mkdir()
    with pytest.raises(JobError, match="student.head"):
        job_from_dict({"name": "k", "classes": ["a", "b"], "data": {"unlabeled": str(tmp_path / "u")},
                       "student": {"head": "embeddings"}}, tmp_path)
