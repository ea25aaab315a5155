"""The class prior, the model's own temperature, the Dawid-Skene ensemble and the transductive teacher, through the
teacher stage on the tiny job."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from distillery.rundir import RunPaths, read_json, read_stamp, read_table


def _clip_at_scale(src, dst, scale: float):
    """A copy of a local open_clip folder whose logit_scale is log(scale)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "open_clip_model.safetensors"
    sd = load_file(str(f))
    sd["logit_scale"] = torch.tensor(math.log(scale), dtype=sd["logit_scale"].dtype)
    save_file(sd, str(f))
    return dst


def _features(job, shas):
    from distillery.models import load_clip
    from distillery.teacher.features import clip_feature_store

    _, preprocess, _ = load_clip(job.models.clip)
    f = clip_feature_store(job, preprocess).get(shas)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_default_logit_scale_is_the_models_own(make_job):
    import open_clip  # noqa: F401  (the tiny CLIP is an untrained open_clip model: exp(logit_scale) = 1/0.07)
    from distillery.models import load_clip
    from distillery.teacher import run_teacher
    from distillery.teacher.clip import class_weights, model_logit_scale

    job = make_job({"teacher.prior.mode": "none", "teacher.vermouth.enabled": False, "teacher.air.epochs": 1})
    assert job.teacher.clip.logit_scale is None and job.teacher.air.aux_scale is None
    run_teacher(job, progress=False)
    model, _, tok = load_clip(job.models.clip)
    s = model_logit_scale(model)
    assert s == pytest.approx(1 / 0.07, rel=1e-5)
    paths = RunPaths(job.run_path)
    assert read_stamp(paths.teacher, "teacher-clip")["logit_scale"] == pytest.approx(s, rel=1e-6)
    air = read_stamp(paths.teacher, "teacher-air")
    assert air["aux_scale"] == pytest.approx(s, rel=1e-6) and air["logit_scale"] == pytest.approx(s, rel=1e-6)
    pl = read_table(paths.pseudo_labels)
    w = class_weights(model, tok, job.teacher.clip.templates, job.class_names, job.domain_phrase, "cpu")
    f = _features(job, [r["sha256"] for r in pl])
    assert np.allclose([r["p_clip"] for r in pl], _softmax(s * f @ w.T), atol=1e-5)
    # an explicit setting overrides it
    job2 = make_job({"teacher.prior.mode": "none", "teacher.vermouth.enabled": False, "teacher.air.enabled": False,
                     "teacher.clip.logit_scale": 100.0, "run_dir": str(RunPaths(job.run_path).root) + "-100"})
    run_teacher(job2, progress=False)
    pl2 = read_table(RunPaths(job2.run_path).pseudo_labels)
    assert np.allclose([r["p_clip"] for r in pl2], _softmax(100 * f @ w.T), atol=1e-5)


def test_prior_none_at_scale_100_keeps_the_papers_columns(make_job, tiny_models, tmp_path):
    """With teacher.prior: none and a CLIP whose scale is 100, every column is computed as before the prior and the
    model's temperature existed: recomputed here from the stored features with the papers' formulas."""
    from distillery.models import load_clip
    from distillery.teacher import run_teacher
    from distillery.teacher.air import select_confident
    from distillery.teacher.clip import class_weights

    clip100 = _clip_at_scale(tiny_models["clip"], tmp_path / "clip100", 100.0)
    job = make_job({"models.clip": str(clip100), "teacher.prior.mode": "none", "teacher.synth.images_per_class": 3,
                    "teacher.air.k": 2, "teacher.air.epochs": 2, "teacher.air.top_n": 3, "teacher.latte.enabled": True,
                    "teacher.latte.epochs": 1, "teacher.latte.batch_size": 8, "teacher.latte.max_new_tokens": 4,
                    "teacher.vermouth.real_pseudo_labels": 0.4})
    run_teacher(job, progress=False)
    paths = RunPaths(job.run_path)
    assert read_json(paths.prior)["prior"] is None
    pl = read_table(paths.pseudo_labels)
    model, _, tok = load_clip(job.models.clip)
    w = class_weights(model, tok, job.teacher.clip.templates, job.class_names, job.domain_phrase, "cpu")
    f = _features(job, [r["sha256"] for r in pl])
    clip = _softmax(100 * f @ w.T)
    assert np.allclose([r["p_clip"] for r in pl], clip, atol=1e-5)
    protos = read_table(paths.teacher_dir("air") / "prototypes.parquet")
    centres = np.stack([_features(job, [r["sha256"] for r in protos if r["class_index"] == c]).mean(0)
                        for c in range(3)])
    aux = _softmax(100 * f @ centres.T)
    fused = (clip + aux) / 2
    assert np.allclose([r["p_air_aux"] for r in pl], aux, atol=1e-4)
    assert np.allclose([r["p_air_fused"] for r in pl], fused, atol=1e-4)
    # prompt learning trained on the papers' selection: argmax, ranked by fused probability
    chosen = read_table(paths.teacher_dir("air") / "training_images.parquet")
    idx, lab = select_confident(np.asarray([r["p_air_fused"] for r in pl]), 3)
    assert [r["sha256"] for r in chosen] == [pl[i]["sha256"] for i in idx]
    assert [r["pseudo_label"] for r in chosen] == lab.tolist()
    # LaTTe's c_zs is the argmax of the zero-shot column; Vermouth's real images are those above the threshold
    desc = read_table(paths.teacher_dir("latte") / "descriptions.parquet")
    assert [r["zero_shot_label"] for r in desc] == clip.argmax(1).tolist()
    assert read_stamp(paths.teacher, "teacher-vermouth")["real_training_images"] == int((clip.max(1) >= 0.4).sum())
    # nothing was matched to a prior
    for t in ("clip", "air", "latte", "vermouth"):
        assert "prior_match" not in read_stamp(paths.teacher, f"teacher-{t}")


