"""CLIP zero-shot (SPEC §3) and the ensemble (SPEC §6), recomputed by hand on small numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distillery.rundir import RunPaths, read_table
from distillery.teacher import clip as tclip
from distillery.teacher import ensemble


def test_zero_shot_equation_by_hand():
    # two classes, two templates, 2-d features
    text = np.array([[[3.0, 0.0], [1.0, 1.0]],      # class 0: templates along x and the diagonal
                     [[0.0, 2.0], [0.0, 5.0]]])     # class 1: along y
    w = tclip.zero_shot_weights(text)
    d = 1 / math.sqrt(2)
    m0 = np.array([(1 + d) / 2, d / 2])
    m0 = m0 / np.hypot(*m0)
    assert np.allclose(w, [m0, [0.0, 1.0]])
    img = np.array([[2.0, 0.0]])  # normalised: (1, 0)
    s = 100.0
    l0, l1 = s * m0[0], 0.0
    p0 = math.exp(l0) / (math.exp(l0) + math.exp(l1))
    assert np.allclose(tclip.zero_shot_probs(img, w, s), [[p0, 1 - p0]])
    # the scale sharpens, a zero scale is uniform
    assert np.allclose(tclip.zero_shot_probs(img, w, 0.0), [[0.5, 0.5]])


def test_templates_format():
    assert tclip.format_templates(["a {domain} of a {c}.", "{c}"], "river", "satellite photo") == \
        ["a satellite photo of a river.", "river"]


def test_fuse_and_agreement_by_hand():
    p_a = np.array([[0.7, 0.3], [0.2, 0.8]])
    p_b = np.array([[0.1, 0.9], [0.4, 0.6]])
    fused = ensemble.fuse({"a": p_a, "b": p_b}, {"a": 3.0, "b": 1.0})
    assert np.allclose(fused, [[(2.1 + 0.1) / 4, (0.9 + 0.9) / 4], [(0.6 + 0.4) / 4, (2.4 + 0.6) / 4]])
    label = fused.argmax(1)
    assert label.tolist() == [0, 1]
    assert ensemble.agreement({"a": p_a, "b": p_b}, label).tolist() == [0.5, 1.0]
    assert np.allclose(ensemble.fuse({"a": p_a, "b": p_b}, {"a": 1.0, "b": 0.0}), p_a)  # weight 0 is ignored
    with pytest.raises(ValueError, match="'c'"):
        ensemble.fuse({"a": p_a}, {"c": 1.0})


def test_teacher_stages_write_the_contract(make_job):
    from distillery.teacher import run_teacher

    job = make_job({"teacher.prior.mode": "none", "teacher.clip.logit_scale": 100.0})  # the papers' column
    run_teacher(job, progress=False)
    paths = RunPaths(job.run_path)
    pl = read_table(paths.pseudo_labels)
    assert len(pl) == 20
    row = pl[0]
    assert {"path", "sha256", "p_clip", "soft_target", "label", "confidence"} <= set(row)
    assert len(row["p_clip"]) == 3 and abs(sum(row["soft_target"]) - 1) < 1e-5
    assert row["label"] == int(np.argmax(row["soft_target"])) and abs(row["confidence"] - max(row["soft_target"])) < 1e-6
    man = read_table(paths.manifest)
    assert {r["source"] for r in man} == {"real", "synthetic"}
    assert len(man) == 20 + 3 * 2
    syn = [r for r in man if r["source"] == "synthetic"]
    assert all(r["soft_target"][r["label"]] == 1.0 for r in syn)
    assert {"path", "source", "label", "soft_target", "weight"} <= set(man[0])
    # independent recomputation of the CLIP column from the model
    from distillery.models import load_clip
    from distillery.rundir import list_images

    model, preprocess, tok = load_clip(job.models.clip)
    import torch
    from PIL import Image

    with torch.no_grad():
        t = model.encode_text(tok([f"a satellite photo of a {c}." for c in job.class_names])).numpy()
        t2 = model.encode_text(tok([f"a photo of a {c}." for c in job.class_names])).numpy()
        img = list_images(job.data.unlabeled)[0]
        f = model.encode_image(preprocess(Image.open(img).convert("RGB"))[None]).numpy()[0]
    nt = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    w = nt(nt(t) + nt(t2))
    logits = 100 * nt(f) @ w.T
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    row0 = next(r for r in pl if r["path"] == str(img.resolve()))
    assert np.allclose(row0["p_clip"], p, atol=1e-4), (row0["p_clip"], p)


def test_agreement_weights_by_hand():
    from distillery.teacher.base import agreement_weights

    a = np.array([[1, 0], [1, 0], [0, 1], [0, 1.0]])  # argmax 0 0 1 1
    b = np.array([[1, 0], [1, 0], [0, 1], [1, 0.0]])  # 0 0 1 0
    c = np.array([[0, 1], [1, 0], [0, 1], [1, 0.0]])  # 1 0 1 0
    w = agreement_weights({"a": a, "b": b, "c": c})
    # a~b 3/4, a~c 2/4, b~c 3/4 -> w_a = (3/4 + 2/4)/2, w_b = (3/4 + 3/4)/2, w_c = (2/4 + 3/4)/2
    assert w == {"a": 0.625, "b": 0.75, "c": 0.625}
    assert agreement_weights({"a": a}) == {"a": 1.0}


def test_ensemble_weights_rules(make_job):
    from distillery.teacher.base import ensemble_weights

    agree = {"teacher.ensemble.weighting": "agreement", "teacher.transduct.enabled": False}
    job = make_job(agree)  # clip, air, vermouth: air builds on clip, so air_prompt and vermouth are fused
    assert ensemble_weights(job)[0] == {"air_prompt": 1.0, "vermouth": 1.0}
    assert "two columns" in ensemble_weights(job)[1]
    job = make_job({**agree, "teacher.air.enabled": False, "teacher.vermouth.enabled": False})  # clip alone
    assert ensemble_weights(job)[0] == {"clip": 1.0}
    probs = {"air_prompt": np.eye(3)[[0, 1, 2, 0]], "vermouth": np.eye(3)[[0, 1, 1, 0]],
             "latte": np.eye(3)[[0, 2, 2, 1]]}
    job = make_job({**agree, "teacher.latte.enabled": True})
    w, why = ensemble_weights(job, {**probs, "clip": np.eye(3)[[0, 0, 0, 0]]})
    assert set(w) == {"air_prompt", "vermouth", "latte"} and "agreement" in why
    job = make_job({"teacher.ensemble.weights": {"clip": 2.0, "air_fused": 1.0}})
    assert ensemble_weights(job) == ({"clip": 2.0, "air_fused": 1.0}, "fixed (teacher.ensemble.weights)")
    # the default: Dawid-Skene over every column that ran; AiR's three columns are one group
    job = make_job()
    cols = {"clip": np.eye(3)[[0, 1, 2, 0]], "air_aux": np.eye(3)[[0, 1, 2, 1]], "air_fused": np.eye(3)[[0, 1, 2, 0]],
            "air_prompt": np.eye(3)[[0, 1, 1, 0]], "vermouth": np.eye(3)[[2, 1, 2, 0]],
            "transduct": np.eye(3)[[0, 0, 2, 0]]}
    details: dict = {}
    w, why = ensemble_weights(job, cols, None, details)
    assert set(w) == set(cols) and "Dawid-Skene" in why
    assert any({"clip", "air_aux", "air_fused", "air_prompt", "transduct"} <= set(g) for g in details["groups"])


def test_dropped_synthetic_rule(make_job):
    """A synthetic image whose generating class gets a fused probability below the threshold is left out of
    the manifest and counted for its class; recomputed here from the synthetic columns."""
    from distillery.teacher import run_teacher

    job = make_job({"teacher.synth.images_per_class": 3, "teacher.air.enabled": False,
                    "teacher.vermouth.enabled": False, "teacher.transduct.enabled": False,
                    "teacher.prior.mode": "none", "teacher.ensemble.drop_synthetic_below": 0.34})
    info = run_teacher(job, progress=False)
    paths = RunPaths(job.run_path)
    syn = read_table(paths.synthetic)
    p = {r["sha256"]: r["probs"] for r in read_table(paths.synthetic_probs("clip"))}
    low = [r for r in syn if p[r["sha256"]][r["class_index"]] < 0.34]
    kept = {r["sha256"] for r in read_table(paths.manifest) if r["source"] == "synthetic"}
    assert kept == {r["sha256"] for r in syn} - {r["sha256"] for r in low}
    dropped = info["ensemble"]["synthetic_dropped"]
    assert dropped["dropped"] == len(low) and sum(dropped["dropped_per_class"].values()) == len(low)
    assert 0 < len(low) < len(syn)  # the threshold splits the tiny model's near-uniform scores
