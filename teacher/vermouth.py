"""Vermouth (SPEC §5): frozen Stable Diffusion UNet features + U-head (+ adapted expert), trained on the
synthetic set, predicting every real image.

Per image (:class:`DiffusionFeaturizer`):

1. the image at ``resolution`` px (shorter side, bicubic, centre crop; SPEC 256) -> VAE latent mean ×
   scaling factor -> DDPM noise at timestep ``t`` (SPEC 200), the same noise draw (``noise_seed``) for every
   image, so a feature depends on the image and the settings only, never on the batch it came in;
2. ONE conditional UNet pass, conditioned on a **label-free** prompt ("a {domain}", never a class name; the
   paper conditions on BLIP captions, its public few-shot code on the ground-truth class prompt, which
   is the label leak SPEC §5 forbids);
3. forward hooks on the mid block and every up block; blocks of the same spatial side are concatenated
   into one level (:func:`feature_shapes`: SD 1.5 at 256 px gives mid 1280 @ 4, up0 1280 @ 8,
   up1 1280 @ 16, up2 640 ⊕ up3 320 = 960 @ 32).

The maps are cached in the shared feature store (``teacher/features/vermouth-*``), flattened into one row
per image; levels wider than ``max_side`` are average-pooled to ``max_side`` before storing (default 16:
SD 1.5's 32 px level is stored at 16 px, 2.7 MB per image instead of 5.6 MB; the tiny UNet's levels are
4 and 8 px and stored whole). The frozen expert's layer2/3/4 maps have a store of their own
(``vermouth_expert-*``), each stored at the side of the level it joins.

The U-head (:func:`build_head`): from the finest level to the coarsest, Conv1×1 (no bias) → GroupNorm →
SiLU blocks of widths ``head_width`` × (1, 2, 3, 4) (SPEC 256 → 512 → 768 → 1024), each block's output
average-pooled to the next level's side and concatenated with it; AdaptiveAvgPool 4×4; attention pooling
to the CLIP text width. Expert maps go through a residual adapter (Conv1×1 C → C/4, ReLU, Conv1×1 → C),
are L2-normalised per position and concatenated with the diffusion maps of their level. Classifier:
logits = cos(v, t_c) / 0.2 with t_c the CLIP template-ensemble text embedding of class c (``clip.py``'s
:func:`class_weights`), cross-entropy on the synthetic images' generating class.

With ``train_unet_norms`` (the paper's segmentation setting) the UNet's parameters named "norm" train too;
the features then change every step, so they are recomputed for every batch and not cached.
"""
from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .base import TeacherResult, TeacherSettings, register_teacher
from .clip import ClipCfg

