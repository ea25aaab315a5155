"""LaTTe-CLIP's own pieces (SPEC §4): descriptions, the prototype formulas recomputed by hand, the two
bug pins of the public implementation, exact resume, the group canvas and the description cache."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillery.teacher import describe as D
from distillery.teacher import latte as L

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "eurosat-sample" / "unlabeled"
CLASSES = ["annual crop land", "forest", "river"]


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _unit(a):
    n = math.sqrt(sum(x * x for x in a))
    return [x / n for x in a]


# ----------------------------------------------------------------------------------------------
# Formulas, by hand


def test_mixer_weights_and_mix_by_hand():
    g = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]],
                      [[0.5, 0.5, 0.5], [3.0, 0.0, 1.0], [0.0, 0.0, -1.0]]])  # (B=2, T=3, D=3)
    P = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # (C=3, D)
    w = L.mixer_weights(g, P)
    assert not w.requires_grad
    for b in range(2):
        for t in range(3):
            sims = sorted((_cos(g[b, t].tolist(), P[c].tolist()) for c in range(3)), reverse=True)
            assert w[b, t].item() == pytest.approx(sims[0] - sims[1] + 1e-6, abs=1e-6)
    # a text equally close to two prototypes gets (almost) no weight
    assert w[0, 1].item() == pytest.approx(1e-6, abs=1e-7)
    mix = L.mix_texts(g, w)
    for b in range(2):
        num = [sum(w[b, t].item() * _unit(g[b, t].tolist())[d] for t in range(3)) for d in range(3)]
        den = sum(w[b, t].item() for t in range(3))
        assert mix[b].tolist() == pytest.approx([x / den for x in num], abs=1e-6)
    # gradient flows through the normalised features, not through the weights
    g2 = g.clone().requires_grad_(True)
    L.mix_texts(g2, L.mixer_weights(g2, P)).sum().backward()
    assert g2.grad is not None and g2.grad.abs().sum() > 0


def test_mixer_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 prototypes"):
        L.mixer_weights(torch.ones(1, 3, 4), torch.ones(1, 4))


def test_prototype_text_by_hand():
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mix = torch.tensor([[0.2, 0.4], [-1.0, 3.0]])
    labels = torch.tensor([2, 0])
    t = L.prototype_text(P, labels, mix, alpha=0.9)
    assert t[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 0.2, 0.9 * 1 + 0.1 * 0.4])
    assert t[1].tolist() == pytest.approx([0.9 * 1 + 0.1 * -1.0, 0.9 * 0 + 0.1 * 3.0])


def test_contrastive_loss_against_a_hand_loop():
    torch.manual_seed(0)
    f, t = torch.randn(5, 4), torch.randn(5, 4)
    f[3] = f[1]  # duplicates keep their own targets (arange)
    s = 7.5
    fl = [_unit(r) for r in f.tolist()]
    tl = [_unit(r) for r in t.tolist()]
    S = [[s * sum(a * b for a, b in zip(fi, tj)) for tj in tl] for fi in fl]
    n = len(S)
    i2t = -sum(S[i][i] - math.log(sum(math.exp(S[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = -sum(S[i][i] - math.log(sum(math.exp(S[j][i]) for j in range(n))) for i in range(n)) / n
    assert L.contrastive_loss(f, t, s).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_momentum_update_moves_by_exactly_the_formula():
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [2.0, 2.0]])
    tbar = torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    labels = torch.tensor([0, 0, 2])  # class 0 twice, class 2 once, classes 1 and 3 absent
    new = L.momentum_update(P, tbar, labels, mu=0.9)
    mean0 = [(0.0 + 1.0) / 2, (1.0 + 1.0) / 2]
    assert new[0].tolist() == pytest.approx([0.9 * 1.0 + 0.1 * mean0[0], 0.9 * 0.0 + 0.1 * mean0[1]])
    assert new[2].tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 3.0, 0.9 * 0.5 + 0.1 * -1.0])
    assert torch.equal(new[1], P[1]) and torch.equal(new[3], P[3])  # absent: bit-identical
    assert P[0].tolist() == [1.0, 0.0]  # pure: the input is untouched
    # mu = 0 (the paper's "w/o momentum" ablation) replaces the prototype by the batch mean
    assert L.momentum_update(P, tbar, labels, mu=0.0)[0].tolist() == pytest.approx(mean0)
    assert not L.momentum_update(P, tbar.requires_grad_(True), labels).requires_grad


def test_dual_labels():
    P = torch.tensor([[1.0, 0.0], [0.0, 10.0]])  # P is normalised: the big norm of P_1 must not matter
    f = torch.tensor([[2.0, 1.0], [0.1, 0.2], [-1.0, -3.0]])
    zs = torch.tensor([1, 1, 0])
    c_ft, c_zs = L.dual_labels(f, P, zs)
    assert c_ft.tolist() == [0, 1, 0]
    assert c_zs.tolist() == [1, 1, 0]


def test_cosine_schedule():
    fn = L.cosine_lambda(2, 6)
    assert [round(fn(s), 6) for s in range(7)] == [0.5, 1.0, 1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6),
                                                     0.5, round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6), 0.0]


def test_cfg_check_names_the_key_value_and_fix():
    assert L.LatteCfg().check() is not None
    with pytest.raises(ValueError, match=r"teacher\.latte\.alpha: 1\.5 .*0 to 1"):
        L.LatteCfg(alpha=1.5).check()
    with pytest.raises(ValueError, match=r"x\.y\.mixer: 'median' .*dynamic"):
        L.LatteCfg(mixer="median").check("x.y")
    with pytest.raises(ValueError, match=r"teacher\.latte\.batch_size: 1 "):
        L.LatteCfg(batch_size=1).check()
    with pytest.raises(ValueError, match=r"teacher\.latte\.crop_scale"):
        L.LatteCfg(crop_scale=[1.0, 0.5]).check()


# ----------------------------------------------------------------------------------------------
# With the tiny CLIP


@pytest.fixture(scope="module")
def clip(tiny_models):
    from distillery.models import load_clip

    return load_clip(str(tiny_models["clip"]))


def _fresh(clip):
    model, preprocess, tok = clip
    return copy.deepcopy(model), preprocess, tok


class _Fixed(torch.utils.data.Dataset):
    """Already-'augmented' fixed pixels: the formulas can be recomputed outside the loop."""

    def __init__(self, x, zs, image_texts, group_texts):
        self.x, self.zs, self.it, self.gt = x, zs, image_texts, group_texts

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        c = self.zs[i]
        return self.x[i], c, L.LatteCfg().class_template.format(c=CLASSES[c]), self.it[i], self.gt[i]


def _class_texts():
    return [L.LatteCfg().class_template.format(c=c) for c in CLASSES]


def _init_prototypes(model, tok):
    with torch.no_grad():
        return model.encode_text(tok(_class_texts())).float()


def _fixed_data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    zs = [i % 3 for i in range(n)]
    return _Fixed(x, zs, [f"tile {i} with fields and roads" for i in range(n)],
                  [f"green and brown patches {i % 2}" for i in range(n)])


def test_param_groups(clip):
    model = clip[0]
    no_decay, decay = L.param_groups(model, 0.2)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.logit_scale) in ids and id(model.ln_final.weight) in ids and id(model.ln_final.bias) in ids
    assert id(model.text_projection) not in ids and id(model.token_embedding.weight) not in ids
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def test_zero_shot_labels_stay_the_precomputed_ones(clip):
    """Bug pin (a): c_zs comes from the dataset (frozen zero-shot model), never from the model in training,
    even after its weights change; c_ft does follow the current model."""
    model, _, tok = _fresh(clip)
    data = _fixed_data(6)
    P = L._norm(_init_prototypes(model, tok))
    x = torch.stack([data[i][0] for i in range(6)])
    with torch.no_grad():  # move the model far from its zero-shot self
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p))
        own = (model.encode_image(x) @ P.T).argmax(1)
    given = (own + 1) % 3  # precomputed labels that disagree with what the changed model predicts
    cls = _class_texts()
    batch = (x, given, [cls[c] for c in given.tolist()], data.it, data.gt)
    _, aux = L.latte_step(model, tok, batch, P, L.LatteCfg(), cls)
    assert torch.equal(aux["c_zs"], given)
    assert torch.equal(aux["c_ft"], own)
    # and through finetune: the zs branch's update uses the dataset labels after training changed the model
    cfg = L.LatteCfg(epochs=2, batch_size=6, lr=1e-2, warmup_steps=1)
    model2, P2, hist = L.finetune(copy.deepcopy(model), tok, data, _init_prototypes(model, tok), cfg,
                                  progress=False, class_texts=_class_texts())
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=6)))
    _, aux2 = L.latte_step(model2, tok, batch, P2, cfg, cls)
    assert torch.equal(aux2["c_zs"], torch.tensor(data.zs))


def test_a_training_step_moves_the_prototypes_by_the_momentum_formula(clip):
    """Bug pin (b): after one step the prototypes equal the paper's update of the initial ones, computed
    here by hand from the pre-step model (t̄ from both branches, zs then ft), and the model changed."""
    model, _, tok = _fresh(clip)
    data = _fixed_data(6)
    cfg = L.LatteCfg(epochs=1, batch_size=6, lr=1e-3, warmup_steps=1, mu=0.9, alpha=0.8)
    init = _init_prototypes(model, tok)
    P0 = L._norm(init)
    ref = copy.deepcopy(model)
    x = torch.stack([data[i][0] for i in range(6)])
    zs = torch.tensor(data.zs)
    with torch.no_grad():
        f = ref.encode_image(x).float()
        c_ft = (f @ P0.T).argmax(1)
        cls = _class_texts()

        def tbar(labels):
            texts = [[cls[c], data.it[i], data.gt[i]] for i, c in enumerate(labels.tolist())]
            g = torch.stack([ref.encode_text(tok(t)).float() for t in texts])  # (B, 3, D), one sample at a time
            gn = g / g.norm(dim=-1, keepdim=True)
            cos = gn @ P0.T
            top = cos.sort(dim=-1, descending=True).values
            w = top[..., 0] - top[..., 1] + 1e-6
            mix = (w.unsqueeze(-1) * gn).sum(1) / w.sum(1, keepdim=True)
            return cfg.alpha * P0[labels] + (1 - cfg.alpha) * mix

        expected = P0.clone()
        for t, labels in ((tbar(zs), zs), (tbar(c_ft), c_ft)):
            for c in range(3):
                m = labels == c
                if m.any():
                    expected[c] = cfg.mu * expected[c] + (1 - cfg.mu) * t[m].mean(0)
    trained, P1, hist = L.finetune(model, tok, data, init, cfg, progress=False, class_texts=cls)
    assert hist[0]["steps"] == 1
    assert not torch.allclose(P1, P0, atol=1e-4)  # the prototypes did move ...
    assert torch.allclose(P1, expected, atol=1e-5)  # ... by exactly the momentum formula
    changed = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), ref.parameters()))
    assert changed  # both encoders were trained
    assert not torch.equal(trained.visual.conv1.weight, ref.visual.conv1.weight)
    assert not torch.equal(trained.token_embedding.weight, ref.token_embedding.weight)


def test_predict_is_nearest_prototype(clip):
    model, preprocess, tok = _fresh(clip)
    P = _init_prototypes(model, tok)
    x = torch.randn(5, 3, 64, 64)
    p_pix = L.predict(model, x, P)
    with torch.no_grad():
        f = model.encode_image(x)
    p_feat = L.predict(None, f, P)
    assert p_pix.shape == (5, 3) and torch.allclose(p_pix, p_feat, atol=1e-6)
    assert torch.allclose(p_feat.sum(1), torch.ones(5))
    fn, pn = f / f.norm(dim=1, keepdim=True), P / P.norm(dim=1, keepdim=True)
    assert torch.allclose(p_feat, (100 * fn @ pn.T).softmax(1), atol=1e-6)
    assert torch.allclose(L.predict(model, [x[:2], x[2:]], P), p_pix, atol=1e-6)


def test_train_transform(clip):
    _, preprocess, _ = clip
    tf = L.train_transform(preprocess, L.LatteCfg())
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["Lambda", "RandomResizedCrop", "RandomApply", "RandomGrayscale", "ToTensor", "Normalize"]
    rrc = tf.transforms[1]
    assert rrc.size == (64, 64) and rrc.scale == (0.9, 1.0) and rrc.interpolation.value == "bicubic"
    assert tf.transforms[2].p == 0.8 and tf.transforms[3].p == 0.2
    cj = tf.transforms[2].transforms[0]
    assert cj.brightness == (0.5, 1.5) and cj.hue == (-0.1, 0.1)
    with Image.open(sorted(SAMPLE.glob("*.jpg"))[0]) as im:
        assert tf(im).shape == (3, 64, 64)


class _KillAfter(torch.utils.data.Dataset):
    """Raises (like a kill) after ``n`` items have been read."""

    def __init__(self, base, n):
        self.base, self.n, self.read = base, n, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if self.read >= self.n:
            raise KeyboardInterrupt("killed")
        self.read += 1
        return self.base[i]


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(clip, tmp_path):
    model, preprocess, tok = _fresh(clip)
    paths = sorted(SAMPLE.glob("*.jpg"))[:7]
    zs = [0, 1, 2, 0, 1, 2, 0]
    cls = _class_texts()
    cfg = L.LatteCfg(epochs=2, batch_size=3, lr=1e-3, warmup_steps=1, seed=3)
    ds = L.LatteDataset(paths, zs, cls, [f"image {i}" for i in range(7)], [f"group {i % 3}" for i in range(7)],
                        L.train_transform(preprocess, cfg))
    init = _init_prototypes(model, tok)

    m_straight, P_straight, h_straight = L.finetune(copy.deepcopy(model), tok, ds, init, cfg,
                                                    checkpoint_dir=tmp_path / "a", progress=False, class_texts=cls)
    assert [h["epoch"] for h in h_straight] == [1, 2] and h_straight[0]["steps"] == 2  # 7 = 3 + 3 + 1: the last batch of 1 is dropped

    torch.manual_seed(123)  # the caller's RNG must not matter
    with pytest.raises(KeyboardInterrupt):  # killed during epoch 2 (epoch 1 reads 6 items)
        L.finetune(copy.deepcopy(model), tok, _KillAfter(ds, 8), init, cfg, checkpoint_dir=tmp_path / "b",
                   progress=False, class_texts=cls)
    ck = torch.load(tmp_path / "b" / "latte.pt", weights_only=True)
    assert ck["epoch"] == 1
    m_resumed, P_resumed, h_resumed = L.finetune(copy.deepcopy(model), tok, ds, init, cfg,
                                                 checkpoint_dir=tmp_path / "b", progress=False, class_texts=cls)
    assert torch.equal(P_resumed, P_straight)
    for (n, a), b in zip(m_straight.state_dict().items(), m_resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in h_resumed] == [h["loss"] for h in h_straight]
    # a finished run returns at once, unchanged
    _, P_again, _ = L.finetune(copy.deepcopy(model), tok, ds, init, cfg, checkpoint_dir=tmp_path / "b",
                               progress=False, class_texts=cls)
    assert torch.equal(P_again, P_straight)


def test_finetune_ablation_switches_run(clip):
    model, _, tok = _fresh(clip)
    cfg = L.LatteCfg(epochs=1, batch_size=3, lr=1e-4, warmup_steps=0, mixer="mean", use_image_descriptions=False,
                     use_group_descriptions=False)
    init = _init_prototypes(model, tok)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    _, P, hist = L.finetune(model, tok, _fixed_data(6), init, cfg, progress=False, class_texts=_class_texts())
    assert P.shape == (3, 32) and hist[0]["steps"] == 2 and math.isfinite(hist[0]["loss"])
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is left as it was


def test_group_members():
    zs = [0, 1, 0, 0, 2, 1, 0]
    groups = L.group_members(zs, 4, seed=1)
    assert groups == L.group_members(zs, 4, seed=1)
    for i, g in enumerate(groups):
        assert len(g) == 4 and g[0] == i and all(zs[j] == zs[i] for j in g)
    assert len(set(groups[0][1:])) == 3 and 0 not in groups[0][1:]  # enough others: distinct, not itself
    assert groups[4] == [4, 4, 4, 4]  # alone in its class


def test_finetune_rejects_mismatched_class_text(clip):
    model, _, tok = _fresh(clip)
    data = _fixed_data(4)
    with pytest.raises(ValueError, match=r"class_texts\[\d\] \(its zero-shot label\)"):
        L.finetune(model, tok, data, _init_prototypes(model, tok), L.LatteCfg(epochs=1, batch_size=4),
                   progress=False, class_texts=["x {c}", "y", "z"])


# ----------------------------------------------------------------------------------------------
# Descriptions


def test_prompts():
    assert D.image_prompt("satellite photo") == \
        "Describe the land use in the satellite image concisely, less than 20 words."
    assert D.image_prompt("flower") == "Describe the flower in the photo concisely, less than 20 words."
    assert D.group_prompt("flower") == \
        "Describe the common visual attributes of the flower in all the photos concisely, in fewer than 20 words."


def test_group_canvas_geometry():
    assert D.canvas_layout(4) == (2, 2, 326, [(0, 0), (346, 0), (0, 346), (346, 346)])
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    ims = [Image.new("RGB", (64, 64), colours[0]), Image.new("RGB", (200, 100), colours[1]),
           Image.new("RGB", (30, 90), colours[2]), Image.new("RGB", (1000, 1000), colours[3])]
    canvas = D.group_canvas(ims)
    assert canvas.size == (672, 672) and canvas.mode == "RGB"

    def bbox(colour):
        mask = Image.eval(canvas.convert("RGB"), lambda v: v)  # copy
        px = mask.load()
        xs, ys = [], []
        for y in range(672):
            for x in range(672):
                if px[x, y] == colour:
                    xs.append(x)
                    ys.append(y)
        return min(xs), min(ys), max(xs) + 1, max(ys) + 1

    assert bbox(colours[0]) == (0, 0, 326, 326)  # a square fills its cell
    assert bbox(colours[3]) == (346, 346, 672, 672)  # also when it is downscaled
    x0, y0, x1, y1 = bbox(colours[1])  # 2:1 -> 326 x 163, centred vertically in the top-right cell
    assert (x0, x1) == (346, 672) and (y1 - y0) == 163 and y0 == (326 - 163) // 2
    x0, y0, x1, y1 = bbox(colours[2])  # 1:3 -> 109 x 326 (326/3 = 108.7 rounds to 109), centred horizontally
    assert (y0, y1) == (346, 672) and (x1 - x0) == 109 and x0 == (326 - 109) // 2
    # the gaps and the rest stay background
    assert canvas.getpixel((336, 10)) == (255, 255, 255) and canvas.getpixel((10, 336)) == (255, 255, 255)


def test_clean_description_statuses(clip):
    tok = clip[2]
    fb = "a photo of a forest."
    assert D.clean_description("  Green fields\n and a road. ", fb, 77, tok) == ("Green fields and a road.", "ok")
    assert D.clean_description("", fb, 77, tok) == (fb, "fallback")
    assert D.clean_description("   \n", fb, 77, tok) == (fb, "fallback")
    assert D.clean_description("12 .. ?! 3", fb, 77, tok) == (fb, "fallback")
    long = " ".join(["river"] * 100)
    text, status = D.clean_description(long, fb, 77, tok)
    assert status == "truncated" and text == " ".join(["river"] * 75)  # 75 + SOT + EOT = 77
    assert D.count_clip_tokens(tok, text) == 77
    assert D.clean_description(" ".join(["river"] * 75), fb, 77, tok)[1] == "ok"


@pytest.fixture(scope="module")
def captioner(tiny_models):
    from distillery.models import load_captioner

    return load_captioner(str(tiny_models["captioner"]))


def _images(n):
    out = []
    for p in sorted(SAMPLE.glob("*.jpg"))[:n]:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def test_describe_tiny_blip_returns_one_string_per_image(captioner):
    model, processor = captioner
    assert D.effective_prompt(processor, "Describe it.") == D.UNCONDITIONAL  # BLIP: no chat template
    ims = _images(5)
    texts = D.describe(model, processor, ims, D.image_prompt("satellite photo"), max_new_tokens=8, batch_size=2,
                       progress=False)
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    canvas = D.group_canvas(ims[:4])
    assert len(D.describe(model, processor, [canvas], D.group_prompt("satellite photo"), max_new_tokens=8,
                          progress=False)) == 1


def test_description_cache_second_run_generates_nothing(captioner, tmp_path):
    model, processor = captioner
    calls = {"n": 0}
    generate = model.generate

    def counting(*a, **k):
        calls["n"] += 1
        return generate(*a, **k)

    model.generate = counting
    try:
        ims = _images(5)
        items = [((f"sha{i}",), ims[i]) for i in range(4)] + [(("sha0", "sha1", "sha2", "sha3"), D.group_canvas(ims[:4]))]
        cache = D.DescriptionCache(tmp_path / "desc")
        texts, new = D.describe_cached(model, processor, cache, "tiny-blip", "Describe.", items,
                                       max_new_tokens=6, batch_size=2, chunk_size=3, progress=False)
        assert new == 5 and calls["n"] > 0 and len(texts) == 5
        assert len(list((tmp_path / "desc").glob("part-*.parquet"))) == 2  # chunks of 3 + 2
        (tmp_path / "desc" / ".part-000002.parquet.x.tmp.parquet").write_bytes(b"torn")  # a killed write
        calls["n"] = 0
        loaded = []
        again = D.DescriptionCache(tmp_path / "desc")  # a rerun: a new process reads the parts
        lazy = [(h, (lambda im=im: loaded.append(1) or im)) for h, im in items]
        texts2, new2 = D.describe_cached(model, processor, again, "tiny-blip", "Describe.", lazy,
                                         max_new_tokens=6, progress=False)
        assert (new2, calls["n"], loaded) == (0, 0, []) and texts2 == texts
        # another captioner or image set is another key
        assert again.get_many([("other", D.UNCONDITIONAL, ("sha0",)), ("tiny-blip", D.UNCONDITIONAL, ("sha0",))]) == \
            [None, texts[0]]
        again.compact()
        assert len(list((tmp_path / "desc").glob("part-*.parquet"))) == 1
        assert D.DescriptionCache(tmp_path / "desc").get_many([("tiny-blip", D.UNCONDITIONAL, ("sha1",))]) == [texts[1]]
    finally:
        del model.generate


def test_describe_with_a_chat_template_decodes_only_the_answer(tiny_models):
    """The LLaVA path, on a tiny random LlavaForConditionalGeneration built here (the tiny BLIP's tokenizer
    plus an <image> token, a minimal chat template): one user turn with image + prompt, left padding,
    only the new tokens decoded."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = AutoTokenizer.from_pretrained(str(tiny_models["captioner"]))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, chat_template=template, patch_size=16,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=16),
        text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                                eos_token_id=tok.sep_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    prompt = "Describe the land use in the satellite image concisely, less than 20 words."
    assert D.effective_prompt(processor, prompt) == prompt
    side = tok.padding_side
    texts = D.describe(model, processor, _images(3), prompt, max_new_tokens=5, batch_size=2, progress=False)
    assert len(texts) == 3 and tok.padding_side == side
    for t in texts:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) <= 5
        assert "describe" not in t and "assistant" not in t.lower()


