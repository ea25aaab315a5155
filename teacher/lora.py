"""Domain LoRA (SPEC §2, AiR "beyond words"): adapt the diffusion UNet to the target domain without labels.

Only low-rank adapters on the UNet attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) are
trained, with the ordinary noise-prediction MSE, on the job's **unlabeled** images; every image gets the
same caption, ``"a {domain}"`` (e.g. "a satellite photo"), since the paper does not say. The adapter is
saved in the diffusers LoRA format, so ``pipe.load_lora_weights(folder)`` reads it::

    runs/<job>/teacher/lora/pytorch_lora_weights.safetensors   the adapter
    runs/<job>/teacher/lora/loss.json                          loss per step, trainable share, timing
    runs/<job>/teacher/lora/checkpoint.safetensors             while training: every teacher.lora.checkpoint_steps

The checkpoint holds the adapter, the AdamW state, the grad scaler, the batch/noise generator's state, the step
and the losses so far, in one safetensors file written atomically (no pickle). A killed run resumes from it and
ends with the weights of an uninterrupted run (the same batches, noise and optimizer state; bit-identical on a
CPU). It is removed once the adapter is written and the stage stamped.

Synthesis loads it when it is present and ``teacher.lora.enabled``; its sha256 enters the synthesis
stage key and the ``lora`` column of ``synthetic.parquet``, so new weights regenerate the images.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from distillery import killpoints
from distillery.rundir import LORA_WEIGHT_NAME as WEIGHT_NAME  # diffusers' default name, read by load_lora_weights
from distillery.rundir import RunPaths, canonical_safetensors, is_done, log, mark_done, read_json, save_resolved_job, \
    sha256_file, stage_key, write_json

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
CHECKPOINT_NAME = "checkpoint.safetensors"  # the resumable training state (teacher/lora/)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what the UNet predicts (the scheduler's prediction_type)


def lora_dir(job) -> Path:
    return RunPaths(job.run_path).lora


def lora_weights_path(job) -> Path:
    """``teacher/lora/pytorch_lora_weights.safetensors``: diffusers' default name, read by load_lora_weights(folder)."""
    return RunPaths(job.run_path).lora_weights


def active_lora(job) -> Path | None:
    """The adapter synthesis should use: enabled in the job and present on disk, else None."""
    p = lora_weights_path(job)
    return p if job.teacher.lora.enabled and p.is_file() else None


def caption(job) -> str:
    return job.teacher.lora.caption.format(domain=job.domain_phrase)


def lora_seed(job) -> int:
    return job.teacher.lora.seed if job.teacher.lora.seed is not None else job.seed


def train_resolution(job) -> int:
    return job.teacher.lora.resolution or job.teacher.synth.resolution


# ----------------------------------------------------------------------------------------------
# Adapters


def param_counts(unet) -> dict:
    """Trainable (LoRA) parameters, the frozen base UNet's parameters and the share trainable / base."""
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    return {"trainable_params": trainable, "unet_params": base, "trainable_share": trainable / base}


def add_lora(unet, rank: int, alpha: float, seed: int = 0) -> dict:
    """Freeze ``unet`` and add a LoRA adapter on its attention projections; returns :func:`param_counts`.

    peft's default init (A random, B = 0) makes the fresh adapter an exact no-op.
    """
    import torch
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # seed the random A matrices without touching the caller's RNG
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES)))
    for n, p in unet.named_parameters():  # adapters train in fp32 even when the UNet runs in half precision
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return param_counts(unet)


