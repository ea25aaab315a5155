"""Synthetic images per class with the diversity "bag of tricks" (SPEC §1, DDN paper).

Each trick is a generator of (prompt, guidance, seed) per image. Every image gets its own seed,
derived from (job seed, class, trick, index), and every row of ``synthetic.parquet`` records what
regenerates it. Generation runs a short classifier-free-guidance DDIM loop over the pipeline's own
components, so that the guidance scale can differ per image inside one batch (the stock pipeline
takes one scale per call); at a constant scale it equals the stock pipeline.

Resumable: images are written under a temporary name and renamed, each finished image is logged
with its sha256, and a rerun regenerates only rows whose file is missing or whose hash differs.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distillery import killpoints
from distillery.rundir import (RunPaths, atomic_path, is_done, log, mark_done, read_table, save_resolved_job,
                               settings_hash, sha256_file, stage_key, write_table)

# SPEC §1: the ten general domains and the satellite form with its five styles.
GENERAL_DOMAINS = ("photo", "drawing", "painting", "sketch", "collage", "poster", "digital art image",
                   "rock drawing", "stick figure", "3D rendering")
SATELLITE_STYLES = ("realistic photo", "drawing", "painting", "sketch", "3D rendering")
RANDOM_GUIDANCE_RANGE = (1.0, 5.0)
ALL_TRICKS = ("base", "class_prompt", "multi_domain", "random_guidance")
TRICK_NAMES = ALL_TRICKS + ("all",)  # what teacher.synth.tricks accepts


@dataclass
class PlannedImage:
    class_index: int
    class_name: str
    trick: str
    index: int  # index within (class, trick)
    prompt: str
    negative_prompt: str
    guidance: float
    steps: int
    seed: int
    relpath: str  # relative to the teacher folder
    full_relpath: str | None = None  # the full-resolution original, kept when output_size shrinks the image


def image_seed(job_seed: int, class_name: str, trick: str, index: int) -> int:
    """A distinct, reproducible 63-bit seed per image."""
    h = hashlib.sha256(f"{job_seed}|{class_name}|{trick}|{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def safe_name(text: str, max_len: int = 40) -> str:
    """A path-safe ASCII slug of a class name (spaces, slashes, unicode and shell characters removed)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return text[:max_len] or "class"


def is_satellite(domain: str) -> bool:
    return "satellite" in domain.lower() or "aerial" in domain.lower()


def expand_tricks(tricks: list[str], domain: str | None = None) -> list[str]:
    """Resolve ``all`` into the individual tricks.

    ``class_prompt`` ("{class}" alone) is part of ``all`` only when the job sets no domain word (``domain: null``,
    the default): SPEC §1, it hurts ambiguous class names, and a domain word is what disambiguates them. List
    ``class_prompt`` explicitly to have it with a domain word too (DDN's best CIFAR-10 result included it).
    """
    out: list[str] = []
    for t in tricks:
        if t == "all":
            sub = [x for x in ALL_TRICKS if not (x == "class_prompt" and domain)]
        else:
            sub = [t]
        out += [x for x in sub if x not in out]
    return out


def trick_prompt(trick: str, class_name: str, index: int, domain: str) -> str:
    """The prompt of the ``index``-th image of a class under a trick, exactly as SPEC §1 writes it."""
    if trick in ("base", "random_guidance"):
        return f"an image of a {class_name}"
    if trick == "class_prompt":
        return class_name
    if trick == "multi_domain":
        if is_satellite(domain):
            style = SATELLITE_STYLES[index % len(SATELLITE_STYLES)]
            return f"a satellite photo of a {class_name} in the style of a {style}"
        return f"a {GENERAL_DOMAINS[index % len(GENERAL_DOMAINS)]} of a {class_name}"
    raise ValueError(f"unknown trick {trick!r}; choose from {', '.join(TRICK_NAMES)}")