KEY = "teacher.vermouth"
VERSION = "1"  # enters the feature-store key: bump when the features' computation changes
CROSS_ATTENTION_NOTE = "cross-attention maps are not implemented (SPEC: optional; paper Table 5e: mixed results)"


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class VermouthSettings(TeacherSettings):
    resolution: int = 256  # image side fed to the VAE, px (SPEC 256; the tiny job uses 64)
    timestep: int = 200  # DDPM noise level t of the one UNet pass (SPEC / paper: 200)
    noise_seed: int | None = None  # seed of the fixed noise draw (the same for every image); None = the job seed
    prompt: str = "a {domain}"  # label-free UNet condition; only {domain} may appear, never a class name
    max_side: int = 16  # cached maps wider than this are average-pooled to it (0 = store them whole)
    head_width: int = 256  # U-head widths head_width x (1, 2, 3, 4 ...), finest level first (SPEC 256 -> 1024)
    expert: bool = True  # adapted expert: models.expert stages through adapters, concatenated per level
    expert_layers: list[int] = field(default_factory=lambda: [2, 3, 4])  # expert stages used (timm out_indices)
    adapter_reduction: int = 4  # expert adapter bottleneck C -> C/r -> C (SPEC: 4)
    templates: list[str] = field(default_factory=lambda: list(ClipCfg().templates))  # class texts, {c} {domain}
    temperature: float = 0.2  # logits = cos(v, t_c) / temperature (SPEC / paper: 0.2)
    epochs: int = 10  # passes over the synthetic set
    batch_size: int = 64  # training images per step (paper: 64)
    lr: float = 1e-4  # AdamW learning rate (paper 1e-5 over 100 epochs; the head starts random here)
    weight_decay: float = 5e-4  # AdamW weight decay (paper Table 7)
    train_unet_norms: bool = False  # also train UNet params named "norm" (paper); no feature cache then, slow on CPU
    real_pseudo_labels: float = 0.0  # also train on the real images whose pseudo-label (argmax of pseudo_label_column) has at least this probability; 0 = synthetic images only
    pseudo_label_column: str = "clip"  # where those pseudo-labels come from: a column of a teacher that runs before Vermouth
    feature_batch_size: int = 16  # images per VAE + UNet batch when computing features
    seed: int | None = None  # head initialisation and data order; None = the job seed

    def reads(self) -> list[str]:
        return [self.pseudo_label_column] if self.real_pseudo_labels > 0 else []

    def check(self, key: str = KEY) -> None:
        def bad(name: str, value: Any, fix: str) -> ValueError:
            return ValueError(f"{key}.{name}: {value!r} {fix}")

        if not 0.0 <= self.real_pseudo_labels <= 1.0:
            raise bad("real_pseudo_labels", self.real_pseudo_labels, "must be a probability in [0, 1] (0 = train on "
                      "the synthetic images only).")

        if self.resolution < 8 or self.resolution % 8:
            raise bad("resolution", self.resolution, "must be a positive multiple of 8 (the VAE's downsampling); "
                      "SPEC uses 256.")
        if not 0 <= self.timestep < 1000:
            raise bad("timestep", self.timestep, "must be in [0, 1000) (the DDPM training range); SPEC uses 200.")
        if "{c}" in self.prompt or "{class" in self.prompt:
            raise bad("prompt", self.prompt, "names the class: the UNet condition must be label-free (SPEC §5); "
                      "use a class-agnostic prompt such as 'a {domain}'.")
        try:
            self.prompt.format(domain="x")
        except (KeyError, IndexError, ValueError) as e:
            raise bad("prompt", self.prompt, f"is not a usable template ({type(e).__name__}: {e}); the only "
                      "placeholder is {domain}.") from e
        if self.max_side < 0:
            raise bad("max_side", self.max_side, "must be >= 0 (0 stores the feature maps whole).")
        if self.head_width < 1:
            raise bad("head_width", self.head_width, "must be >= 1 (SPEC: 256).")
        if not self.expert_layers or any(int(i) < 0 for i in self.expert_layers):
            raise bad("expert_layers", self.expert_layers, "must list stage indices >= 0 (ResNet: [2, 3, 4]).")
        if self.adapter_reduction < 1:
            raise bad("adapter_reduction", self.adapter_reduction, "must be >= 1 (SPEC: 4).")
        if not self.templates:
            raise bad("templates", self.templates, "is empty; give at least one such as 'a photo of a {c}.'.")
        for t in self.templates:
            try:
                t.format(c="x", domain="y")
            except (KeyError, IndexError, ValueError) as e:
                raise bad("templates", t, f"is not a usable template ({type(e).__name__}: {e}); the "
                          "placeholders are {c} and {domain}.") from e
        if not self.temperature > 0:
            raise bad("temperature", self.temperature, "must be > 0 (SPEC: 0.2).")
        for name in ("epochs", "batch_size", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "must be >= 1.")
        if not self.lr > 0:
            raise bad("lr", self.lr, "must be > 0 (e.g. 1e-4).")
        if self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, "must be >= 0 (paper: 5e-4).")


# ----------------------------------------------------------------------------------------------
# Feature levels, from the UNet's config alone


@dataclass(frozen=True)
class Level:
    """One feature level: the UNet blocks whose outputs share a spatial side, concatenated."""

    side: int  # spatial side the UNet computes it at (latent px)
    blocks: tuple[str, ...]  # "mid", "up0", ... in concatenation order
    widths: tuple[int, ...]  # channels of each block

    @property
    def channels(self) -> int:
        return sum(self.widths)


