"""AiR (teacher/air.py): each formula recomputed by hand on small made-up arrays, the prompt learner
against open_clip's own encode_text on the tiny CLIP, and prompt training on a toy problem."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillery.teacher import air
from distillery.teacher.air import AirCfg

CLASSES = ["forest", "river", "highway or road"]


@pytest.fixture(scope="module")
def clip(tiny_models):
    from distillery.models import load_clip

    model, preprocess, tokenizer = load_clip(str(tiny_models["clip"]))
    return model, preprocess, tokenizer


# --- settings -----------------------------------------------------------------------------------------

def test_defaults_pass_check():
    AirCfg().check()


@pytest.mark.parametrize("field,value,words", [
    ("k", 0, "got 0"), ("m", 0, "got 0"), ("fusion_lambda", -1.0, "got -1.0"),
    ("aux_normalize", "l2", "unknown value 'l2'; choose from softmax, sum, none"), ("aux_scale", 0.0, "got 0.0"),
    ("prototype_tricks", ["bogus"], "unknown trick 'bogus'"), ("prototype_tricks", [], "got []"),
    ("n_ctx", 0, "got 0"), ("n_ctx", 70, "70 context tokens"), ("top_n", 0, "got 0"),
    ("beta", -0.5, "got -0.5"), ("epochs", 0, "got 0"), ("lr", 0.0, "got 0.0"),
    ("momentum", 1.0, "[0, 1), got 1.0"), ("ctx_init", "a {c} of", "only {domain}"), ("seed", 1.5, "got 1.5"),
    ("enabled", "yes", "got 'yes'"), ("warmup_epochs", -1, "got -1"),
])
def test_check_names_key_value_and_fix(field, value, words):
    with pytest.raises(ValueError) as e:
        AirCfg(**{field: value}).check()
    msg = str(e.value)
    assert msg.startswith(f"teacher.air.{field}: "), msg
    assert words in msg, msg
    with pytest.raises(ValueError, match=rf"^air\.{field}: "):
        AirCfg(**{field: value}).check(key="air")


def test_air_imports_torch_only_inside_functions():
    """AiR's numpy math needs no torch: the module has no top-level torch import (the teacher package as a
    whole does import torch, through LaTTe-CLIP)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("teacher", "air.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [x for x in names if x.split(".")[0] == "torch"], names
    import numpy as np

    from distillery.teacher import air as a
    a.AirCfg().check()
    assert a.fuse(np.eye(2), np.eye(2), 1.0)[1].sum() == 2.0


# --- ACG ----------------------------------------------------------------------------------------------

def test_select_prototypes_obvious_2d():
    # mean direction is ~(1, 0): rows at 0°, ±10° are closest, then ±40°, then the outlier at 180°-ish.
    deg = np.array([0.0, 40.0, -10.0, 170.0, 10.0, -40.0])
    feats = np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], 1) * np.array([[1], [3], [2], [1], [5], [1]])
    # the mean of the unit vectors points at ~2.8°: ranked 0° (row 0), 10° (4), -10° (2), 40° (1), -40° (5)
    assert air.select_prototypes(feats, 3).tolist() == [0, 4, 2]  # norms differ on purpose: cosine ignores them
    assert air.select_prototypes(feats, 5).tolist() == [0, 4, 2, 1, 5]
    assert sorted(air.select_prototypes(feats, 10).tolist()) == list(range(6))  # M <= k: all


def test_select_prototypes_ties_are_stable():
    feats = np.array([[1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [1.0, -1.0]])  # mean (1, 0): all cosines equal
    assert air.select_prototypes(feats, 2).tolist() == [0, 1]
    feats = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.1]])
    # hand: centre = normalise(mean of normalised rows); ranking by cosine, lower index first on ties
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    c = f.mean(0) / np.linalg.norm(f.mean(0))
    sim = f @ c
    expect = sorted(range(4), key=lambda i: (-round(sim[i], 12), i))[:3]
    assert air.select_prototypes(feats, 3).tolist() == expect


