"""Synthesis: prompts per trick as SPEC §1 writes them, seeds, the per-image guidance loop, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.rundir import RunPaths, read_table, sha256_file
from distillery.teacher import synth


def test_prompts_match_spec_exactly():
    assert synth.trick_prompt("base", "forest", 0, "photo") == "an image of a forest"
    assert synth.trick_prompt("random_guidance", "forest", 3, "photo") == "an image of a forest"
    assert synth.trick_prompt("class_prompt", "forest", 0, "photo") == "forest"
    general = [synth.trick_prompt("multi_domain", "cat", i, "photo") for i in range(10)]
    assert general == [f"a {d} of a cat" for d in ["photo", "drawing", "painting", "sketch", "collage", "poster",
                                                    "digital art image", "rock drawing", "stick figure",
                                                    "3D rendering"]]
    sat = [synth.trick_prompt("multi_domain", "river", i, "satellite photo") for i in range(5)]
    assert sat == [f"a satellite photo of a river in the style of a {s}"
                   for s in ["realistic photo", "drawing", "painting", "sketch", "3D rendering"]]
    with pytest.raises(ValueError, match="unknown trick"):
        synth.trick_prompt("sparkle", "x", 0, "photo")


def test_all_expands_and_drops_class_prompt_with_domain():
    assert synth.expand_tricks(["all"], "satellite photo") == ["base", "multi_domain", "random_guidance"]
    assert synth.expand_tricks(["all"], None) == ["base", "class_prompt", "multi_domain", "random_guidance"]
    assert synth.expand_tricks(["base", "all"], None) == ["base", "class_prompt", "multi_domain", "random_guidance"]


def test_job_without_domain_word_gets_class_prompt_in_all(make_job):
    """The default job sets no domain: `all` then includes class_prompt, and prompts needing one say "photo"."""
    job = make_job({"domain": None, "teacher.synth.tricks": ["all"], "teacher.synth.images_per_class": 1})
    assert job.domain is None and job.domain_phrase == "photo"
    assert {p.trick for p in synth.plan(job)} == {"base", "class_prompt", "multi_domain", "random_guidance"}
    job = make_job({"teacher.synth.tricks": ["all"], "teacher.synth.images_per_class": 1})
    assert "class_prompt" not in {p.trick for p in synth.plan(job)}  # "satellite photo" is set


def test_antialias_changes_the_pixels_of_the_resize():
    """A 64 -> 16 px resize of 4-px-wide stripes: plain bilinear samples between two pixels of the same stripe,
    so it keeps pure black and white (aliasing); the anti-aliased resize averages across stripes (greys).
    The DDN setting differs per dataset (on for CIFAR, off for EuroSAT), so it must change the pixels."""
    import torch

    stripes = ((torch.arange(64) // 4) % 2).float().view(1, 1, 1, 64).expand(1, 3, 64, 64)
    sharp = np.asarray(synth.to_pil(stripes, 16, antialias=False)[0])
    smooth = np.asarray(synth.to_pil(stripes, 16, antialias=True)[0])
    assert set(np.unique(sharp)) == {0, 255}
    assert ((smooth > 0) & (smooth < 255)).mean() > 0.9


def test_seeds_distinct_reproducible_and_guidance_in_range():
    seeds = {synth.image_seed(0, c, t, i) for c in ["a", "b"] for t in ["base", "multi_domain"] for i in range(50)}
    assert len(seeds) == 200  # distinct per (class, trick, index)
    import hashlib

    h = hashlib.sha256(b"0|a|base|1").digest()  # the recorded derivation, recomputed
    assert synth.image_seed(0, "a", "base", 1) == int.from_bytes(h[:8], "little") & (2 ** 63 - 1)
    assert synth.image_seed(1, "a", "base", 1) != synth.image_seed(0, "a", "base", 1)
    g = [synth.trick_guidance("random_guidance", synth.image_seed(0, "a", "random_guidance", i), 7.5)
         for i in range(200)]
    assert 1.0 <= min(g) and max(g) <= 5.0 and np.std(g) > 0.5  # spread over [1, 5], one draw per image
    assert synth.trick_guidance("base", 123, 7.5) == 7.5


def test_safe_names():
    for name in ["a/b", "../../etc", "café au lait", "rm -rf $(x); `y`", "日本", " "]:
        s = synth.safe_name(name)
        assert s and all(ch.isalnum() or ch == "-" for ch in s) and s.isascii(), (name, s)


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from distillery.models import load_diffusion

    return load_diffusion(str(tiny_models["diffusion"]))


def test_generate_equals_stock_pipeline_at_constant_guidance(pipe):
    from diffusers import DDIMScheduler

    prompts, seeds = ["an image of a forest", "an image of a river"], [11, 12]
    ours = synth.generate(pipe, prompts, [4.0, 4.0], seeds, steps=4, resolution=64)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=4.0, height=64, width=64, eta=0.0, output_type="pt",
               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
    diff = (ours - ref).abs()
    assert diff.max() < 1e-4, f"max |diff| {diff.max():.2e}, mean {diff.mean():.2e}"


def test_per_image_guidance_in_one_batch_equals_one_at_a_time(pipe):
    batch = synth.generate(pipe, ["a", "b"], [1.5, 4.5], [1, 2], steps=3, resolution=64)
    one = synth.generate(pipe, ["a"], [1.5], [1], steps=3, resolution=64)
    two = synth.generate(pipe, ["b"], [4.5], [2], steps=3, resolution=64)
    assert (batch[0] - one[0]).abs().max() < 1e-4 and (batch[1] - two[0]).abs().max() < 1e-4
    other = synth.generate(pipe, ["a"], [4.5], [1], steps=3, resolution=64)
    assert (other[0] - one[0]).abs().max() > 1e-3  # the scale is really applied per image


def test_synth_stage_resume_after_crash(make_job, monkeypatch):
    job = make_job({"teacher.synth.tricks": ["base", "random_guidance"]},
                   classes=[{"name": "a/b c"}, {"name": "café; rm -rf"}])
    paths = RunPaths(job.run_path)
    real_generate = synth.generate
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # simulated kill in the middle of the stage
        return real_generate(*a, **k)

    monkeypatch.setattr(synth, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        synth.run_synth(job, progress=False)
    written = sorted(paths.synthetic_dir.rglob("*.png"))
    assert len(written) == 4 and not list(paths.teacher.rglob("*.tmp*"))  # one batch, no partial files
    # corrupt one finished file: it must be regenerated
    written[0].write_bytes(b"garbage")
    monkeypatch.setattr(synth, "generate", real_generate)
    info = synth.run_synth(job, progress=False)
    assert info["generated"] == 5  # 8 planned - 4 done + 1 corrupted
    rows = read_table(paths.synthetic)
    assert len(rows) == 8 and len({r["path"] for r in rows}) == 8
    assert {(r["class_name"], r["trick"]) for r in rows} == {(c, t) for c in ["a/b c", "café; rm -rf"]
                                                            for t in ["base", "random_guidance"]}
    for r in rows:
        assert sha256_file(r["path"]) == r["sha256"]
    assert synth.run_synth(job, progress=False)["generated"] == 0  # second run does nothing

    # regenerating a row from what the table records reproduces the image
    from PIL import Image

    r = rows[-1]
    from distillery.models import load_diffusion

    img = synth.to_pil(real_generate(load_diffusion(job.models.diffusion), [r["prompt"]], [r["guidance"]],
                                     [r["seed"]], r["steps"], r["negative_prompt"], resolution=r["resolution"]),
                       r["output_size"], job.teacher.synth.antialias)[0]
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(r["path"])))


def test_changed_recipe_regenerates_images_under_the_same_names(make_job):
    """File names do not change with the steps, guidance or LoRA: the row's recipe does, and a rerun with a new
    recipe regenerates the images instead of keeping the old ones."""
    job = make_job({"teacher.synth.images_per_class": 1, "teacher.synth.steps": 2, "teacher.synth.grid_samples": 0})
    assert synth.run_synth(job, progress=False)["generated"] == 3
    before = {r["relpath"]: (r["sha256"], r["recipe"]) for r in read_table(RunPaths(job.run_path).synthetic)}
    job3 = make_job({"teacher.synth.images_per_class": 1, "teacher.synth.steps": 3, "teacher.synth.grid_samples": 0})
    assert synth.run_synth(job3, progress=False)["generated"] == 3
    after = {r["relpath"]: (r["sha256"], r["recipe"]) for r in read_table(RunPaths(job.run_path).synthetic)}
    assert before.keys() == after.keys() and all(before[k][1] != after[k][1] for k in before)
    assert not (RunPaths(job.run_path).teacher / "grids").exists()  # grid_samples=0: no pictures


def test_full_size_originals_kept_for_airs_tricks_and_regenerated_when_missing(make_job):
    from PIL import Image

    job = make_job({"teacher.synth.tricks": ["base", "random_guidance"], "teacher.synth.images_per_class": 1,
                    "teacher.synth.grid_samples": 0})  # resolution 64 -> output_size 32; AiR uses "base"
    assert synth.run_synth(job, progress=False)["generated"] == 6
    rows = read_table(RunPaths(job.run_path).synthetic)
    base = [r for r in rows if r["trick"] == "base"]
    assert all(r["full_path"] and Image.open(r["full_path"]).size == (64, 64) for r in base)
    assert all(sha256_file(r["full_path"]) == r["full_sha256"] for r in base)
    assert all(r["full_path"] is None for r in rows if r["trick"] == "random_guidance")
    # the small copy is the original resized as the recipe says
    small = synth.to_pil(torch_from(Image.open(base[0]["full_path"])), 32, False)[0]
    assert np.abs(np.asarray(small, int) - np.asarray(Image.open(base[0]["path"]), int)).max() <= 1
    import os

    os.remove(base[0]["full_path"])
    assert synth.run_synth(job, progress=False)["generated"] == 1  # only the row whose original is gone
    job_none = make_job({"teacher.synth.tricks": ["base"], "teacher.synth.images_per_class": 1,
                         "teacher.synth.keep_full_size": [], "teacher.synth.grid_samples": 0})
    assert all(p.full_relpath is None for p in synth.plan(job_none))


def torch_from(img):
    import torch

    return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