def trick_guidance(trick: str, seed: int, default: float) -> float:
    """random_guidance draws the scale per image, uniform in [1, 5], from the image's own seed."""
    if trick == "random_guidance":
        lo, hi = RANDOM_GUIDANCE_RANGE
        return float(np.random.default_rng(seed).uniform(lo, hi))
    return float(default)


def full_size_tricks(job) -> list[str]:
    """The tricks whose full-resolution originals are kept (``teacher.synth.keep_full_size``; by default the
    ones AiR builds its prototypes from, when AiR runs and ``output_size`` shrinks the images)."""
    s = job.teacher.synth
    if s.output_size is None or s.output_size == s.resolution:
        return []
    kept = s.keep_full_size
    if kept is None:
        from .base import TEACHERS, teachers_to_run

        kept = list(job.teacher.settings("air").prototype_tricks) if "air" in TEACHERS and \
            "air" in teachers_to_run(job) else []
    tricks = expand_tricks(s.tricks, job.domain)
    return tricks if "all" in kept else [t for t in tricks if t in kept]


def plan(job) -> list[PlannedImage]:
    """Every image the job asks for, in a stable order."""
    s = job.teacher.synth
    full = set(full_size_tricks(job))
    rows = []
    for ci, c in enumerate(job.classes):
        folder = f"{ci:03d}-{safe_name(c.name)}"
        for trick in expand_tricks(s.tricks, job.domain):
            for i in range(s.images_per_class):
                seed = image_seed(job.seed, c.name, trick, i)
                rows.append(PlannedImage(
                    class_index=ci, class_name=c.name, trick=trick, index=i,
                    prompt=trick_prompt(trick, c.name, i, job.domain_phrase), negative_prompt=s.negative_prompt,
                    guidance=trick_guidance(trick, seed, s.guidance), steps=s.steps, seed=seed,
                    relpath=f"synthetic/{folder}/{trick}/{i:05d}.png",
                    full_relpath=f"synthetic_full/{folder}/{trick}/{i:05d}.png" if trick in full else None,
                ))
    return rows


# ----------------------------------------------------------------------------------------------
# The per-image-guidance denoising loop.


def generate(pipe, prompts: list[str], guidance: list[float], seeds: list[int], steps: int,
             negative_prompt: str | list[str] = "", resolution: int | None = None):
    """Classifier-free guidance DDIM (eta 0) with one guidance scale and one seed per image.

    Returns images as a float tensor (B, 3, H, W) in [0, 1]. Uses the pipeline's own text encoder,
    UNet, VAE and a DDIM scheduler built from the pipeline's scheduler config.
    """
    import torch
    from diffusers import DDIMScheduler

    device = pipe.unet.device
    dtype = pipe.unet.dtype
    n = len(prompts)
    if not (len(guidance) == len(seeds) == n):
        raise ValueError(f"generate: got {n} prompts, {len(guidance)} guidance values and {len(seeds)} seeds; "
                         "give one of each per image.")
    neg = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=neg)
        text = torch.cat([uncond, cond])  # (2B, L, D): unconditional first, as the pipeline does
        shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
        latents = (latents.to(device=device, dtype=dtype)) * scheduler.init_noise_sigma
        g = torch.tensor(guidance, device=device, dtype=dtype).view(n, 1, 1, 1)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise = pipe.unet(model_in, t, encoder_hidden_states=text).sample
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + g * (noise_text - noise_uncond)
            latents = scheduler.step(noise, t, latents, eta=0.0).prev_sample
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images, output_size: int | None, antialias: bool):
    """(B,3,H,W) floats in [0,1] -> PIL images, optionally resized (anti-aliased or not, SPEC §1)."""
    import torch.nn.functional as F
    from PIL import Image

    if output_size is not None and images.shape[-1] != output_size:
        images = F.interpolate(images, size=(output_size, output_size), mode="bilinear", antialias=antialias,
                               align_corners=False).clamp(0, 1)
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