def save_lora(pipe, folder: str | os.PathLike) -> Path:
    """Write the UNet's adapter in diffusers' LoRA format (atomically) into ``folder``; returns the file."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = pipe.unet
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    # The adapter config (alpha, target modules) travels in the safetensors metadata, so alpha != rank loads right.
    # Sets (target_modules) as sorted lists: diffusers writes list(set), whose order changes with the process's
    # string hash seed, so the same adapter would get another file (and sha256) in every process.
    meta = {k: sorted(v) if isinstance(v, (set, frozenset)) else v
            for k, v in unet.peft_config["default"].to_dict().items()}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".save-") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=meta,
                                                  weight_name=WEIGHT_NAME, safe_serialization=True)
        canonical_safetensors(Path(tmp) / WEIGHT_NAME)
        os.replace(Path(tmp) / WEIGHT_NAME, folder / WEIGHT_NAME)
    return folder / WEIGHT_NAME



def load_lora(pipe, weights: str | os.PathLike) -> None:
    """``pipe.load_lora_weights`` on a file written by :func:`save_lora` (UNet-only, so diffusers' note that
    the text encoder has no LoRA keys is silenced)."""
    from diffusers.utils import logging as dlogging

    weights = Path(weights)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
    finally:
        dlogging.set_verbosity(level)


# ----------------------------------------------------------------------------------------------
# Training


def load_batch(paths: list[Path], resolution: int, flips: list[bool]):
    """Images -> (B, 3, R, R) floats in [-1, 1]: shorter side resized to R (bicubic), centre crop, optional flip."""
    import numpy as np
    import torch
    from PIL import Image

    from distillery.images import load_rgb

    out = []
    for p, flip in zip(paths, flips):
        with load_rgb(p) as im:
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
            left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1.0


def lora_target(scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict, by the scheduler's ``prediction_type``: the noise (epsilon), the
    velocity v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x₀ (v_prediction), or the clean latents x₀ (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"models.diffusion: the scheduler's prediction_type {kind!r} is not supported by the LoRA "
                     f"objective; supported: {', '.join(PREDICTION_TYPES)}.")


def training_example(vae, scheduler, pixels, gen) -> dict:
    """One batch of the LoRA objective from images in [-1, 1]: a posterior sample of the VAE latent times the
    VAE's scaling factor (x₀), noise ε, timesteps uniform over [0, num_train_timesteps), the noised latent
    x_t = sqrt(ᾱ_t)·x₀ + sqrt(1−ᾱ_t)·ε and the target (:func:`lora_target`). Draws from ``gen`` in that order."""
    import torch

    device = pixels.device
    with torch.no_grad():
        mean, logvar = vae.encode(pixels).latent_dist.parameters.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=gen).to(device)
    latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=gen).to(device)
    return {"latents": latents, "noise": noise, "t": t, "noisy": scheduler.add_noise(latents, noise, t),
            "target": lora_target(scheduler, latents, noise, t)}


def save_checkpoint(path: str | os.PathLike, key: str, step: int, losses: list[float], params: dict, opt, scaler,
                    gen) -> None:
    """The resumable state of :func:`train_lora` after ``step`` steps, as one safetensors file (atomically):
    trainable parameters ``param.<name>``, AdamW state ``opt.<i>.<field>``, the generator state ``rng``; the
    key, step, losses, optimizer param groups and grad scaler in the metadata (JSON)."""
    import json

    import torch
    from safetensors.torch import save_file

    from distillery.rundir import atomic_path

    tensors = {f"param.{n}": p.detach().float().cpu().contiguous() for n, p in params.items()}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for field, v in st.items():
            tensors[f"opt.{i}.{field}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()
    meta = {"key": key, "step": json.dumps(step), "losses": json.dumps(losses),
            "param_groups": json.dumps(sd["param_groups"]), "scaler": json.dumps(scaler.state_dict())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_checkpoint(path: str | os.PathLike, key: str, params: dict, opt, scaler, gen) -> tuple[int, list[float]]:
    """Restore what :func:`save_checkpoint` wrote into ``params``, ``opt``, ``scaler`` and ``gen``; returns
    (step, losses). A missing, unreadable or foreign checkpoint (other stage key) returns (0, []) untouched."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return 0, []
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a torn or foreign file: start over rather than crash on it
        log(f"lora: ignoring unreadable checkpoint {path} ({type(e).__name__}: {e}); starting from step 0.")
        return 0, []
    if meta.get("key") != key or set(params) != {k[len("param."):] for k in tensors if k.startswith("param.")}:
        log(f"lora: checkpoint {path} is from other settings or images; starting from step 0.")
        return 0, []
    for n, p in params.items():
        p.data.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, field = k.split(".", 2)
            state.setdefault(int(i), {})[field] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    scaler_state = json.loads(meta["scaler"])
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    gen.set_state(tensors["rng"])
    return int(json.loads(meta["step"])), list(json.loads(meta["losses"]))


