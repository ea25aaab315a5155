"""Knowledge-distillation loss (SPEC §7): KL to the teachers' soft targets at temperature τ plus
cross-entropy to the hard labels, each row weighted by the manifest's ``weight``.

    l_i = α · τ² · KL(p_i ‖ softmax(z_i / τ)) + (1 − α) · CE(z_i, y_i)
    L   = Σ_i w_i l_i / Σ_i w_i

τ² keeps the KL gradient on the same scale as the CE gradient when τ changes (Hinton et al. 2015).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(logits: torch.Tensor, soft_targets: torch.Tensor, labels: torch.Tensor,
                      weights: torch.Tensor | None = None, temperature: float = 1.0, alpha: float = 0.0) -> torch.Tensor:
    """Weighted mean over rows of ``alpha * tau^2 * KL(soft || softmax(logits/tau)) + (1-alpha) * CE(logits, label)``.

    Args:
        logits: (B, C) student outputs.
        soft_targets: (B, C) teacher probabilities (rows sum to 1).
        labels: (B,) hard class indices.
        weights: (B,) per-row loss weights (>= 0, not all 0); ``None`` = all ones.
        temperature: τ > 0, applied to the student's logits in the KL term only.
        alpha: share of the KL term in [0, 1]; 0 = plain (weighted) cross-entropy.
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
        p = soft_targets.to(logits.dtype)
        log_q = F.log_softmax(logits / temperature, dim=-1)  # (B, C)
        kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)  # 0·log 0 = 0 for classes the teacher rules out
        per_row = per_row + alpha * temperature ** 2 * kl
    return (weights * per_row).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