def feature_shapes(unet_config, resolution: int, vae_scale_factor: int = 8) -> list[Level]:
    """The levels one UNet pass gives for an image of ``resolution`` px, finest first.

    Hooked blocks: the mid block (``block_out_channels[-1]`` at the bottom side) and every up block
    (``reversed(block_out_channels)[i]``; every up block but the last upsamples ×2), grouped by side.
    SD 1.5 at 256 px: [32 px: up2 640 + up3 320], [16: up1 1280], [8: up0 1280], [4: mid 1280].
    """
    cfg = dict(unet_config)
    boc = [int(c) for c in cfg["block_out_channels"]]
    n = len(boc)
    if resolution % vae_scale_factor:
        raise ValueError(f"{KEY}.resolution: {resolution} is not a multiple of the VAE's downsampling "
                         f"{vae_scale_factor}; use a multiple of {vae_scale_factor * 2 ** (n - 1)}.")
    latent = resolution // vae_scale_factor
    if latent % 2 ** (n - 1):
        raise ValueError(f"{KEY}.resolution: {resolution} px gives a {latent} px latent, which the UNet's "
                         f"{n - 1} downsamplings cannot halve evenly; use a multiple of "
                         f"{vae_scale_factor * 2 ** (n - 1)}.")
    side = latent // 2 ** (n - 1)
    hooked: list[tuple[str, int, int]] = []
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        hooked.append(("mid", boc[-1], side))
    for i, width in enumerate(reversed(boc)):
        if i < n - 1:
            side *= 2
        hooked.append((f"up{i}", width, side))
    by_side: dict[int, list[tuple[str, int]]] = {}
    for name, width, s in hooked:
        by_side.setdefault(s, []).append((name, width))
    return [Level(s, tuple(b for b, _ in parts), tuple(w for _, w in parts))
            for s, parts in sorted(by_side.items(), reverse=True)]


def stored_side(side: int, max_side: int) -> int:
    """The side a map of ``side`` px is cached at (``max_side`` 0 = whole)."""
    return min(side, max_side) if max_side > 0 else side


def row_layout(channels: Sequence[int], sides: Sequence[int]) -> list[tuple[int, int]]:
    """Offsets (start, end) of each (C, side, side) map in a flattened feature row."""
    out, start = [], 0
    for c, s in zip(channels, sides):
        out.append((start, start + c * s * s))
        start += c * s * s
    return out


def split_row(rows, channels: Sequence[int], sides: Sequence[int]) -> list:
    """(B, D) rows (numpy or torch) -> a list of (B, C, s, s) maps (views, no copies)."""
    return [rows[:, a:b].reshape(len(rows), c, s, s)
            for (a, b), c, s in zip(row_layout(channels, sides), channels, sides)]


def match_levels(expert_sides: Sequence[int], level_sides: Sequence[int]) -> list[int]:
    """For each expert map, the level it joins: the one with the nearest side (log scale; finer on ties).
    ResNet-18 at 256 px (32, 16, 8) -> SD 1.5's levels (32, 16, 8, 4): [0, 1, 2]."""
    return [min(range(len(level_sides)), key=lambda i: (abs(math.log2(level_sides[i] / s)), i))
            for s in expert_sides]


def group_count(width: int, groups: int = 32) -> int:
    """GroupNorm groups for ``width`` channels: 32 where it divides, else the largest common divisor."""
    return math.gcd(width, groups)


def head_widths(head_width: int, n_levels: int) -> list[int]:
    return [head_width * (i + 1) for i in range(n_levels)]


