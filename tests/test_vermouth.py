"""Vermouth (SPEC §5): feature levels from the UNet config, the U-head, the adapter, the cosine classifier,
the label-free conditioning and the stage on the tiny job (column written, features cached)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from distillery.teacher.vermouth import Level, VermouthSettings, feature_shapes, match_levels, stored_side

SD15_LEVELS = [Level(32, ("up2", "up3"), (640, 320)), Level(16, ("up1",), (1280,)), Level(8, ("up0",), (1280,)),
               Level(4, ("mid",), (1280,))]
TINY_LEVELS = [Level(8, ("up0", "up1"), (64, 32)), Level(4, ("mid",), (64,))]


def test_defaults_pass_check():
    VermouthSettings().check("teacher.vermouth")
    assert VermouthSettings().enabled and not VermouthSettings().train_unet_norms


@pytest.mark.parametrize("field,value,words", [
    ("resolution", 100, "multiple of 8"), ("timestep", 1000, "[0, 1000)"),
    ("prompt", "a {c} seen from above", "label-free"),
    ("prompt", "a {domain", "placeholder"), ("temperature", 0.0, "> 0"), ("max_side", -1, ">= 0"),
    ("expert_layers", [], "stage indices"), ("templates", ["a {x}"], "placeholders"), ("epochs", 0, ">= 1"),
])
def test_check_names_key_value_and_fix(field, value, words):
    cfg = dataclasses.replace(VermouthSettings(), **{field: value})
    with pytest.raises(ValueError) as e:
        cfg.check("teacher.vermouth")
    msg = str(e.value)
    shown = repr(value[0]) if field == "templates" else repr(value)  # a template is named on its own
    assert msg.startswith(f"teacher.vermouth.{field}: ") and shown in msg and words in msg


# --- feature levels ------------------------------------------------------------------------------------------


def test_feature_shapes_sd15_config_and_a_meta_device_pass():
    import torch
    from diffusers import UNet2DConditionModel

    from distillery.teacher.lora import SD15_UNET_CONFIG

    levels = feature_shapes(SD15_UNET_CONFIG, 256)
    assert levels == SD15_LEVELS  # SPEC §5: mid 1280, up0 1280, up1 1280, up2 640 ⊕ up3 320 at 4/8/16/32 px
    assert [lv.channels for lv in levels] == [960, 1280, 1280, 1280]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    seen = {}
    blocks = {"mid": unet.mid_block, **{f"up{i}": b for i, b in enumerate(unet.up_blocks)}}
    for name, block in blocks.items():
        block.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        unet(torch.zeros(1, 4, 32, 32, device="meta"), torch.tensor([200], device="meta"),
             encoder_hidden_states=torch.zeros(1, 77, 768, device="meta"))
    for lv in levels:
        for name, width in zip(lv.blocks, lv.widths):
            assert seen[name] == (width, lv.side, lv.side)
    assert feature_shapes(SD15_UNET_CONFIG, 512)[0].side == 64
    with pytest.raises(ValueError, match="teacher.vermouth.resolution"):
        feature_shapes(SD15_UNET_CONFIG, 200)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_models):
    from distillery.teacher.vermouth import load_pipe

    return load_pipe(str(tiny_models["diffusion"]), None, "cpu")


def test_feature_shapes_tiny_unet_match_a_real_pass(tiny_pipe):
    import torch

    from distillery.teacher.vermouth import DiffusionFeaturizer

    levels = feature_shapes(tiny_pipe.unet.config, 64, tiny_pipe.vae_scale_factor)
    assert levels == TINY_LEVELS
    feat = DiffusionFeaturizer(tiny_pipe, levels, "a satellite photo", 200, 0, 64, max_side=0)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        maps = feat(x)
        alone = feat(x[1:2])
    assert [tuple(m.shape) for m in maps] == [(3, 96, 8, 8), (3, 64, 4, 4)]
    # the same noise for every image: a feature does not depend on the batch it was computed in
    assert all(torch.allclose(m[1:2], a, atol=1e-5) for m, a in zip(maps, alone))
    feat.remove()
    pooled = DiffusionFeaturizer(tiny_pipe, levels, "a satellite photo", 200, 0, 64, max_side=4)
    with torch.no_grad():
        assert [tuple(m.shape) for m in pooled(x)] == [(3, 96, 4, 4), (3, 64, 4, 4)]
    pooled.remove()
    assert stored_side(32, 16) == 16 and stored_side(32, 0) == 32


def test_expert_layers_join_the_level_of_matching_side():
    assert match_levels([32, 16, 8], [32, 16, 8, 4]) == [0, 1, 2]  # ResNet-18 at 256 px on SD 1.5
    assert match_levels([8, 4, 2], [8, 4]) == [0, 1, 1]  # the tiny expert at 64 px on the tiny UNet


# --- U-head, adapter, classifier ----------------------------------------------------------------------------


def test_adapter_is_c_to_c_over_4_to_c_and_starts_as_identity():
    import torch

    from distillery.teacher.vermouth import build_adapter

    a = build_adapter(64, 4)
    assert tuple(a.down.weight.shape) == (16, 64, 1, 1) and tuple(a.up.weight.shape) == (64, 16, 1, 1)
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(a(x), x)
    torch.nn.init.normal_(a.up.weight)
    y = a(x)
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_u_head_output_width_is_the_clip_text_width(tiny_models):
    import torch

    from distillery.models import load_clip
    from distillery.teacher.clip import class_weights
    from distillery.teacher.vermouth import build_head, head_widths

    model, _, tok = load_clip(str(tiny_models["clip"]))
    text = class_weights(model, tok, ["a {domain} of a {c}."], ["forest", "river"], "satellite photo", "cpu")
    width = model.text_projection.shape[1]
    assert text.shape == (2, width)
    head = build_head([96, 64], head_widths(16, 2), width, [16, 32, 64], [0, 1, 1])
    diff = [torch.randn(3, 96, 8, 8), torch.randn(3, 64, 4, 4)]
    exp = [torch.randn(3, 16, 8, 8), torch.randn(3, 32, 4, 4), torch.randn(3, 64, 4, 4)]
    assert tuple(head(diff, exp).shape) == (3, width)
    # SD 1.5's levels (32 px stored at 16) with a ResNet-18 expert: widths 256 -> 512 -> 768 -> 1024, out 512
    sd = build_head([lv.channels for lv in SD15_LEVELS], head_widths(256, 4), 512, [128, 256, 512], [0, 1, 2])
    assert [b[0].out_channels for b in sd.blocks] == [256, 512, 768, 1024]
    assert [b[1].num_groups for b in sd.blocks] == [32, 32, 32, 32]
    assert [b[0].in_channels for b in sd.blocks] == [960 + 128, 256 + 1280 + 256, 512 + 1280 + 512, 768 + 1280]
    assert all(b[0].bias is None for b in sd.blocks)
    diff = [torch.randn(1, c, s, s) for c, s in ((960, 16), (1280, 16), (1280, 8), (1280, 4))]
    exp = [torch.randn(1, 128, 16, 16), torch.randn(1, 256, 16, 16), torch.randn(1, 512, 8, 8)]
    with torch.no_grad():
        assert tuple(sd(diff, exp).shape) == (1, 512)


def test_cosine_classifier_by_hand():
    import torch

    from distillery.teacher.vermouth import cosine_logits

    v = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    cos = np.array([[0.6, 0.8, -7 / (5 * np.sqrt(2))], [1.0, 0.0, -1 / np.sqrt(2)]])
    z = cos / 0.2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    got = torch.softmax(cosine_logits(v, t, 0.2), 1).numpy()
    assert np.allclose(cosine_logits(v, t, 0.2).numpy(), z, atol=1e-6)
    assert np.allclose(got, p, atol=1e-6)


# --- the stage ----------------------------------------------------------------------------------------------


def test_no_class_name_reaches_the_unet(make_job, monkeypatch):
    """Every text the diffusion text encoder encodes and every condition that reaches the UNet during the
    Vermouth stage is the domain prompt; no class name appears in any of them."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from distillery.teacher import TEACHERS, run_teacher
    from distillery.teacher.vermouth import prompt_mentions_class

    job = make_job({"teacher.air.enabled": False})
    active = {"on": False}
    prompts, texts, conds = [], [], []
    spec = TEACHERS["vermouth"]

    def run(ctx):
        active["on"] = True
        try:
            return spec.run(ctx)
        finally:
            active["on"] = False

    monkeypatch.setitem(TEACHERS, "vermouth", dataclasses.replace(spec, run=run))
    enc, text_fwd, unet_fwd = StableDiffusionPipeline.encode_prompt, CLIPTextModel.forward, UNet2DConditionModel.forward

    def encode_prompt(self, prompt, *a, **k):
        if active["on"]:
            prompts.extend([prompt] if isinstance(prompt, str) else list(prompt))
            tokenizers.append(self.tokenizer)
        return enc(self, prompt, *a, **k)

    def text_forward(self, input_ids=None, *a, **k):
        if active["on"]:
            texts.extend(tokenizers[-1].batch_decode(input_ids, skip_special_tokens=True))
        return text_fwd(self, input_ids, *a, **k)

    def unet_forward(self, sample, timestep, encoder_hidden_states, *a, **k):
        if active["on"]:
            conds.append(encoder_hidden_states.detach().clone())
        return unet_fwd(self, sample, timestep, encoder_hidden_states, *a, **k)

    tokenizers: list = []
    monkeypatch.setattr(StableDiffusionPipeline, "encode_prompt", encode_prompt)
    monkeypatch.setattr(CLIPTextModel, "forward", text_forward)
    monkeypatch.setattr(UNet2DConditionModel, "forward", unet_forward)
    run_teacher(job, progress=False)
    assert prompts == ["a satellite photo"] and [t.strip() for t in texts] == ["a satellite photo"]
    assert conds, "the UNet was never called during the stage"
    names = job.class_names
    assert not any(prompt_mentions_class(p, names) for p in prompts + texts)
    assert not any(n.lower() in p.lower() for n in names for p in prompts + texts)
    # what reached the UNet is that prompt's encoding, for every image of every batch
    monkeypatch.undo()
    from distillery.teacher.vermouth import load_pipe

    pipe = load_pipe(job.models.diffusion, None, "cpu")
    with torch.no_grad():
        ref = pipe.encode_prompt(["a satellite photo"], "cpu", 1, False)[0][0]
        for name in names:  # sanity: a class prompt would have been distinguishable
            assert not torch.allclose(pipe.encode_prompt([f"a satellite photo of {name}"], "cpu", 1, False)[0][0], ref)
    assert all(torch.allclose(c[i], ref, atol=1e-5) for c in conds for i in range(len(c)))