# ----------------------------------------------------------------------------------------------
# The stage.


def _progress_log(paths: RunPaths) -> Path:
    return paths.teacher / ".synthetic.progress.jsonl"


def _recorded(paths: RunPaths) -> dict[str, tuple[str, str | None, str | None]]:
    """relpath -> (sha256, recipe, sha256 of the full-size original or None) for every image a previous
    (possibly interrupted) run finished."""
    done: dict[str, tuple[str, str | None, str | None]] = {}
    if paths.synthetic.is_file():
        for r in read_table(paths.synthetic):
            done[r["relpath"]] = (r["sha256"], r.get("recipe"), r.get("full_sha256"))
    logf = _progress_log(paths)
    if logf.is_file():
        for line in logf.read_text().splitlines():
            try:
                r = json.loads(line)
                done[r["relpath"]] = (r["sha256"], r.get("recipe"), r.get("full_sha256"))
            except (ValueError, KeyError):
                continue  # a line cut short by a crash
    return done


def image_recipe(p: PlannedImage, job, lora_sha: str | None) -> str:
    """Hash of everything that determines an image's pixels; an image made from another recipe is regenerated
    (e.g. after new LoRA weights or a changed step count: the file names do not change with them)."""
    s = job.teacher.synth
    return settings_hash(p.prompt, p.negative_prompt, p.guidance, p.steps, p.seed, job.models.diffusion, lora_sha,
                         s.resolution, s.output_size, s.antialias)


def pending(job, planned: list[PlannedImage], lora_sha: str | None) -> list[PlannedImage]:
    """The planned images not on disk as recorded: file missing, sha256 differs, or made from another recipe."""
    paths = RunPaths(job.run_path)
    recorded = _recorded(paths)
    out = []
    for p in planned:
        f = paths.teacher / p.relpath
        rec = recorded.get(p.relpath)
        ok = rec and f.is_file() and rec[1] == image_recipe(p, job, lora_sha) and rec[0] == sha256_file(f)
        if ok and p.full_relpath:  # the full-size original is wanted too, as recorded
            full = paths.teacher / p.full_relpath
            ok = rec[2] is not None and full.is_file() and rec[2] == sha256_file(full)
        if not ok:
            out.append(p)
    return out


def synth_settings(job, lora_sha: str | None = None) -> dict:
    return {"synth": asdict(job.teacher.synth), "classes": job.class_names, "domain": job.domain,
            "seed": job.seed, "diffusion": job.models.diffusion, "lora": lora_sha}


def _synth_worker(diffusion: str, device: str, half: bool, lora_file: str | None, steps: int, resolution: int,
                  output_size: int | None, antialias: bool):
    """Runs where the model lives: load the pipeline (and LoRA) once, then turn batches of planned images into
    (PNG bytes, PNG bytes of the full-size original or None) per image, in order."""
    import io

    from distillery.models import load_diffusion

    from .lora import load_lora

    pipe = load_diffusion(diffusion, device=device, half=half)
    if lora_file:
        load_lora(pipe, Path(lora_file))

    def png(im) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def fn(batch: list[PlannedImage]) -> list[tuple[bytes, bytes | None]]:
        images = generate(pipe, [p.prompt for p in batch], [p.guidance for p in batch], [p.seed for p in batch],
                          steps, [p.negative_prompt for p in batch], resolution=resolution)
        small = to_pil(images, output_size, antialias)
        full = to_pil(images, None, antialias) if any(p.full_relpath for p in batch) else [None] * len(batch)
        return [(png(s), png(f) if p.full_relpath else None) for p, s, f in zip(batch, small, full)]

    return fn


