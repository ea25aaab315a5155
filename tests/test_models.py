"""Every role loads through its library's own loader; a model that cannot be found fails in seconds."""
from __future__ import annotations

import time

import pytest

from distillery import models
from distillery.models import ModelLoadError


def test_tiny_models_load_through_the_real_loaders(tiny_models):
    pipe = models.load_diffusion(str(tiny_models["diffusion"]))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and len(pipe.tokenizer) == 49408
    assert pipe.tokenizer("an image of a forest").input_ids[:2] == [49406, 550]  # real CLIP BPE ids
    model, preprocess, tok = models.load_clip(str(tiny_models["clip"]))
    assert type(model).__name__ == "CLIP" and tok(["forest"]).shape == (1, 77)
    cap, proc = models.load_captioner(str(tiny_models["captioner"]))
    assert type(cap).__name__ == "BlipForConditionalGeneration"
    expert = models.load_expert(str(tiny_models["expert"]))
    assert type(expert).__name__ == "ResNet"


def test_tiny_captioner_sees_its_input(tiny_models):
    """A random BLIP vision tower needs initializer_range=0.02, or its output ignores the image."""
    import torch
    from PIL import Image

    cap, proc = models.load_captioner(str(tiny_models["captioner"]))
    a = proc(images=Image.new("RGB", (64, 64), (250, 10, 10)), return_tensors="pt")["pixel_values"]
    b = proc(images=Image.new("RGB", (64, 64), (10, 10, 250)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        fa, fb = cap.vision_model(pixel_values=a)[0], cap.vision_model(pixel_values=b)[0]
    assert (fa - fb).abs().max() > 1e-2


@pytest.mark.parametrize("role, loader", [("diffusion", models.load_diffusion), ("clip", models.load_clip),
                                          ("captioner", models.load_captioner), ("expert", models.load_expert)])
def test_missing_local_folder_names_role_and_fix(tmp_path, role, loader):
    with pytest.raises(ModelLoadError) as e:
        loader(str(tmp_path / "missing"))
    msg = str(e.value)
    assert f"models.{role}" in msg and "missing" in msg and "local folder" in msg


@pytest.mark.parametrize("role, loader, ref", [
    ("diffusion", models.load_diffusion, "no-such-org/no-such-diffusion"),
    ("clip", models.load_clip, "ViT-B-32/laion2b_s34b_b79k"),
    ("captioner", models.load_captioner, "no-such-org/no-such-captioner"),
    ("expert", models.load_expert, "hf-hub:no-such-org/no-such-expert"),
])
def test_uncached_hub_ids_fail_within_seconds(role, loader, ref):
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        loader(ref)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"took {elapsed:.1f}s"
    assert f"models.{role}" in str(e.value) and ref in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_clip_reference_forms():
    assert models.open_clip_name("ViT-B-32/laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert models.open_clip_name("hf-hub:laion/x") == ("hf-hub:laion/x", None)
    assert models.open_clip_name("/abs/folder") == ("local-dir:/abs/folder", None)
    with pytest.raises(ModelLoadError, match="ARCH/TAG"):
        models.open_clip_name("ViT-B-32")