def test_build_prototypes_filters_tricks_and_m():
    feats = np.arange(24, dtype=float).reshape(12, 2) + 1.0
    cls = np.array([0, 1] * 6)
    tricks = np.array(["base", "base", "multi_domain", "multi_domain"] * 3)
    protos = air.build_prototypes(feats, cls, 2, k=10, m=2, tricks=tricks, use_tricks=["base"])
    # class 0 base rows: 0, 4, 8 -> first m=2: 0, 4
    assert sorted(map(tuple, protos[0].tolist())) == sorted(map(tuple, feats[[0, 4]].tolist()))
    assert sorted(map(tuple, protos[1].tolist())) == sorted(map(tuple, feats[[1, 5]].tolist()))
    assert len(air.build_prototypes(feats, cls, 2, k=10, tricks=tricks, use_tricks=["all"])[0]) == 6
    with pytest.raises(ValueError, match="class 2 has no synthetic images"):
        air.build_prototypes(feats, cls, 3, k=2)


def test_aux_scores_mean_cosine():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 4))
    protos = [rng.normal(size=(3, 4)), rng.normal(size=(1, 4))]
    got = air.aux_scores(img, protos)
    assert got.shape == (5, 2)
    for n in range(5):
        for c, P in enumerate(protos):
            cos = [img[n] @ p / (np.linalg.norm(img[n]) * np.linalg.norm(p)) for p in P]
            assert got[n, c] == pytest.approx(sum(cos) / len(cos), abs=1e-12)


def test_normalize_aux_each_way():
    p_hat = np.array([[0.9, 0.7, 0.8], [0.5, 0.5, 0.5]])
    sm = air.normalize_aux(p_hat, "softmax", 100.0)
    e = np.exp(100 * np.array([0.9, 0.7, 0.8]))
    assert sm[0] == pytest.approx(e / e.sum(), rel=1e-12)
    assert sm[1] == pytest.approx([1 / 3] * 3)
    s = air.normalize_aux(p_hat, "sum")
    assert s[0] == pytest.approx([0.2 / 0.3, 0.0, 0.1 / 0.3])  # (p - min) / sum
    assert s[1] == pytest.approx([1 / 3] * 3)  # all equal -> uniform
    neg = air.normalize_aux(np.array([[-0.2, 0.3]]), "sum")
    assert neg[0] == pytest.approx([0.0, 1.0])
    assert np.array_equal(air.normalize_aux(p_hat, "none"), p_hat)
    with pytest.raises(ValueError, match="aux_normalize"):
        air.normalize_aux(p_hat, "max")


def test_fuse_and_renormalise():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = np.array([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    star, dist = air.fuse(p, q, 0.5)
    assert star == pytest.approx(np.array([[0.65, 0.7, 0.15], [0.35, 0.35, 0.8]]))
    assert dist == pytest.approx(star / 1.5)
    assert dist.sum(1) == pytest.approx([1.0, 1.0])
    assert (star.argmax(1) == [1, 2]).all()  # the auxiliary classifier flips the first image
    assert air.fuse(p, q, 0.0)[1] == pytest.approx(p)
    out = air.fused_probs(p, np.eye(3)[:2], [np.eye(3)[[0]], np.eye(3)[[1]], np.eye(3)[[2]]], AirCfg())
    assert out["p_hat"] == pytest.approx(np.eye(3)[:2])
    assert out["p_fused"].sum(1) == pytest.approx([1, 1])


def test_select_confident_per_class_rule():
    p = np.array([
        [0.9, 0.05, 0.05],   # 0 -> class 0
        [0.6, 0.3, 0.1],     # 1 -> class 0
        [0.8, 0.1, 0.1],     # 2 -> class 0
        [0.8, 0.2, 0.0],     # 3 -> class 0 (ties with 2: the lower index first)
        [0.1, 0.7, 0.2],     # 4 -> class 1
        [0.3, 0.2, 0.5],     # 5 -> class 2
        [0.45, 0.45, 0.1],   # 6 -> argmax tie: class 0
    ])
    idx, lab = air.select_confident(p, 2)
    assert idx.tolist() == [0, 2, 4, 5] and lab.tolist() == [0, 0, 1, 2]
    idx, lab = air.select_confident(p, 10)  # shortage: everything that prefers the class, no padding
    assert idx.tolist() == [0, 2, 3, 1, 6, 4, 5] and lab.tolist() == [0, 0, 0, 0, 0, 1, 2]
    idx, lab = air.select_confident(np.array([[0.9, 0.1, 0.0]]), 3)  # classes nobody prefers: none
    assert idx.tolist() == [0] and lab.tolist() == [0] and idx.dtype == np.int64


# --- losses --------------------------------------------------------------------------------------------

def test_loss_r_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    hand = [-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))), -(0.5 - math.log(2 * math.exp(0.5) + math.exp(3)))]
    assert float(air.loss_r(logits, labels)) == pytest.approx(sum(hand) / 2, rel=1e-6)