def attention_heads(dim: int, head_dim: int = 64) -> int:
    """Heads for attention pooling over ``dim`` channels: about ``dim / 64``, dividing ``dim``."""
    h = max(1, dim // head_dim)
    while dim % h:
        h -= 1
    return h


# ----------------------------------------------------------------------------------------------
# Label-free conditioning


def condition_prompt(cfg: VermouthSettings, job) -> str:
    """The one text the UNet is conditioned on: ``cfg.prompt`` with the domain; never a class name."""
    return cfg.prompt.format(domain=job.domain_phrase)


# ----------------------------------------------------------------------------------------------
# Diffusion features


def load_pixels(paths: Sequence[str], resolution: int):
    """Images -> (B, 3, R, R) in [-1, 1] (the LoRA's loader: shorter side bicubic, centre crop, no flip)."""
    from .lora import load_batch

    return load_batch([Path(p) for p in paths], resolution, [False] * len(paths))


class DiffusionFeaturizer:
    """One conditional UNet pass at a fixed noise level with hooks on the mid and up blocks."""

    def __init__(self, pipe, levels: list[Level], prompt: str, timestep: int, seed: int, resolution: int,
                 max_side: int):
        import torch
        from diffusers import DDPMScheduler

        self.pipe, self.levels, self.resolution, self.max_side = pipe, levels, resolution, max_side
        self.unet, self.vae = pipe.unet, pipe.vae
        self.device = self.unet.device
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if not 0 <= timestep < self.scheduler.config.num_train_timesteps:
            raise ValueError(f"{KEY}.timestep: {timestep} is outside the scheduler's range [0, "
                             f"{self.scheduler.config.num_train_timesteps}).")
        self.timestep = timestep
        with torch.no_grad():
            self.cond = pipe.encode_prompt([prompt], self.device, 1, False)[0]  # (1, L, D)
        latent = resolution // pipe.vae_scale_factor
        gen = torch.Generator("cpu").manual_seed(int(seed))
        self.noise = torch.randn((1, self.unet.config.in_channels, latent, latent), generator=gen).to(self.device)
        self._out: dict[str, Any] = {}
        self._hooks = []
        blocks = {"mid": self.unet.mid_block, **{f"up{i}": b for i, b in enumerate(self.unet.up_blocks)}}
        for name in [b for lv in levels for b in lv.blocks]:
            self._hooks.append(blocks[name].register_forward_hook(self._keep(name)))

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self._out[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def latents(self, pixels):
        import torch

        with torch.no_grad():
            mean = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean.float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean - shift) * self.vae.config.scaling_factor

    def __call__(self, pixels) -> list:
        """(B, 3, R, R) in [-1, 1] -> per level (B, C, s, s) float32 maps, pooled to ``max_side``; gradients flow
        into the UNet's trainable parameters when grad is enabled."""
        import torch
        import torch.nn.functional as F

        z0 = self.latents(pixels)
        b = len(z0)
        t = torch.full((b,), self.timestep, dtype=torch.long, device=self.device)
        zt = self.scheduler.add_noise(z0, self.noise.expand_as(z0), t)
        self._out.clear()
        self.unet(zt.to(self.unet.dtype), t, encoder_hidden_states=self.cond.expand(b, -1, -1).to(self.unet.dtype))
        maps = []
        for lv in self.levels:
            m = torch.cat([self._out[name].float() for name in lv.blocks], dim=1)
            s = stored_side(lv.side, self.max_side)
            if m.shape[-1] != lv.side or m.shape[1] != lv.channels:
                raise RuntimeError(f"{KEY}: level {lv.blocks} came out {tuple(m.shape[1:])}, expected "
                                   f"({lv.channels}, {lv.side}, {lv.side}); the UNet is not SD-like.")
            maps.append(F.adaptive_avg_pool2d(m, s) if s != lv.side else m)
        self._out.clear()
        return maps

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def load_pipe(ref: str, lora_file: str | None, device: str):
    from distillery.models import load_diffusion

    pipe = load_diffusion(ref, device=device, half=False)
    if lora_file:
        from .lora import load_lora

        load_lora(pipe, lora_file)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.eval()
    return pipe


def _diffusion_encode_fn(ref: str, lora_file: str | None, device: str, resolution: int, timestep: int, seed: int,
                         prompt: str, max_side: int) -> Callable[[list[str]], np.ndarray]:
    """Runs where the model lives: load the pipeline (+ LoRA) once, then image files -> flattened feature rows."""
    import torch

    pipe = load_pipe(ref, lora_file, device)
    levels = feature_shapes(pipe.unet.config, resolution, pipe.vae_scale_factor)
    feat = DiffusionFeaturizer(pipe, levels, prompt, timestep, seed, resolution, max_side)

    def encode(paths: list[str]) -> np.ndarray:
        with torch.no_grad():
            maps = feat(load_pixels(paths, resolution))
        return torch.cat([m.flatten(1) for m in maps], 1).cpu().numpy()

    return encode


# ----------------------------------------------------------------------------------------------
# Expert features (frozen timm model, features_only)


def load_expert_features(ref: str, layers: Sequence[int], device: str):
    from distillery.models import load_expert

    model = load_expert(ref, device=device, features_only=True, out_indices=tuple(int(i) for i in layers))
    model.requires_grad_(False)
    return model.eval()


def expert_pixels(paths: Sequence[str], resolution: int, mean, std):
    import torch

    x = (load_pixels(paths, resolution) + 1) / 2
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _expert_encode_fn(ref: str, layers: tuple[int, ...], device: str, resolution: int,
                      sides: tuple[int, ...]) -> Callable[[list[str]], np.ndarray]:
    """Runs where the model lives: the frozen expert's stage maps, each resized to its level's stored side."""
    import torch
    import torch.nn.functional as F

    model = load_expert_features(ref, layers, device)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]

    def encode(paths: list[str]) -> np.ndarray:
        with torch.no_grad():
            maps = model(expert_pixels(paths, resolution, mean, std).to(device))
            maps = [F.adaptive_avg_pool2d(m.float(), s) for m, s in zip(maps, sides)]
        return torch.cat([m.flatten(1) for m in maps], 1).cpu().numpy()

    return encode