def train_lora(pipe, images: list[Path], text: str, cfg, resolution: int, seed: int, steps: int | None = None,
               progress: bool = True, on_step: Callable[[int, float], None] | None = None,
               checkpoint: str | os.PathLike | None = None, key: str = "") -> list[float]:
    """Train the adapter already added to ``pipe.unet`` with the noise-prediction MSE; returns the loss per step.

    Each optimizer step takes ``cfg.grad_accum`` micro-batches of ``cfg.batch_size`` images drawn with
    replacement. Timesteps uniform over the scheduler's training range; the target is :func:`lora_target`
    (noise, velocity or clean latents, by the scheduler's prediction type). Deterministic for a given seed on a
    given device.

    ``checkpoint``: a file to resume from (when it was written for ``key``) and to save to every
    ``cfg.checkpoint_steps`` steps (:func:`save_checkpoint`); the losses returned include the resumed ones.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    unet, vae = pipe.unet, pipe.vae
    device = unet.device
    cuda = device.type == "cuda"
    steps = cfg.steps if steps is None else steps
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision) if cuda else None
    if cfg.gradient_checkpointing and cuda:
        unet.enable_gradient_checkpointing()
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        cond = pipe.encode_prompt([text], device, 1, False)[0]  # (1, L, D)
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    params = list(named.values())
    if not params:
        raise ValueError("train_lora: the UNet has no trainable parameters; call add_lora(pipe.unet, ...) first.")
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start, losses = load_checkpoint(checkpoint, key, named, opt, scaler, gen) if checkpoint else (0, [])
    start = min(start, steps)
    losses = losses[:start]
    if start:
        log(f"lora: resuming after step {start}/{steps} from {checkpoint}")
    every = getattr(cfg, "checkpoint_steps", 0) if checkpoint else 0
    unet.train()
    bar = tqdm(total=steps, initial=start, desc="lora", unit="step", disable=not progress)
    for step in range(start, steps):
        total = 0.0
        for _ in range(cfg.grad_accum):
            idx = torch.randint(len(images), (cfg.batch_size,), generator=gen).tolist()
            flips = (torch.rand(cfg.batch_size, generator=gen) < 0.5).tolist()
            pixels = load_batch([images[i] for i in idx], resolution, flips).to(device=device, dtype=vae.dtype)
            ex = training_example(vae, noise_sched, pixels, gen)
            noisy, t, target = ex["noisy"], ex["t"], ex["target"]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.expand(cfg.batch_size, -1, -1)).sample
            loss = F.mse_loss(pred.float(), target.float()) / cfg.grad_accum
            scaler.scale(loss).backward()
            total += loss.item()
        if cfg.max_grad_norm > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if every and (step + 1) % every == 0 and step + 1 < steps:
            save_checkpoint(checkpoint, key, step + 1, losses, named, opt, scaler, gen)
        killpoints.progress("lora.step", step + 1)  # testing hook (distillery/killpoints.py)
        if on_step is not None:
            on_step(step, total)
    bar.close()
    unet.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# The stage.


def lora_settings(job) -> dict:
    from dataclasses import asdict

    cfg = asdict(job.teacher.lora)
    cfg.pop("device")  # where it runs does not change what it means
    cfg.pop("checkpoint_steps")  # nor how often it saves its progress
    return {"lora": cfg, "caption": caption(job), "resolution": train_resolution(job), "seed": lora_seed(job),
            "diffusion": job.models.diffusion, "target_modules": list(TARGET_MODULES)}


def run_lora(job, progress: bool = True, images=None) -> dict:
    """Train (or skip) the domain LoRA on the unlabeled images (an ImageSet) and write ``teacher/lora/``."""
    from distillery.images import unlabeled_set

    cfg = job.teacher.lora
    if not cfg.enabled:
        log("lora: disabled (teacher.lora.enabled=false); synthesis uses the plain diffusion model")
        return {"enabled": False}
    paths = RunPaths(job.run_path)
    folder = paths.lora
    image_set = images if images is not None else unlabeled_set(job)
    images = image_set.paths
    key = stage_key(lora_settings(job), extra=list(image_set.sha256))
    weights, loss_file = paths.lora_weights, paths.lora_loss
    ckpt = folder / CHECKPOINT_NAME
    for stale in folder.glob(".save-*") if folder.is_dir() else []:  # save_lora's folder of a killed write
        if stale.is_dir():
            import shutil

            shutil.rmtree(stale, ignore_errors=True)
    if is_done(folder, "lora", key, [weights, loss_file]):
        ckpt.unlink(missing_ok=True)  # left by a run killed between its stamp and the removal
        info = read_json(loss_file)
        log(f"lora: up to date ({weights}, trainable share {info['trainable_share']:.4%})")
        return {k: v for k, v in info.items() if k != "loss"}
    import torch

    from distillery.models import load_diffusion, pick_device

    device = pick_device(cfg.device, key="teacher.lora.device")
    t0 = time.perf_counter()
    pipe = load_diffusion(job.models.diffusion, device=device, half=False)  # fp32 master weights; autocast on CUDA
    counts = add_lora(pipe.unet, cfg.rank, cfg.alpha, seed=lora_seed(job))
    res = train_resolution(job)
    if device == "cpu" and (cfg.mixed_precision != "no" or cfg.gradient_checkpointing):
        log("lora: mixed_precision / gradient_checkpointing are CUDA-only; training in fp32 on the CPU")
    log(f"lora: {len(images)} unlabeled images, caption {caption(job)!r}, {cfg.steps} steps x "
        f"{cfg.batch_size * cfg.grad_accum} images at {res}px on {device}; trainable "
        f"{counts['trainable_params']:,} of {counts['unet_params']:,} UNet parameters "
        f"({counts['trainable_share']:.4%})")
    t1 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    losses = train_lora(pipe, images, caption(job), cfg, res, lora_seed(job), progress=progress, checkpoint=ckpt,
                        key=key)
    train_s = time.perf_counter() - t1
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"lora: the loss became {losses[-1]} (not finite); lower teacher.lora.lr "
                                 f"(now {cfg.lr}) or use teacher.lora.mixed_precision=bf16 instead of fp16.")
    folder.mkdir(parents=True, exist_ok=True)
    save_resolved_job(job, folder)
    save_lora(pipe, folder)
    killpoints.progress("lora.saved")
    first, last = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    info = {**counts, "caption": caption(job), "images": len(images), "steps": len(losses), "resolution": res,
            "device": device, "train_seconds": round(train_s, 2), "seconds": round(time.perf_counter() - t0, 2),
            "loss_first_10pct": sum(first) / len(first), "loss_last_10pct": sum(last) / len(last),
            "sha256": sha256_file(weights)}
    write_json(loss_file, {**info, "loss": losses})
    mark_done(folder, "lora", key, {"sha256": info["sha256"]})
    ckpt.unlink(missing_ok=True)  # the adapter is written and stamped: the training state is no longer needed
    log(f"lora: wrote {weights} (loss {info['loss_first_10pct']:.4f} -> {info['loss_last_10pct']:.4f}, "
        f"{train_s:.1f}s)")
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return info


# ----------------------------------------------------------------------------------------------
# Cost before spending, and the share of trainable parameters of a real UNet layout.


def estimate(job, pipe_loader: Callable, calib_steps: int = 2, images=None) -> dict:
    """Images, UNet evaluations and an estimated time for the stage, from ``calib_steps`` timed training steps.

    ``pipe_loader()`` returns a fresh fp32 pipeline on the stage's device. A training UNet evaluation is a
    forward and a backward pass of one image. Nothing is written.
    """
    from distillery.images import unlabeled_set

    cfg = job.teacher.lora
    image_set = images if images is not None else unlabeled_set(job, record=False)
    images = image_set.paths
    evals = cfg.steps * cfg.grad_accum * cfg.batch_size
    row = {"stage": "lora", "images": len(images), "unet_evals": evals, "evals_note": "fwd+bwd"}
    paths = RunPaths(job.run_path)
    done = is_done(paths.lora, "lora", stage_key(lora_settings(job), extra=list(image_set.sha256)),
                   [paths.lora_weights, paths.lora_loss])
    if done:
        return {**row, "unet_evals": 0, "estimate_s": 0.0, "note": "up to date"}
    t0 = time.perf_counter()
    pipe = pipe_loader()
    load_s = time.perf_counter() - t0
    add_lora(pipe.unet, cfg.rank, cfg.alpha, seed=lora_seed(job))
    stamps: list[float] = []
    train_lora(pipe, images, caption(job), cfg, train_resolution(job), lora_seed(job), steps=calib_steps + 1,
               progress=False, on_step=lambda i, _: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[0]) / calib_steps  # the first step (warm-up) is left out
    return {**row, "estimate_s": load_s + cfg.steps * per_step, "s_per_unet_eval": per_step /
            (cfg.grad_accum * cfg.batch_size), "calibration": f"{calib_steps} steps after 1 warm-up"}


SD15_UNET_CONFIG = {  # Stable Diffusion 1.x UNet (runwayml / stable-diffusion-v1-5 unet/config.json)
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def sd15_trainable_share(rank: int = 8, alpha: float = 8.0) -> dict:
    """LoRA parameter counts for SD 1.5's UNet layout, built on the meta device (no weights, no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        return add_lora(unet, rank, alpha)

