"""Domain LoRA (SPEC §2): parameter share, effect on generation, save/load round-trip, stage skip, dry run."""
from __future__ import annotations

import io
import json

import pytest
import torch

from distillery.job import LoraCfg
from distillery.rundir import RunPaths, list_images, read_table, sha256_file
from distillery.teacher import lora, synth

PROMPTS, GUIDANCE, SEEDS = ["an image of a forest", "an image of a river"], [4.0, 2.0], [5, 6]


def _gen(pipe):
    return synth.generate(pipe, PROMPTS, GUIDANCE, SEEDS, steps=2, resolution=64)


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A tiny pipeline before and after 3 LoRA steps (rank 4, alpha 8: scale 2, so the saved alpha matters)."""
    from distillery.models import load_diffusion
    from tests.conftest import SAMPLE

    pipe = load_diffusion(str(tiny_models["diffusion"]))
    base = _gen(pipe)
    counts = lora.add_lora(pipe.unet, rank=4, alpha=8.0, seed=0)
    fresh = _gen(pipe)
    images = list_images(SAMPLE / "unlabeled")[:8]
    losses = lora.train_lora(pipe, images, "a satellite photo", LoraCfg(lr=1e-2, batch_size=2), 64, seed=0, steps=3,
                             progress=False)
    folder = tmp_path_factory.mktemp("lora")
    lora.save_lora(pipe, folder)
    return {"pipe": pipe, "base": base, "fresh": fresh, "adapted": _gen(pipe), "counts": counts, "losses": losses,
            "folder": folder}


def test_trainable_share_is_small_and_counts_the_attention_projections(trained, tiny_models):
    c = trained["counts"]
    from distillery.models import load_diffusion

    # independent count: r * (in + out) for every to_q/to_k/to_v/to_out.0 Linear of the plain UNet
    plain = load_diffusion(str(tiny_models["diffusion"])).unet
    expected = sum(4 * (m.in_features + m.out_features) for n, m in plain.named_modules()
                   if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")))
    assert c["trainable_params"] == expected > 0
    assert c["unet_params"] == sum(p.numel() for p in plain.parameters())
    assert 0 < c["trainable_share"] < 0.05  # the tiny UNet is attention-heavy; SD 1.5 below
    assert len(trained["losses"]) == 3


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_training_example_recomputed_by_hand(tiny_models, kind):
    """x0 = (mean + std * e) * scaling_factor, t in [0, T), x_t and the target of each prediction type, from
    the scheduler's betas (not its helpers)."""
    from diffusers import DDPMScheduler

    from distillery.models import load_diffusion
    from tests.conftest import SAMPLE

    pipe = load_diffusion(str(tiny_models["diffusion"]))
    sched = DDPMScheduler.from_config({**pipe.scheduler.config, "prediction_type": kind})
    images = list_images(SAMPLE / "unlabeled")[:4]
    pixels = lora.load_batch(images, 64, [False, True, False, False])
    ex = lora.training_example(pipe.vae, sched, pixels, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        mean, logvar = pipe.vae.encode(pixels).latent_dist.parameters.chunk(2, dim=1)
    e = torch.randn(mean.shape, generator=gen)
    x0 = (mean + (0.5 * logvar.clamp(-30, 20)).exp() * e) * pipe.vae.config.scaling_factor
    assert pipe.vae.config.scaling_factor != 1.0  # the tiny VAE's factor is not the identity, so this is checked
    noise = torch.randn(x0.shape, generator=gen)
    T = sched.config.num_train_timesteps
    t = torch.randint(0, T, (4,), generator=gen)
    assert torch.equal(ex["t"], t) and int(t.min()) >= 0 and int(t.max()) < T
    betas = torch.linspace(sched.config.beta_start ** 0.5, sched.config.beta_end ** 0.5, T) ** 2 \
        if sched.config.beta_schedule == "scaled_linear" else torch.linspace(sched.config.beta_start,
                                                                             sched.config.beta_end, T)
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    want = {"epsilon": noise, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0, "sample": x0}[kind]
    for k, ref in (("latents", x0), ("noisy", xt), ("target", want)):
        assert torch.allclose(ex[k], ref, atol=1e-5), (k, (ex[k] - ref).abs().max())


def test_unknown_prediction_type_is_refused_by_name(tiny_models):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler()
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        lora.lora_target(sched, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_sd15_layout_share_about_a_fifth_of_a_percent():
    c = lora.sd15_trainable_share(rank=8, alpha=8)
    assert 850e6 < c["unet_params"] < 870e6  # SD 1.5 UNet: 859.5M
    assert c["trainable_params"] == 1_594_368 and 0.001 < c["trainable_share"] < 0.002


def test_fresh_adapter_is_a_no_op(trained):
    d0 = (trained["fresh"] - trained["base"]).abs().max()
    assert d0 < 1e-6, f"fresh adapter changed the output: max |diff| {d0:.2e}"


def test_save_load_round_trip_matches_in_memory_adapter(trained, tiny_models):
    from distillery.models import load_diffusion

    f = trained["folder"] / lora.WEIGHT_NAME
    assert f.is_file()
    pipe = load_diffusion(str(tiny_models["diffusion"]))
    pipe.load_lora_weights(str(trained["folder"]))  # plain diffusers call, default weight name
    diff = (_gen(pipe) - trained["adapted"]).abs()
    assert diff.max() < 1e-5, f"reloaded LoRA differs: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}"


def test_stage_trains_skips_and_synthesis_uses_it(make_job, monkeypatch):
    job = make_job({"teacher.lora.steps": 2, "teacher.lora.batch_size": 2, "teacher.synth.images_per_class": 1})
    paths = RunPaths(job.run_path)
    info = lora.run_lora(job, progress=False)
    loss = json.loads((paths.teacher / "lora" / "loss.json").read_text())
    assert len(loss["loss"]) == 2 and loss["caption"] == "a satellite photo" and loss["images"] == 20
    assert 0 < info["trainable_share"] < 0.05

    def boom(*a, **k):
        raise AssertionError("trained again although nothing changed")

    monkeypatch.setattr(lora, "train_lora", boom)
    assert lora.run_lora(job, progress=False)["sha256"] == info["sha256"]  # skipped
    monkeypatch.undo()

    s1 = synth.run_synth(job, progress=False)
    rows = read_table(paths.synthetic)
    assert s1["generated"] == 3 and {r["lora"] for r in rows} == {sha256_file(lora.lora_weights_path(job))}
    grid = paths.teacher / "grids" / "base.png"
    from PIL import Image

    with Image.open(grid) as g:  # 3 classes x 1 sample, 64 px cells
        assert g.height >= 3 * 64 and g.width >= 64
    # new adapter weights -> new synthesis key and recipe: every image is regenerated
    job2 = make_job({"teacher.lora.steps": 2, "teacher.lora.batch_size": 2, "teacher.lora.seed": 1,
                     "teacher.synth.images_per_class": 1})
    lora.run_lora(job2, progress=False)
    assert synth.run_synth(job2, progress=False)["generated"] == 3
    # LoRA off -> the plain model, images regenerated without it
    job3 = make_job({"teacher.lora.enabled": False, "teacher.synth.images_per_class": 1})
    assert synth.run_synth(job3, progress=False)["generated"] == 3
    assert {r["lora"] for r in read_table(paths.synthetic)} == {None}


def test_dry_run_prints_counts_and_writes_nothing(make_job, tmp_path, capsys):
    import yaml

    from distillery.cli import main

    job = make_job({"teacher.lora.steps": 5, "teacher.lora.batch_size": 2, "teacher.lora.grad_accum": 2})
    raw = job.to_dict()
    raw.pop("source")
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["teacher", "--job", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not job.run_path.exists(), "the dry run wrote the run folder"
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()}
    assert lines["lora"][1:3] == ["20", "20"]  # 20 unlabeled images; 5 steps x 2 accum x 2 images
    assert lines["synth"][1:3] == ["6", "36"]  # 3 classes x 2 images; 6 x 3 steps x 2 (guidance)
    assert lines["clip"][1] == "20" and "est. time" in out

    from distillery.teacher import dry_run

    job_off = make_job({"teacher.lora.enabled": False})
    rows = dry_run(job_off, out=io.StringIO())
    assert [r["stage"] for r in rows][:1] == ["synth"] and rows[0]["estimate_s"] > 0
    assert rows[0]["s_per_unet_eval"] > 0


@pytest.mark.parametrize("key,value,match", [
    ("teacher.lora.mixed_precision", "fp8", "mixed_precision"), ("teacher.lora.rank", 0, "rank"),
    ("teacher.lora.resolution", 60, "multiple of 8"), ("teacher.lora.caption", "a {dom}", "caption"),
    ("teacher.lora.lr", 0, "lr"),
])
def test_bad_lora_settings_fail_with_the_key(make_job, key, value, match):
    from distillery.job import JobError

    with pytest.raises(JobError, match=match):
        make_job({key: value})


SAVE_IN_FRESH_PROCESS = """
import sys, types
from diffusers import UNet2DConditionModel
from distillery.teacher import lora
unet = UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet")
lora.add_lora(unet, rank=4, alpha=8.0, seed=0)
print(lora.save_lora(types.SimpleNamespace(unet=unet), sys.argv[2]))
"""


def test_same_settings_give_byte_identical_files_in_fresh_processes(tiny_models, tmp_path):
    """The safetensors metadata holds target_modules as a set; saved in set order, its bytes (and the sha256 the
    synthetic images are keyed on) changed with each process's string hash seed."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    files = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"save{seed}"
        subprocess.run([sys.executable, "-c", SAVE_IN_FRESH_PROCESS, str(tiny_models["diffusion"]), str(out)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed,
                                                             "OMP_NUM_THREADS": "1"}, timeout=300)
        files.append(out / lora.WEIGHT_NAME)
    assert len({sha256_file(f) for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.target_modules"] == sorted(meta["unet.target_modules"])


def test_lora_resumes_from_a_step_checkpoint_to_the_same_weights(tiny_models, tmp_path):
    """Interrupted after step 3 (checkpoint at step 2), a fresh adapter resumed from the checkpoint ends with the
    losses and weights of an uninterrupted 5-step run; a checkpoint of another stage key is ignored."""
    from distillery.models import load_diffusion
    from tests.conftest import SAMPLE

    images = list_images(SAMPLE / "unlabeled")[:8]
    cfg = LoraCfg(lr=1e-2, batch_size=2, checkpoint_steps=2)

    def fresh():
        pipe = load_diffusion(str(tiny_models["diffusion"]))
        lora.add_lora(pipe.unet, rank=4, alpha=8.0, seed=0)
        return pipe

    def weights(pipe):
        return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}

    def train(pipe, **kw):
        return lora.train_lora(pipe, images, "a satellite photo", cfg, 64, seed=0, steps=5, progress=False, **kw)

    ref = fresh()
    ref_losses = train(ref)
    ck = tmp_path / lora.CHECKPOINT_NAME

    class Stop(Exception):
        pass

    def stop_after_third(step, _):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        train(fresh(), checkpoint=ck, key="k", on_step=stop_after_third)
    assert ck.is_file()
    resumed = fresh()
    assert train(resumed, checkpoint=ck, key="k") == ref_losses
    for n, w in weights(ref).items():
        d = (weights(resumed)[n] - w).abs().max().item()
        assert d <= 1e-7, f"{n}: max |diff| {d:.3g} after resuming"
    other = fresh()
    assert train(other, checkpoint=ck, key="other-settings") == ref_losses  # started over, same result