# ----------------------------------------------------------------------------------------------
# The U-head and the adapted expert


@functools.lru_cache(maxsize=None)
def _nn():
    """The torch modules, built on first use (importing this module needs no torch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Adapter(nn.Module):
        """x + Conv1×1(C/r → C)(ReLU(Conv1×1(C → C/r)(x))); the up-projection starts at zero (identity)."""

        def __init__(self, channels: int, reduction: int = 4):
            super().__init__()
            hidden = max(1, channels // reduction)
            self.down = nn.Conv2d(channels, hidden, 1)
            self.up = nn.Conv2d(hidden, channels, 1)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, x):
            return x + self.up(F.relu(self.down(x)))

    class AttentionPool(nn.Module):
        """CLIP-style attention pooling: the mean token attends over the (side²) positions, projected to out_dim."""

        def __init__(self, side: int, dim: int, out_dim: int):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(side * side + 1, dim) / dim ** 0.5)
            self.attn = nn.MultiheadAttention(dim, attention_heads(dim), batch_first=True)
            self.proj = nn.Linear(dim, out_dim)

        def forward(self, x):
            x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
            x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.pos
            out, _ = self.attn(x[:, :1], x, x, need_weights=False)
            return self.proj(out[:, 0])

    class UHead(nn.Module):
        """Top-down fusion of the levels (finest first) + adapted expert -> (B, out_dim)."""

        def __init__(self, level_channels: Sequence[int], widths: Sequence[int], out_dim: int,
                     expert_channels: Sequence[int] = (), expert_level: Sequence[int] = (), reduction: int = 4,
                     pool: int = 4):
            super().__init__()
            self.expert_level = list(expert_level)
            self.adapters = nn.ModuleList(Adapter(c, reduction) for c in expert_channels)
            blocks, prev = [], 0
            for i, (c, w) in enumerate(zip(level_channels, widths)):
                cin = prev + c + sum(ec for ec, lv in zip(expert_channels, expert_level) if lv == i)
                blocks.append(nn.Sequential(nn.Conv2d(cin, w, 1, bias=False), nn.GroupNorm(group_count(w), w),
                                            nn.SiLU()))
                prev = w
            self.blocks = nn.ModuleList(blocks)
            self.pool = pool
            self.attnpool = AttentionPool(pool, widths[-1], out_dim)

        def forward(self, levels, experts=()):
            x = None
            for i, (block, f) in enumerate(zip(self.blocks, levels)):
                parts = [f] + [F.normalize(a(e), dim=1) for a, e, lv in zip(self.adapters, experts, self.expert_level)
                               if lv == i]
                if x is not None:
                    parts.insert(0, F.adaptive_avg_pool2d(x, f.shape[-2:]))
                x = block(torch.cat(parts, 1))
            return self.attnpool(F.adaptive_avg_pool2d(x, self.pool))

    return Adapter, AttentionPool, UHead


def build_adapter(channels: int, reduction: int = 4):
    return _nn()[0](channels, reduction)


def build_head(level_channels: Sequence[int], widths: Sequence[int], out_dim: int, expert_channels=(),
               expert_level=(), reduction: int = 4):
    """The U-head (see the module docstring); ``level_channels`` and ``widths`` finest level first."""
    return _nn()[2](level_channels, widths, out_dim, expert_channels, expert_level, reduction)


def cosine_logits(v, text, temperature: float = 0.2):
    """logits = cos(v, t_c) / temperature; (B, D), (C, D) -> (B, C)."""
    import torch.nn.functional as F

    return F.normalize(v, dim=-1) @ F.normalize(text, dim=-1).T / temperature


# ----------------------------------------------------------------------------------------------
# The stage: registered as the teacher "vermouth"


def _image_sets(ctx):
    from distillery.images import ImageSet

    rows = ctx.synthetic or []
    syn = ImageSet([Path(r["path"]) for r in rows], [r["sha256"] for r in rows])
    sets = {"synthetic": syn, "real": ctx.images}
    if ctx.eval_images is not None:
        sets["eval"] = ctx.eval_images
    return rows, sets


def _ensure(store, sets: dict, make_fn, ctx, batch_size: int, desc: str) -> int:
    paths = [p for s in sets.values() for p in s.paths]
    shas = [h for s in sets.values() for h in s.sha256]
    return store.ensure(paths, shas, make_fn, ctx.executor, batch_size, desc=desc, progress=ctx.progress)


def _levels_of(job, resolution: int) -> list[Level]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from distillery.models import is_local, local_path

    ref = job.models.diffusion
    root = str(local_path(ref)) if is_local(ref) else ref
    ucfg = UNet2DConditionModel.load_config(root, subfolder="unet")
    vcfg = AutoencoderKL.load_config(root, subfolder="vae")
    return feature_shapes(ucfg, resolution, 2 ** (len(vcfg["block_out_channels"]) - 1))


def confident_training_set(sets: dict, labels: np.ndarray, column: np.ndarray | None, threshold: float,
                           prior: np.ndarray | None = None, keys: np.ndarray | None = None):
    """(ImageSet, labels): the synthetic images with their generating class, followed by the real images whose
    pseudo-label has probability >= ``threshold`` in ``column`` (rows = ``sets["real"]``; none when the threshold
    is 0 or there is no column). The pseudo-label is the argmax of ``column``, or with a class ``prior`` the
    balanced assignment to it (teacher/prior.py), so the real images added follow the prior's class sizes."""
    from distillery.images import ImageSet

    from .prior import balanced_labels, log_probs

    syn, real = sets["synthetic"], sets["real"]
    if threshold <= 0 or column is None:
        return syn, np.asarray(labels)
    column = np.asarray(column)
    pseudo = column.argmax(axis=1) if prior is None else balanced_labels(log_probs(column), prior, keys)
    keep = np.flatnonzero(column[np.arange(len(column)), pseudo] >= threshold)
    train = ImageSet(list(syn.paths) + [real.paths[i] for i in keep], list(syn.sha256) + [real.sha256[i] for i in keep])
    return train, np.concatenate([np.asarray(labels), pseudo[keep]]).astype(np.int64)