def test_latte_stage_writes_its_column_and_reuses_descriptions(make_job):
    from distillery.rundir import RunPaths, read_json, read_table
    from distillery.teacher import run_teacher
    from distillery.teacher.latte import predict

    over = {"teacher.latte.enabled": True, "teacher.latte.epochs": 1, "teacher.latte.batch_size": 8,
            "teacher.prior.mode": "none", "teacher.latte.predict_scale": 100.0,
            "teacher.latte.max_new_tokens": 4, "teacher.latte.group_size": 2, "teacher.air.enabled": False,
            "teacher.synth.images_per_class": 1}
    job = make_job(over)
    run_teacher(job, progress=False)
    paths = RunPaths(job.run_path)
    pl = read_table(paths.pseudo_labels)
    assert "p_latte" in pl[0] and len(pl) == 20
    d = read_table(paths.teacher_dir("latte") / "descriptions.parquet")
    zs = np.asarray([r["p_clip"] for r in pl]).argmax(1)
    assert [r["zero_shot_label"] for r in d] == zs.tolist()  # c_zs = the frozen zero-shot CLIP's argmax
    assert all(isinstance(r["image_text"], str) and r["image_text"] for r in d)
    stamp = read_json(paths.teacher / ".teacher-latte.stamp.json")
    assert stamp["descriptions"]["generated"] == 40  # 20 image + 20 group descriptions
    # nearest prototype recomputed from the saved weights and prototypes
    from safetensors.torch import load_file

    from distillery.models import load_clip

    model, preprocess, _ = load_clip(job.models.clip)
    model.load_state_dict(load_file(paths.teacher_dir("latte") / "model.safetensors"))
    P = load_file(paths.teacher_dir("latte") / "prototypes.safetensors")["prototypes"]
    from distillery.images import load_rgb

    x = torch.stack([preprocess(load_rgb(r["path"])) for r in pl[:4]])
    with torch.no_grad():
        ref = predict(model, x, P).numpy()
    assert np.allclose([r["p_latte"] for r in pl[:4]], ref, atol=1e-5)
    # another fine-tuning setting reruns the teacher but generates no description again
    job2 = make_job({**over, "teacher.latte.mu": 0.5})
    run_teacher(job2, progress=False)
    assert read_json(paths.teacher / ".teacher-latte.stamp.json")["descriptions"]["generated"] == 0


def test_generation_is_capped_by_the_captioners_positions(tiny_models):
    """The tiny BLIP has 64 text positions: 77 new tokens (the paper's limit) must not index past them."""
    from PIL import Image

    from distillery.models import load_captioner
    from distillery.teacher.describe import describe, generation_limit

    model, processor = load_captioner(str(tiny_models["captioner"]))
    assert generation_limit(model, {}, 77) == 63 and generation_limit(model, {}, 10) == 10
    out = describe(model, processor, [Image.new("RGB", (64, 64), (90, 120, 60))], "x", max_new_tokens=77,
                   progress=False)
    assert len(out) == 1 and isinstance(out[0], str)