def test_loss_s_is_kl_weak_to_strong_and_only_strong_gets_gradient():
    strong = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]], requires_grad=True)
    weak = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 1.0]], requires_grad=True)

    def sm(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    hand = 0.0
    for s, w in zip(strong.tolist(), weak.tolist()):
        ps, pw = sm(s), sm(w)
        hand += sum(a * math.log(a / b) for a, b in zip(pw, ps))
    loss = air.loss_s(strong, weak)
    assert float(loss.detach()) == pytest.approx(hand / 2, rel=1e-6)
    loss.backward()
    assert weak.grad is None and strong.grad is not None
    assert float(air.loss_s(weak.detach(), weak.detach())) == pytest.approx(0.0, abs=1e-7)


def test_lr_schedule():
    assert [air.lr_at(s, 10, 2, 1.0) for s in (0, 1)] == [0.5, 1.0]
    assert air.lr_at(2, 10, 2, 1.0) == pytest.approx(1.0)
    assert air.lr_at(6, 10, 2, 1.0) == pytest.approx(0.5)
    assert air.lr_at(0, 1, 5, 1.0) == pytest.approx(1.0)  # warm-up capped below the run length


# --- prompt learner vs open_clip ----------------------------------------------------------------------

def test_context_reproduces_encode_text(clip):
    model, _, tok = clip
    words = "a satellite photo of"
    ids = air._word_tokens(tok, words)
    assert len(ids) == 4
    with torch.no_grad():
        ctx = model.token_embedding(torch.tensor(ids))
        learner = air.PromptLearner(ctx)
        got = learner.text_features(model, learner.tokenize(tok, CLASSES))
        want = model.encode_text(tok([f"{words} {c}." for c in CLASSES]))
    assert got.shape == want.shape == (3, 32)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the same through ctx_init, and random context gives something else
    learner2 = air.PromptLearner.from_model(model, tok, 4, words)
    assert torch.allclose(learner2.ctx, ctx)
    rnd = air.PromptLearner.from_model(model, tok, 4, "", generator=torch.Generator().manual_seed(0))
    assert float(rnd.ctx.detach().std()) == pytest.approx(0.02, rel=0.3)
    with torch.no_grad():
        assert not torch.allclose(rnd.text_features(model, rnd.tokenize(tok, CLASSES)), want, atol=1e-3)
    with pytest.raises(ValueError, match="n_ctx=4"):
        air.PromptLearner.from_model(model, tok, 16, words)


def test_prompt_tokens_have_placeholders(clip):
    _, _, tok = clip
    t = air.tokenize_prompts(tok, ["sea_or_lake"], 16)
    x = air._word_tokens(tok, "X")[0]
    assert (t[0, 1:17] == x).all() and t[0, 0] == 49406
    assert air._word_tokens(tok, "sea or lake.") == t[0, 17:int(t[0].argmax())].tolist()
    with pytest.raises(ValueError, match="does not fit"):
        air.tokenize_prompts(tok, [" ".join(["forest"] * 70)], 16)


# --- training -----------------------------------------------------------------------------------------

def _toy(model, n_per=8, seed=0):
    """A separable toy problem for the tiny CLIP: class c's images are one flat colour (red, green, blue in
    normalised units) plus noise, whose tiny-CLIP features cluster per class; the pseudo-labels are the
    true classes. Returns weak features (n, D), labels (n,) and a strong-view function (more noise, drawn
    from torch's global RNG as torchvision augmentations are)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[2.0, -2, -2], [-2, 2, -2], [-2, -2, 2]])[:, :, None, None].expand(3, 3, 64, 64)
    pix = torch.cat([colours[c] + 0.3 * torch.randn(n_per, 3, 64, 64, generator=g) for c in range(3)])
    labels = torch.arange(3).repeat_interleave(n_per)
    with torch.no_grad():
        feats = model.encode_image(pix)

    def strong(positions):
        p = pix[positions]
        return p + 0.5 * torch.randn_like(p)

    return feats, labels, strong


def test_one_step_moves_only_the_context(clip):
    model, _, tok = clip
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    feats, labels, strong = _toy(model)
    cfg = AirCfg(n_ctx=4, epochs=1, batch_size=len(labels), lr=0.5, warmup_epochs=0, seed=1)
    init = air.PromptLearner.from_model(model, tok, 4, "", generator=torch.Generator().manual_seed(1)).ctx.detach()
    ctx, hist = air.train_prompts(model, tok, CLASSES, feats, strong, labels, cfg,
                                  progress=False)
    assert hist["steps"] == 1
    assert not torch.allclose(ctx, init)  # the context got a gradient and moved
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, p in model.named_parameters():
        assert p.grad is None, k
        assert p.requires_grad == flags[k], k  # frozen during the run, restored afterwards


def test_train_prompts_lowers_loss_and_is_deterministic(clip):
    model, _, tok = clip
    feats, labels, strong = _toy(model)
    cfg = AirCfg(n_ctx=4, epochs=12, batch_size=8, lr=0.002, warmup_epochs=1, beta=1.0, seed=3)
    ctx, hist = air.train_prompts(model, tok, CLASSES, feats, strong, labels, cfg,
                                  progress=False)
    assert len(hist["loss"]) == 12 and hist["steps"] == 36
    assert hist["loss"][-1] < 0.25 * hist["loss"][0], hist["loss"]
    assert hist["agreement"][-1] > hist["agreement"][0] + 0.2, hist["agreement"]
    probs = air.predict_with_context(model, tok, ctx, CLASSES, feats.numpy(), scale=cfg.logit_scale)
    assert probs.shape == (24, 3) and probs.sum(1) == pytest.approx(np.ones(24))
    assert (probs.argmax(1) == labels.numpy()).mean() >= hist["agreement"][-1] - 0.1
    rng_before = torch.get_rng_state()
    ctx2, hist2 = air.train_prompts(model, tok, CLASSES, feats.numpy(), strong, labels.numpy(), cfg,
                                    progress=False)  # numpy inputs too
    assert torch.equal(ctx, ctx2) and hist["loss"] == hist2["loss"]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is forked, not consumed
    ctx3, _ = air.train_prompts(model, tok, CLASSES, feats, strong, labels, AirCfg(**{**cfg.__dict__, "seed": 4}),
                                progress=False)
    assert not torch.equal(ctx, ctx3)


def test_train_prompts_input_errors(clip):
    model, _, tok = clip
    feats, labels, _ = _toy(model)
    with pytest.raises(ValueError, match="strong_batch"):
        air.train_prompts(model, tok, CLASSES, feats, None, labels, AirCfg(n_ctx=4), progress=False)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        air.train_prompts(model, tok, CLASSES, feats, None, labels + 1, AirCfg(n_ctx=4, beta=0.0), progress=False)
    with pytest.raises(ValueError, match="weak_features must be"):
        air.train_prompts(model, tok, CLASSES, feats[:3], None, labels, AirCfg(n_ctx=4, beta=0.0), progress=False)


def test_predict_with_context_formula(clip):
    model, _, tok = clip
    words = "a photo of a"
    ctx = model.token_embedding(torch.tensor(air._word_tokens(tok, words))).detach()
    feats = np.random.default_rng(0).normal(size=(5, 32))
    with torch.no_grad():
        T = model.encode_text(tok([f"{words} {c}." for c in CLASSES])).numpy().astype(np.float64)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    z = 100 * f @ T.T
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    assert air.predict_with_context(model, tok, ctx, CLASSES, feats) == pytest.approx(want, abs=1e-4)


def test_strong_transform_from_preprocess(clip):
    from PIL import Image

    _, preprocess, _ = clip
    t = air.strong_transform(preprocess)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100), dtype=np.uint8))  # mode L
    torch.manual_seed(0)
    a = t(im)
    b = t(im)
    assert a.shape == preprocess(im).shape == (3, 64, 64)
    assert not torch.equal(a, b)  # random
    names = [type(s).__name__ for s in t.transforms]
    assert "RandomResizedCrop" in names and names[-1] == "Normalize"
    assert list(t.transforms[-1].mean) == list(preprocess.transforms[-1].mean)
    import pickle

    pickle.dumps(t)  # DataLoader workers need to pickle it


def test_context_file_round_trip(tmp_path):
    ctx = torch.randn(16, 32)
    path = tmp_path / "air" / "context.safetensors"
    air.save_context(path, ctx, {"class_names": CLASSES, "ctx_init": "", "seed": 3})
    got, meta = air.load_context(path)
    assert torch.equal(got, ctx)
    assert meta["class_names"] == CLASSES and meta["n_ctx"] == 16 and meta["width"] == 32
    assert meta["ctx_init"] == "" and meta["seed"] == 3
    assert list(tmp_path.joinpath("air").iterdir()) == [path]  # no temporary file left


# ----------------------------------------------------------------------------------------------------
# the registered stage, on the tiny job
# ----------------------------------------------------------------------------------------------------

def test_air_stage_writes_its_columns_recomputable_from_the_prototype_table(make_job):
    from distillery.models import load_clip
    from distillery.rundir import RunPaths, read_table
    from distillery.teacher import run_teacher
    from distillery.teacher.features import clip_feature_store

    job = make_job({"teacher.synth.images_per_class": 3, "teacher.air.k": 2, "teacher.air.epochs": 2,
                    "teacher.vermouth.enabled": False, "teacher.transduct.enabled": False, "teacher.prior.mode": "none",
                    "teacher.air.aux_scale": 100.0, "teacher.ensemble.weighting": "agreement"})
    run_teacher(job, progress=False)
    paths = RunPaths(job.run_path)
    pl = read_table(paths.pseudo_labels)
    assert {"p_clip", "p_air_aux", "p_air_fused", "p_air_prompt"} <= set(pl[0])
    protos = read_table(paths.teacher_dir("air") / "prototypes.parquet")
    assert [sum(r["class_index"] == c for r in protos) for c in range(3)] == [2, 2, 2]
    # the prototypes come from the full-size originals (64 px) that synthesis kept, not the 32 px copies
    from PIL import Image

    assert all("synthetic_full" in r["path"] and Image.open(r["path"]).size == (64, 64) for r in protos)
    assert all(Image.open(r["synthetic_path"]).size == (32, 32) for r in protos)
    assert (paths.teacher_dir("air") / "context.safetensors").is_file()
    # independent recomputation of p̂ -> softmax(100 p̂) -> (p + p̂')/2 from the stored features
    _, preprocess, _ = load_clip(job.models.clip)
    store = clip_feature_store(job, preprocess)
    nrm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    f = nrm(store.get([r["sha256"] for r in pl]))
    centres = np.stack([nrm(store.get([r["sha256"] for r in protos if r["class_index"] == c])).mean(0)
                        for c in range(3)])
    z = 100 * f @ centres.T
    aux = np.exp(z - z.max(1, keepdims=True))
    aux /= aux.sum(1, keepdims=True)
    clip = np.asarray([r["p_clip"] for r in pl])
    assert np.allclose([r["p_air_aux"] for r in pl], aux, atol=1e-4)
    assert np.allclose([r["p_air_fused"] for r in pl], (clip + aux) / 2, atol=1e-4)
    # the default ensemble takes the prompt-learned column (the paper's final classifier)
    assert np.allclose([r["soft_target"] for r in pl], [r["p_air_prompt"] for r in pl], atol=1e-6)


def test_air_without_synthetic_images_of_a_class_names_it(make_job):
    from distillery.rundir import RunPaths, read_table, write_table
    from distillery.teacher import run_teacher

    job = make_job({"teacher.synth.images_per_class": 1, "teacher.air.enabled": False})
    run_teacher(job, progress=False)
    paths = RunPaths(job.run_path)
    rows = [r for r in read_table(paths.synthetic) if r["class_index"] != 1]
    write_table(paths.synthetic, rows)
    job = make_job({"teacher.synth.images_per_class": 1, "teacher.synth.source": "table"})
    with pytest.raises(ValueError, match="class 'forest' has no synthetic images"):
        run_teacher(job, progress=False)