def test_uniform_prior_matches_every_column_and_keeps_the_uncorrected_view(make_job, tmp_path):
    from distillery.teacher import run_teacher

    eval_dir = tmp_path / "eval"
    from tests.conftest import SAMPLE

    for folder in ("AnnualCrop", "Forest", "HerbaceousVegetation"):
        (eval_dir / folder).mkdir(parents=True)
        for p in sorted((SAMPLE / "eval" / folder).glob("*.jpg"))[:3]:
            shutil.copy(p, eval_dir / folder / p.name)
    job = make_job({"teacher.prior.mode": "uniform", "data.eval": str(eval_dir), "teacher.air.epochs": 1})
    info = run_teacher(job, progress=False)
    paths = RunPaths(job.run_path)
    assert read_json(paths.prior)["prior"] == pytest.approx([1 / 3] * 3)
    pl = read_table(paths.pseudo_labels)
    counts = np.bincount(np.asarray([r["p_clip"] for r in pl]).argmax(1), minlength=3)
    assert np.abs(counts - 20 / 3).max() <= 1.5, counts
    for t in ("clip", "air", "vermouth", "transduct"):
        m = read_stamp(paths.teacher, f"teacher-{t}")["prior_match"]
        for col, v in m.items():  # every column moves towards the prior (rows with equal scores cannot be split)
            assert len(v["counts_uncorrected"]) == 3 and sum(v["counts"]) == 20
            after = np.abs(np.asarray(v["counts"]) - 20 / 3).sum()
            assert after <= np.abs(np.asarray(v["counts_uncorrected"]) - 20 / 3).sum() + 1e-9, (col, v)
            pcol = np.asarray([r[f"p_{col}"] for r in pl])
            assert np.bincount(pcol.argmax(1), minlength=3).tolist() == v["counts"]
    # the manifest's hard labels meet the class sizes exactly
    labels = [r["label"] for r in read_table(paths.manifest) if r["source"] == "real"]
    assert sorted(np.bincount(labels, minlength=3).tolist()) == [6, 7, 7]
    ev = read_json(paths.teacher_eval)["columns"]
    assert "top1_uncorrected" in ev["clip"] and paths.eval_probs_uncorrected("clip").is_file()
    assert info["ensemble"]["weights_details"]["groups"]
    # the prior enters every teacher's key: another prior recomputes, the same one skips
    again = run_teacher(job, progress=False)
    assert all(again[t]["computed"] == 0 for t in ("clip", "air", "vermouth", "transduct"))


def test_given_prior_and_estimated_without_synthetic(make_job):
    from distillery.job import JobError
    from distillery.teacher import run_teacher

    job = make_job({"teacher.prior.mode": "given", "teacher.prior.given": {"annual crop land": 2, "forest": 1,
                                                                            "herbaceous vegetation land": 1},
                    "teacher.synth.enabled": False, "teacher.air.enabled": False, "teacher.vermouth.enabled": False})
    run_teacher(job, progress=False)
    assert read_json(RunPaths(job.run_path).prior)["prior"] == pytest.approx([0.5, 0.25, 0.25])
    with pytest.raises(JobError, match="no share for class 'forest'"):
        make_job({"teacher.prior.mode": "given", "teacher.prior.given": {"annual crop land": 1}})
    with pytest.raises(JobError, match="teacher.prior.mode: unknown value 'balanced'"):
        make_job({"teacher.prior.mode": "balanced"})
    with pytest.raises(JobError, match="teacher.prior.shrink"):
        make_job({"teacher.prior.shrink": 1.5})
    with pytest.raises(JobError, match="teacher.prior.given is set but"):
        make_job({"teacher.prior.given": {"forest": 1}})
    # estimated without a synthetic set: no evidence, no correction, and the reason is recorded
    job = make_job({"teacher.synth.enabled": False, "teacher.air.enabled": False, "teacher.vermouth.enabled": False,
                    "run_dir": str(RunPaths(job.run_path).root) + "-est"})
    run_teacher(job, progress=False)
    pr = read_json(RunPaths(job.run_path).prior)
    assert pr["requested"] == "estimated" and pr["prior"] is None and "synthetic" in pr["why"]


def test_transduct_math_on_two_clusters():
    from distillery.teacher.transduct import transduct, transduct_predict

    rng = np.random.default_rng(0)
    a = rng.normal([3, 0, 0], 0.3, size=(60, 3))
    b = rng.normal([0, 3, 0], 0.3, size=(20, 3))
    x = np.concatenate([a, b])
    truth = np.array([0] * 60 + [1] * 20)
    # a noisy, biased text prediction: a quarter of the first cluster leans to class 1
    y = np.where(truth[:, None] == np.arange(2), 0.7, 0.3)
    y[:15] = [0.4, 0.6]
    fit = transduct(x, y, text_weight=1.0, neighbours=3, temperature=1.0)
    assert (fit["z"].argmax(1) == truth).mean() == 1.0  # the clusters correct the text
    assert fit["proportions"] == pytest.approx([0.75, 0.25], abs=0.03)  # sizes estimated jointly
    fixed = transduct(x, y, temperature=1.0, prior=np.array([0.5, 0.5]))
    assert fixed["proportions"].tolist() == [0.5, 0.5]
    p = transduct_predict(np.array([[2.9, 0.1, 0.0]]), np.array([[0.5, 0.5]]), fit, 1.0, 1.0)
    assert p.argmax() == 0 and p.sum() == pytest.approx(1.0)