@register_teacher("vermouth", settings=VermouthSettings, roles=("diffusion", "expert", "clip"), needs=("synthetic",),
                  columns=("vermouth",))
def run_vermouth(ctx) -> TeacherResult:
    """Vermouth: SD-UNet features + U-head (+ adapted expert) trained on the synthetic set, predicting real images."""
    import torch
    from tqdm import tqdm

    from distillery import killpoints
    from distillery.models import load_clip
    from distillery.rundir import log, sha256_file

    from .clip import class_weights
    from .features import FeatureStore, model_fingerprint
    from .lora import active_lora

    cfg, job = ctx.cfg, ctx.job
    device = ctx.device()
    seed = cfg.seed if cfg.seed is not None else job.seed
    noise_seed = cfg.noise_seed if cfg.noise_seed is not None else job.seed
    names = job.class_names
    rows, sets = _image_sets(ctx)
    if not rows:
        raise ValueError(f"{KEY}: the synthetic set is empty; Vermouth trains its head on it. Generate some "
                         f"(teacher.synth) or set {KEY}.enabled=false.")
    labels = np.asarray([int(r["class_index"]) for r in rows])
    counts = np.bincount(labels, minlength=len(names))
    if (counts == 0).any():
        log(f"vermouth: no synthetic images of {', '.join(n for n, k in zip(names, counts) if k == 0)}; those "
            "classes are reachable only through their CLIP text embeddings")
    prompt = condition_prompt(cfg, job)
    lora = active_lora(job)
    lora_sha = sha256_file(lora) if lora is not None else None
    levels = _levels_of(job, cfg.resolution)
    sides = [stored_side(lv.side, cfg.max_side) for lv in levels]
    t0 = time.perf_counter()
    info: dict[str, Any] = {"levels": [{"side": lv.side, "stored_side": s, "blocks": list(lv.blocks),
                                        "channels": lv.channels} for lv, s in zip(levels, sides)],
                            "prompt": prompt, "lora": lora_sha, "cross_attention": CROSS_ATTENTION_NOTE}

    # -- the frozen expert's maps (cached whenever the expert is on: it never trains)
    exp_channels: list[int] = []
    exp_level: list[int] = []
    exp_sides: list[int] = []
    exp_store = None
    if cfg.expert:
        model = load_expert_features(job.models.expert, cfg.expert_layers, "cpu")
        exp_channels = [int(c) for c in model.feature_info.channels()]
        exp_native = [cfg.resolution // int(r) for r in model.feature_info.reduction()]
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        del model
        exp_level = match_levels(exp_native, [lv.side for lv in levels])
        exp_sides = [sides[i] for i in exp_level]
        exp_store = FeatureStore(ctx.paths.features, "vermouth_expert",
                                 {"expert": model_fingerprint(job.models.expert), "layers": list(cfg.expert_layers),
                                  "resolution": cfg.resolution, "sides": exp_sides, "version": VERSION},
                                 f"shorter side -> {cfg.resolution} bicubic, centre crop, mean {mean} std {std}")
        t1 = time.perf_counter()
        n = _ensure(exp_store, sets, partial(_expert_encode_fn, job.models.expert, tuple(cfg.expert_layers), device,
                                             cfg.resolution, tuple(exp_sides)),
                    ctx, cfg.feature_batch_size, "vermouth expert")
        info.update(expert_computed=n, expert_seconds=round(time.perf_counter() - t1, 2),
                    expert_levels=exp_level, expert_channels=exp_channels)

    # -- the diffusion maps: cached unless the UNet's norms train
    diff_store = None
    featurizer = None
    if not cfg.train_unet_norms:
        encoder = {"diffusion": model_fingerprint(job.models.diffusion), "lora": lora_sha, "t": cfg.timestep,
                   "noise_seed": noise_seed, "resolution": cfg.resolution, "prompt": prompt,
                   "max_side": cfg.max_side, "blocks": [list(lv.blocks) for lv in levels], "version": VERSION}
        diff_store = FeatureStore(ctx.paths.features, "vermouth", encoder,
                                  f"shorter side -> {cfg.resolution} bicubic, centre crop, [-1, 1]; VAE latent mean "
                                  "x scaling_factor; DDPM add_noise")
        t1 = time.perf_counter()
        n = _ensure(diff_store, sets, partial(_diffusion_encode_fn, job.models.diffusion,
                                              str(lora) if lora else None, device, cfg.resolution, cfg.timestep,
                                              noise_seed, prompt, cfg.max_side),
                    ctx, cfg.feature_batch_size, "vermouth features")
        secs = time.perf_counter() - t1
        info.update(features_computed=n, feature_seconds=round(secs, 2),
                    features_per_s=round(n / secs, 2) if n and secs > 0 else None)
    else:
        pipe = load_pipe(job.models.diffusion, str(lora) if lora else None, device)
        featurizer = DiffusionFeaturizer(pipe, levels, prompt, cfg.timestep, noise_seed, cfg.resolution,
                                         cfg.max_side)
        for n_, p in pipe.unet.named_parameters():
            p.requires_grad_("norm" in n_)
        info["features_computed"] = "per step (teacher.vermouth.train_unet_norms)"

    # -- the classifier: CLIP template-ensemble text embeddings of the class names
    clip_model, _, tokenizer = load_clip(job.models.clip, device=device)
    text = torch.as_tensor(class_weights(clip_model, tokenizer, cfg.templates, names, job.domain_phrase, device),
                           dtype=torch.float32, device=device)
    del clip_model

    with torch.random.fork_rng(devices=[]):  # seed the head's initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        head = build_head([lv.channels for lv in levels], head_widths(cfg.head_width, len(levels)), text.shape[1],
                          exp_channels, exp_level, cfg.adapter_reduction).to(device)
    params = list(head.parameters())
    if featurizer is not None:
        params += [p for p in featurizer.unet.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    channels = [lv.channels for lv in levels]

    def inputs(image_set, idx):
        """Per-level maps and expert maps of the images ``idx`` of ``image_set``."""
        shas = [image_set.sha256[i] for i in idx]
        if diff_store is not None:
            diff = split_row(torch.from_numpy(diff_store.get(shas)).to(device), channels, sides)
        else:
            diff = featurizer(load_pixels([str(image_set.paths[i]) for i in idx], cfg.resolution))
        exp = split_row(torch.from_numpy(exp_store.get(shas)).to(device), exp_channels, exp_sides) \
            if exp_store is not None else []
        return diff, exp

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    from .prior import tie_key

    syn, train_labels = confident_training_set(sets, labels, ctx.columns.get(cfg.pseudo_label_column),
                                               cfg.real_pseudo_labels, ctx.prior, tie_key(ctx.images.sha256, seed))
    info["real_training_images"] = len(syn) - len(rows)
    rows = [None] * len(syn)  # the training rows: synthetic first, then the confident real images
    y_all = torch.as_tensor(train_labels, device=device)
    steps = math.ceil(len(rows) / cfg.batch_size)
    hist = {"epoch": [], "loss": [], "train_accuracy": []}
    t1 = time.perf_counter()
    head.train()
    bar = tqdm(total=cfg.epochs * steps, desc="vermouth head", unit="step", disable=not ctx.progress)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        tot, correct = 0.0, 0
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            diff, exp = inputs(syn, idx)
            logits = cosine_logits(head(diff, exp), text, cfg.temperature)
            y = y_all[idx]
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        hist["epoch"].append(epoch)
        hist["loss"].append(tot / len(rows))
        hist["train_accuracy"].append(correct / len(rows))
        killpoints.progress("vermouth.epoch", epoch + 1)  # testing hook (no checkpoint: a rerun retrains)
    bar.close()
    if not all(math.isfinite(x) for x in hist["loss"]):
        raise FloatingPointError(f"{KEY}: the training loss became {hist['loss'][-1]}; lower {KEY}.lr (now {cfg.lr}).")
    head.eval()
    info.update(train_seconds=round(time.perf_counter() - t1, 2), loss_first=hist["loss"][0],
                loss_last=hist["loss"][-1], synthetic_images=len(rows) - info["real_training_images"])

    def predict(image_set) -> np.ndarray:
        out = []
        with torch.no_grad():
            for b in range(0, len(image_set), cfg.batch_size):
                idx = list(range(b, min(b + cfg.batch_size, len(image_set))))
                diff, exp = inputs(image_set, idx)
                out.append(torch.softmax(cosine_logits(head(diff, exp), text, cfg.temperature), 1).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(names)), np.float32)

    probs = predict(ctx.images)
    eval_probs = {"vermouth": predict(ctx.eval_images)} if ctx.eval_images is not None else {}
    save_head(ctx.out_dir / "head.safetensors", head, text, featurizer,
              {"class_names": names, "levels": info["levels"], "expert_levels": exp_level,
               "expert_channels": exp_channels, "expert_sides": exp_sides, "text_width": int(text.shape[1]),
               "prompt": prompt, "settings": {k: v for k, v in asdict(cfg).items() if k != "device"},
               "diffusion": job.models.diffusion, "expert": job.models.expert, "clip": job.models.clip,
               "lora": lora_sha})
    if featurizer is not None:
        featurizer.remove()
    info["seconds_total"] = round(time.perf_counter() - t0, 2)
    log(f"vermouth: {info['synthetic_images']} synthetic + {info['real_training_images']} confident real images "
        f"x {cfg.epochs} epochs, loss {hist['loss'][0]:.4f} -> "
        f"{hist['loss'][-1]:.4f}; features {info.get('features_computed')} computed"
        + (f" ({info['features_per_s']} img/s)" if info.get("features_per_s") else ""))
    return TeacherResult(probs={"vermouth": probs}, eval_probs=eval_probs, tables={"training": hist}, info=info)


def save_head(path: Path, head, text, featurizer, meta: dict) -> None:
    """The head (+ adapters), the classifier text embeddings and any trained UNet norms, as safetensors; the
    settings, levels and model references in its metadata (JSON strings)."""
    import json

    from safetensors.torch import save_file

    from distillery.rundir import atomic_path, canonical_safetensors

    tensors = {f"head.{k}": v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    tensors["classifier"] = text.detach().float().cpu().contiguous()
    if featurizer is not None:
        tensors.update({f"unet.{n}": p.detach().float().cpu().contiguous()
                        for n, p in featurizer.unet.named_parameters() if p.requires_grad})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        canonical_safetensors(tmp)  # the same head gives the same bytes in every process


def prompt_mentions_class(prompt: str, class_names: Sequence[str]) -> list[str]:
    """The class names that occur in ``prompt`` as whole words (case-insensitive); used by the tests."""
    return [c for c in class_names if re.search(rf"\b{re.escape(c.lower())}\b", prompt.lower())]
