"""Mixup and CutMix for distillation (optional; ``student.mixup`` / ``student.cutmix``).

A batch is mixed with a permutation of itself: ``x' = lam * x + (1 - lam) * x[perm]`` (mixup) or a pasted box
(CutMix, ``lam`` = the share of pixels kept). Both terms of the distillation loss are linear in the target
distribution up to a constant (the KL's entropy term), so the loss of the mixed batch is taken as
``lam * L(soft, y, w) + (1 - lam) * L(soft[perm], y[perm], w[perm])`` -- the same as mixing the one-hot labels
and the soft targets as softened to τ (each from its own manifest temperature). The draws come from a NumPy
generator seeded by ``(seed, epoch, step)``: a resumed run mixes exactly as an uninterrupted one.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["mix_batch"]


def mix_batch(x: torch.Tensor, seed: int, epoch: int, step: int, mixup: float = 0.0,
              cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Mix ``x`` (B, C, H, W); returns ``(mixed x, perm or None, lam)``. ``mixup``/``cutmix`` are Beta(a, a) parameters."""
    if mixup <= 0 and cutmix <= 0 or x.shape[0] < 2:
        return x, None, 1.0
    rng = np.random.default_rng([seed, epoch, step, 0x6D6978])
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    if not use_cutmix:
        return x.lerp(x[perm], 1.0 - lam) if x.is_floating_point() else (
            (lam * x.float() + (1.0 - lam) * x[perm].float()).round().to(x.dtype)), perm, lam
    h, w = x.shape[-2:]
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the share actually kept after clipping the box
    return out, perm, lam
