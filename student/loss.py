"""Knowledge-distillation loss (SPEC §7, Hinton et al. 2015): teacher and student softened at the same
temperature τ, plus cross-entropy to the hard labels, each row weighted by the manifest's ``weight``.

    q_i = softmax(T_i · log p_i / τ)     the teacher at τ: p_i is the soft target stored at temperature T_i
                                         (p = softmax(z_t / T) gives softmax(z_t / τ)); T_i = 1 by default
    l_i = α · τ² · KL(q_i ‖ softmax(z_i / τ)) + (1 − α) · CE(z_i, y_i)
    L   = Σ_i w_i l_i / Σ_i w_i

The minimiser of the KL term is softmax(z / τ) = q, i.e. softmax(z) = softmax(T · log p): the student learns
the teacher's own distribution (p itself when T = 1). Softening only the student, KL(p ‖ softmax(z / τ)), would
teach it p^τ renormalised instead. Classes with p = 0 stay at 0 for every τ. τ² keeps the KL gradient on the
same scale as the CE gradient when τ changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss", "soften"]


def soften(soft_targets: torch.Tensor, temperature: float,
           target_temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Probabilities stored at ``target_temperature`` (a float or one value per row) re-softened to
    ``temperature``: ``softmax(target_temperature * log p / temperature)``, rows of (B, C); zeros stay 0.

    When the two temperatures are the same float, ``soft_targets`` is returned as it is.
    """
    p = soft_targets.float()
    if not torch.is_tensor(target_temperature):
        if target_temperature <= 0:
            raise ValueError(f"target_temperature: must be > 0, got {target_temperature}.")
        if target_temperature == temperature:
            return p
        scale = target_temperature / temperature
    else:
        scale = (target_temperature.to(device=p.device, dtype=p.dtype) / temperature).reshape(-1, 1)
    return F.softmax(torch.log(p) * scale, dim=-1)  # log 0 = -inf stays -inf: those classes keep probability 0


def distillation_loss(logits: torch.Tensor, soft_targets: torch.Tensor, labels: torch.Tensor,
                      weights: torch.Tensor | None = None, temperature: float = 1.0, alpha: float = 0.0,
                      target_temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Weighted mean over rows of ``alpha * tau^2 * KL(soften(soft) || softmax(logits/tau)) + (1-alpha) * CE``.

    Args:
        logits: (B, C) student outputs.
        soft_targets: (B, C) teacher probabilities (rows sum to 1), written at ``target_temperature``.
        labels: (B,) hard class indices.
        weights: (B,) per-row loss weights (>= 0, not all 0); ``None`` = all ones.
        temperature: τ > 0, at which both the teacher's targets and the student's logits are softened.
        alpha: share of the KL term in [0, 1]; 0 = plain (weighted) cross-entropy.
        target_temperature: the temperature the soft targets were written at (the manifest's ``temperature``),
            a float or a (B,) tensor; 1 = plain probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}.")
    logits = logits.float()
    if weights is None:
        weights = torch.ones(logits.shape[0], device=logits.device)
    weights = weights.to(logits.dtype)
    per_row = torch.zeros_like(weights)  # (B,)
    if alpha < 1.0:
        per_row = per_row + (1.0 - alpha) * F.cross_entropy(logits, labels, reduction="none")
    if alpha > 0.0:
        q = soften(soft_targets, temperature, target_temperature).to(logits.dtype)  # the teacher at τ
        log_q = F.log_softmax(logits / temperature, dim=-1)  # (B, C)
        kl = (torch.xlogy(q, q) - q * log_q).sum(dim=-1)  # 0·log 0 = 0 for classes the teacher rules out
        per_row = per_row + alpha * temperature ** 2 * kl
    return (weights * per_row).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