def run_synth(job, progress: bool = True, executor=None) -> dict:
    """Generate (or complete) the synthetic set and write ``synthetic.parquet`` and ``grids/<trick>.png``.

    Uses the domain LoRA (``teacher/lora/``) when it is present and ``teacher.lora.enabled``. The images are
    made through ``executor`` (per-batch map where the model lives); this driver writes each file as it
    arrives (temporary name, then rename) and logs it, so a crash keeps every finished image.
    """
    from functools import partial

    from distillery.executor import get_executor

    from .lora import active_lora

    paths = RunPaths(job.run_path)
    s = job.teacher.synth
    lora_file = active_lora(job)
    lora_sha = sha256_file(lora_file) if lora_file else None
    key = stage_key(synth_settings(job, lora_sha))
    planned = plan(job)
    todo = pending(job, planned, lora_sha)
    if not todo and is_done(paths.teacher, "synth", key, [paths.synthetic]):
        log(f"synth: up to date ({len(planned)} images in {paths.synthetic})")
        if s.grid_samples and not all(paths.grid(t).is_file() for t in expand_tricks(s.tricks, job.domain)):
            write_grids(job, read_table(paths.synthetic))
        return {"images": len(planned), "generated": 0}
    log(f"synth: {len(planned)} images planned, {len(planned) - len(todo)} already on disk, generating {len(todo)}"
        + (f" with the domain LoRA {lora_file}" if lora_file else ""))
    paths.teacher.mkdir(parents=True, exist_ok=True)
    save_resolved_job(job, paths.teacher)
    for folder in (paths.synthetic_dir, paths.teacher / "synthetic_full"):
        for stale in folder.rglob(".*.tmp*") if folder.is_dir() else []:
            stale.unlink(missing_ok=True)  # a half-written image of a killed run (atomic_path's temporary name)
    t0 = time.perf_counter()
    if todo:
        from distillery.models import pick_device

        device = pick_device(s.device, key="teacher.synth.device")
        make_fn = partial(_synth_worker, job.models.diffusion, device, s.half, str(lora_file) if lora_file else None,
                          s.steps, s.resolution, s.output_size, s.antialias)
        executor = executor or get_executor(job)
        with open(_progress_log(paths), "a", encoding="utf-8") as logf:
            for batch, pngs in executor.map_batches(make_fn, todo, s.batch_size, desc="synth", progress=progress):
                for p, (png, full_png) in zip(batch, pngs):
                    full_sha = None
                    if full_png is not None:  # the original first: a logged row always has both files
                        full = paths.teacher / p.full_relpath
                        with atomic_path(full) as tmp:
                            tmp.write_bytes(full_png)
                        full_sha = sha256_file(full)
                    dest = paths.teacher / p.relpath
                    with atomic_path(dest) as tmp:
                        tmp.write_bytes(png)
                    logf.write(json.dumps({"relpath": p.relpath, "sha256": sha256_file(dest),
                                           "recipe": image_recipe(p, job, lora_sha), "full_sha256": full_sha}) + "\n")
                    logf.flush()
                    killpoints.progress("synth.image")  # testing hook: after the k-th image of this process
                killpoints.progress("synth.batch")
    elapsed = time.perf_counter() - t0
    recorded = _recorded(paths)
    rows = []
    for p in planned:
        d = asdict(p)
        d["path"] = str((paths.teacher / p.relpath).resolve())
        d["sha256"], d["recipe"], d["full_sha256"] = recorded[p.relpath]
        d["full_path"] = str((paths.teacher / p.full_relpath).resolve()) if p.full_relpath else None
        if not p.full_relpath:
            d["full_sha256"] = None
        d["model"] = job.models.diffusion
        d["lora"] = lora_sha  # sha256 of teacher/lora/pytorch_lora_weights.safetensors, None without LoRA
        d["resolution"] = s.resolution
        d["output_size"] = s.output_size
        d["antialias"] = s.antialias
        rows.append(d)
    write_table(paths.synthetic, rows, relative_to=paths.root)
    killpoints.progress("synth.table")
    _progress_log(paths).unlink(missing_ok=True)
    write_grids(job, rows)
    mark_done(paths.teacher, "synth", key, {"images": len(rows)})
    info = {"images": len(planned), "generated": len(todo), "seconds": round(elapsed, 2),
            "images_per_s": round(len(todo) / elapsed, 3) if todo and elapsed > 0 else None,
            "unet_evals": len(todo) * s.steps * 2, "lora": lora_sha}
    log(f"synth: wrote {paths.synthetic} ({info})")
    return info