def test_stage_writes_its_column_and_a_rerun_computes_no_features(make_job):
    import torch
    from safetensors import safe_open

    from distillery.rundir import RunPaths, read_table
    from distillery.teacher import run_teacher
    from distillery.teacher.features import FeatureStore
    from distillery.teacher.vermouth import build_head, cosine_logits, head_widths, split_row

    job = make_job({"teacher.air.enabled": False, "teacher.prior.mode": "none"})  # the head's own softmax
    info = run_teacher(job, progress=False)["vermouth"]
    paths = RunPaths(job.run_path)
    pl = read_table(paths.pseudo_labels)
    p = np.asarray([r["p_vermouth"] for r in pl])
    assert p.shape == (20, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert info["features_computed"] == 26 and info["expert_computed"] == 26  # 20 real + 6 synthetic
    assert info["prompt"] == "a satellite photo" and info["features_per_s"] > 0
    stores = sorted(d.name.split("-")[0] for d in paths.features.iterdir() if d.name.startswith("vermouth"))
    assert stores == ["vermouth", "vermouth_expert"]
    training = read_table(paths.teacher_dir("vermouth") / "training.parquet")
    assert len(training) == 1 and np.isfinite(training[0]["loss"])

    # the column is recomputable from the saved head and the cached features
    file = paths.teacher_dir("vermouth") / "head.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    levels, text = meta["levels"], tensors["classifier"]
    head = build_head([lv["channels"] for lv in levels], head_widths(16, len(levels)), text.shape[1],
                      meta["expert_channels"], meta["expert_levels"])
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    head.eval()
    folders = {d.name.split("-")[0]: d for d in paths.features.iterdir()}
    shas = [r["sha256"] for r in pl]

    def rows(name):
        m = json.loads((folders[name] / "meta.json").read_text())
        return torch.from_numpy(FeatureStore(paths.features, name, m["encoder"], m["preprocessing"]).get(shas))

    diff = split_row(rows("vermouth"), [lv["channels"] for lv in levels], [lv["stored_side"] for lv in levels])
    exp = split_row(rows("vermouth_expert"), meta["expert_channels"], meta["expert_sides"])
    with torch.no_grad():
        again = torch.softmax(cosine_logits(head(diff, exp), text, 0.2), 1).numpy()
    assert np.allclose(again, p, atol=1e-5)

    # a new head setting retrains the head, but every feature comes from the store
    job2 = make_job({"teacher.air.enabled": False, "teacher.vermouth.epochs": 2})
    info2 = run_teacher(job2, progress=False)["vermouth"]
    assert info2["computed"] == 20 and info2["features_computed"] == 0 and info2["expert_computed"] == 0
    assert len(read_table(paths.teacher_dir("vermouth") / "training.parquet")) == 2


def test_train_unet_norms_recomputes_features_and_saves_the_norms(make_job):
    from safetensors import safe_open

    from distillery.rundir import RunPaths, read_table
    from distillery.teacher import run_teacher

    job = make_job({"teacher.air.enabled": False, "teacher.vermouth.train_unet_norms": True,
                    "teacher.vermouth.expert": False})
    info = run_teacher(job, progress=False)["vermouth"]
    paths = RunPaths(job.run_path)
    assert not any(d.name.startswith("vermouth") for d in paths.features.iterdir())  # nothing cached
    assert "per step" in info["features_computed"]
    p = np.asarray([r["p_vermouth"] for r in read_table(paths.pseudo_labels)])
    assert p.shape == (20, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    with safe_open(str(paths.teacher_dir("vermouth") / "head.safetensors"), framework="pt") as f:
        unet_keys = [k for k in f.keys() if k.startswith("unet.")]
    assert unet_keys and all("norm" in k for k in unet_keys)


def test_confident_real_pseudo_labels_join_the_training_set():
    import numpy as np

    from distillery.images import ImageSet
    from distillery.teacher.vermouth import confident_training_set

    syn = ImageSet(["s0", "s1"], ["a", "b"])
    real = ImageSet(["r0", "r1", "r2"], ["c", "d", "e"])
    col = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    train, y = confident_training_set({"synthetic": syn, "real": real}, np.array([0, 1]), col, 0.7)
    assert train.sha256 == ["a", "b", "c", "e"] and y.tolist() == [0, 1, 0, 1]
    train, y = confident_training_set({"synthetic": syn, "real": real}, np.array([0, 1]), col, 0.0)
    assert train.sha256 == ["a", "b"] and y.tolist() == [0, 1]


def test_real_pseudo_labels_order_and_stamp(make_job):
    """The setting makes Vermouth read the clip column: it runs after clip, reads its file for its stamp, and
    the default ensemble still fuses air_prompt and vermouth (reading is not building on)."""
    import pytest

    from distillery.job import JobError
    from distillery.rundir import RunPaths, read_json
    from distillery.teacher import run_teacher
    from distillery.teacher.base import ensemble_weights, teachers_to_run

    job = make_job({"teacher.synth.images_per_class": 2, "teacher.vermouth.real_pseudo_labels": 0.3,
                    "teacher.air.enabled": False, "teacher.transduct.enabled": False,
                    "teacher.ensemble.weighting": "agreement"})
    order = teachers_to_run(job)
    assert order.index("clip") < order.index("vermouth")
    assert set(ensemble_weights(job)[0]) == {"clip", "vermouth"}
    run_teacher(job, progress=False)
    st = read_json(RunPaths(job.run_path).teacher / ".teacher-vermouth.stamp.json")
    assert st["synthetic_images"] == 6 and st["real_training_images"] > 0
    with pytest.raises(JobError, match="reads the column 'latte'"):
        make_job({"teacher.vermouth.real_pseudo_labels": 0.3, "teacher.vermouth.pseudo_label_column": "latte"})
