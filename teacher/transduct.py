"""A transductive teacher: the unlabeled pool's own structure refines a zero-shot column (TransCLIP-style).

Not in the seed papers; after TransCLIP ("Boosting Vision-Language Models with Transduction", NeurIPS 2024):
no encoder training, a few EM-like sweeps over the frozen CLIP image features of the unlabeled images.

Objective (per image i with feature f_i, the input column's prediction ŷ_i, assignment z_i on the simplex):

    - Σ_i z_iᵀ log(π ⊙ N(f_i; μ, Σ))          a Gaussian mixture with one mean per class, a shared diagonal
                                               covariance Σ and class proportions π
    - Σ_ij w_ij z_iᵀ z_j                        a kNN affinity (Laplacian) term: neighbours agree
    + Σ_i KL_λ(z_i ‖ ŷ_i)                       stay near the text prediction (λ weighs it)

Block updates (:func:`transduct`): z_i ∝ ŷ_i^λ ⊙ π ⊙ exp((log N(f_i; μ_c, Σ) + ½ Σ_j (w_ij + w_ji) z_j) / T) a
few times (T the public code's temperature 50), then μ_c = the z-weighted mean of the features (normalised),
Σ = the z-weighted mean squared deviation, and π = mean z (or the run's class prior, fixed, when there is one).
μ starts from the 8 images most confidently predicted per class. Evaluation images (and synthetic ones) are
predicted with the fitted mixture and their own ŷ, without the affinity term (:func:`transduct_predict`).

The fitted proportions π are written to the teacher's folder: a label-free estimate of the class sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import TeacherResult, TeacherSettings, register_teacher


@dataclass
class TransductCfg(TeacherSettings):
    enabled: bool = True  # a few seconds on CLIP features already computed
    input_column: str = "clip"  # the column refined (its probabilities are ŷ): clip, or e.g. air_fused
    text_weight: float | None = None  # λ of the KL term on ŷ = the column's log-probabilities; null = 100 / the CLIP's own logit scale (TransCLIP's λ = 1 at CLIP's scale 100)
    neighbours: int = 3  # k of the kNN affinity (TransCLIP: 3); 0 = no affinity term
    iterations: int = 10  # outer sweeps (mean, covariance, proportions; TransCLIP: 10)
    z_iterations: int = 5  # assignment updates per sweep (TransCLIP: 5)
    temperature: float = 50.0  # T dividing the likelihood and affinity terms (TransCLIP's constant)
    init_top: int = 8  # images per class that initialise the means (TransCLIP: 8)
    learn_proportions: bool = True  # estimate π jointly (without a run prior); false = equal proportions

    def check(self, key: str = "teacher.transduct") -> None:
        def bad(name, fix):
            raise ValueError(f"{key}.{name}: {getattr(self, name)!r} is invalid; {fix}.")

        from .base import all_columns

        if self.input_column not in all_columns() or self.input_column.startswith("transduct"):
            bad("input_column", f"name another teacher's column ({', '.join(c for c in all_columns() if c != 'transduct')})")
        if self.text_weight is not None and (isinstance(self.text_weight, bool) or not isinstance(
                self.text_weight, (int, float)) or not math.isfinite(self.text_weight) or self.text_weight < 0):
            bad("text_weight", "use a number >= 0, or null for 100 / the model's logit scale")
        for name, lo in (("neighbours", 0), ("iterations", 1), ("z_iterations", 1), ("init_top", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"use a whole number >= {lo}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not math.isfinite(self.temperature) or self.temperature <= 0:
            bad("temperature", "use a number > 0 (TransCLIP: 50)")
        if not isinstance(self.learn_proportions, bool):
            bad("learn_proportions", "use true or false")

    def reads(self) -> list[str]:
        return [self.input_column] if self.input_column != "clip" else []


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=1, keepdims=True)


def knn_affinity(x: np.ndarray, k: int, block: int = 2048):
    """Sparse (N, N) matrix: row i holds the cosine similarities to its k nearest other rows (TransCLIP's W)."""
    import scipy.sparse as sp

    n = len(x)
    k = min(k, n - 1)
    rows, cols, vals = [], [], []
    for b in range(0, n, block):
        s = x[b:b + block] @ x.T  # (B, N)
        s[np.arange(len(s)), np.arange(b, b + len(s))] = -np.inf
        idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
        rows.append(np.repeat(np.arange(b, b + len(s)), k))
        cols.append(idx.ravel())
        vals.append(np.take_along_axis(s, idx, axis=1).ravel())
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def gaussian_loglik(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """(N, C): −½ Σ_d (x_d − μ_cd)² / σ²_d (the shared-covariance Gaussian's log-likelihood up to a constant)."""
    inv = 1.0 / var
    return -0.5 * ((x ** 2) @ inv[:, None] - 2 * x @ (mu * inv).T + ((mu ** 2) @ inv)[None, :])


def transduct(features: np.ndarray, y_hat: np.ndarray, *, text_weight: float = 1.0, neighbours: int = 3,
              iterations: int = 10, z_iterations: int = 5, temperature: float = 50.0, init_top: int = 8,
              prior: np.ndarray | None = None, learn_proportions: bool = True) -> dict:
    """Fit the mixture on (N, D) features with (N, C) text predictions ŷ; returns z (N, C), mu (C, D), var (D,),
    proportions (C,). ``prior`` fixes the proportions; else they are learnt (``learn_proportions``) or equal."""
    x = _l2(features)
    y_hat = np.asarray(y_hat, np.float64)
    n, c = y_hat.shape
    log_y = text_weight * np.log(np.maximum(y_hat, 1e-30))
    z = _softmax_rows(log_y)
    mu = np.zeros((c, x.shape[1]))
    for k in range(c):
        top = np.argsort(-z[:, k], kind="stable")[:init_top]
        mu[k] = (x[top] * z[top, k:k + 1]).mean(axis=0)
    mu = _l2(mu)
    var = np.full(x.shape[1], 1.0 / x.shape[1])
    pi = np.asarray(prior, np.float64) if prior is not None else np.full(c, 1.0 / c)
    w = knn_affinity(x, neighbours) if neighbours > 0 else None
    for it in range(iterations + 1):
        ll = gaussian_loglik(x, mu, var)
        for _ in range(z_iterations):
            a = ll.copy()
            if w is not None:
                a += (temperature / (2 * neighbours)) * (w.T @ z + w @ z)
            z = _softmax_rows(log_y + np.log(pi)[None, :] + a / temperature)
        if it == iterations:
            break
        mass = np.maximum(z.sum(axis=0), 1e-12)
        mu = _l2((z.T @ x) / mass[:, None])
        var = np.maximum((z[:, :, None] * (x[:, None, :] - mu[None]) ** 2).sum(axis=(0, 1)) / n, 1e-8)
        if prior is None and learn_proportions:
            pi = np.maximum(z.mean(axis=0), 1e-6)
            pi /= pi.sum()
    return {"z": z, "mu": mu, "var": var, "proportions": pi}


def transduct_predict(features: np.ndarray, y_hat: np.ndarray, fit: dict, text_weight: float = 1.0,
                      temperature: float = 50.0) -> np.ndarray:
    """(M, C) predictions for images outside the pool: the fitted mixture and their own ŷ, no affinity term."""
    x = _l2(features)
    log_y = text_weight * np.log(np.maximum(np.asarray(y_hat, np.float64), 1e-30))
    return _softmax_rows(log_y + np.log(fit["proportions"])[None, :] +
                         gaussian_loglik(x, fit["mu"], fit["var"]) / temperature)


@register_teacher("transduct", settings=TransductCfg, roles=("clip",), needs=("teacher:clip", "features:clip"),
                  columns=("transduct",))
def run_transduct(ctx) -> TeacherResult:
    """Transductive refinement of a zero-shot column by the unlabeled pool's feature structure (TransCLIP-style)."""
    from distillery.models import load_clip

    from .clip import image_features, model_logit_scale, prediction_sets

    cfg, job = ctx.cfg, ctx.job
    device = ctx.device()
    model, preprocess, _ = load_clip(job.models.clip, device=device)
    lam = cfg.text_weight if cfg.text_weight is not None else 100.0 / model_logit_scale(model)
    sets = prediction_sets(ctx)
    feats = dict(zip(sets, image_features(ctx, job.models.clip, preprocess, device, job.teacher.clip.batch_size,
                                          list(sets.values()))))
    col = cfg.input_column
    y = {"real": ctx.columns[col], "eval": ctx.eval_columns.get(col), "synthetic": ctx.synthetic_columns.get(col)}
    fit = transduct(feats["real"], y["real"], text_weight=lam, neighbours=cfg.neighbours, iterations=cfg.iterations,
                    z_iterations=cfg.z_iterations, temperature=cfg.temperature, init_top=cfg.init_top,
                    prior=ctx.prior, learn_proportions=cfg.learn_proportions)
    out = {"real": {"transduct": fit["z"]}}
    for k in ("eval", "synthetic"):
        if k in feats and y[k] is not None:
            out[k] = {"transduct": transduct_predict(feats[k], y[k], fit, lam, cfg.temperature)}
    names = job.class_names
    tables = {"proportions": {"class_name": list(names), "proportion": [float(p) for p in fit["proportions"]],
                              "count": np.bincount(fit["z"].argmax(axis=1), minlength=len(names)).tolist()}}
    info = {"text_weight": round(lam, 6), "input_column": col,
            "proportions": np.round(fit["proportions"], 4).tolist(),
            "proportions_source": "the run's class prior (fixed)" if ctx.prior is not None else
            ("estimated jointly" if cfg.learn_proportions else "equal")}
    from .clip import result_from_sets

    return result_from_sets(out, tables=tables, info=info)