def write_grids(job, rows: list[dict]) -> list[Path]:
    """One picture per trick, ``teacher/grids/<trick>.png``: a row per class, up to ``grid_samples`` images."""
    from .report import image_grid

    s = job.teacher.synth
    if not s.grid_samples:
        return []
    out = []
    paths = RunPaths(job.run_path)
    for trick in expand_tricks(s.tricks, job.domain):
        cells = [[r["path"] for r in rows if r["trick"] == trick and r["class_name"] == c and r["index"] < s.grid_samples]
                 for c in job.class_names]
        img = image_grid(cells, job.class_names, title=trick)
        dest = paths.grid(trick)
        with atomic_path(dest) as tmp:
            img.save(tmp, format="PNG")
        out.append(dest)
    return out


# ----------------------------------------------------------------------------------------------
# Cost before spending.


def estimate(job, lora_pending: bool = False) -> dict:
    """Images, UNet evaluations and an estimated time for the stage, from a short timed calibration.

    The calibration generates one batch of the configured size at 1 and at 3 steps (after a 1-step
    warm-up): the difference gives the time of a denoising step, the rest the fixed cost of a batch
    (text encoding, VAE decode). ``lora_pending``: a LoRA will be (re)trained first, so every image
    will be regenerated with it. Nothing is written.
    """
    import math

    from distillery.models import load_diffusion, pick_device

    from .lora import active_lora, add_lora, load_lora

    s = job.teacher.synth
    planned = plan(job)
    lora_file = None if lora_pending else active_lora(job)
    todo = planned if lora_pending else pending(job, planned, sha256_file(lora_file) if lora_file else None)
    row = {"stage": "synth", "images": len(todo), "planned": len(planned), "unet_evals": len(todo) * s.steps * 2,
           "evals_note": "fwd, x2 for guidance"}
    if not todo:
        return {**row, "estimate_s": 0.0, "note": "up to date"}
    t0 = time.perf_counter()
    pipe = load_diffusion(job.models.diffusion, device=pick_device(s.device, key="teacher.synth.device"), half=s.half)
    if lora_file:
        load_lora(pipe, lora_file)
    elif lora_pending:  # a fresh adapter of the configured shape costs what the trained one will
        add_lora(pipe.unet, job.teacher.lora.rank, job.teacher.lora.alpha)
    load_s = time.perf_counter() - t0
    batch = todo[: s.batch_size]
    args = ([p.prompt for p in batch], [p.guidance for p in batch], [p.seed for p in batch])

    def timed(steps: int) -> float:
        t = time.perf_counter()
        generate(pipe, *args, steps, [p.negative_prompt for p in batch], resolution=s.resolution)
        return time.perf_counter() - t

    timed(1)  # warm-up (allocator, kernels)
    t1, t3 = timed(1), timed(3)
    t_step = (t3 - t1) / 2
    if t_step <= 0:  # timing noise on a busy machine: charge everything to the steps
        t_step, t_fixed = t3 / 3, 0.0
    else:
        t_fixed = max(t1 - t_step, 0.0)
    n_batches = math.ceil(len(todo) / s.batch_size)
    est = load_s + n_batches * (t_fixed + s.steps * t_step)
    return {**row, "estimate_s": est, "s_per_unet_eval": t_step / (2 * len(batch)), "load_s": load_s,
            "batch_fixed_s": t_fixed, "calibration": f"1 batch of {len(batch)} at 1 and 3 steps"}
