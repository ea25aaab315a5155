"""The class prior: label-free correction of a column's per-class bias, and selection under the prior (SPEC §3).

Zero-shot CLIP carries a per-class bias: some text embeddings attract far more images than their class has
(stand-in world: one class predicted for 22, another for 1,323 of 5,000 balanced tiles). Every method that
starts from it inherits the skew. A plain EM re-estimation of the prior from those probabilities (Saerens et
al. 2002) takes the bias for the prior and sharpens it, so the prior here comes from elsewhere
(``teacher.prior.mode``):

- ``none``: no correction; every column and selection is what the papers do.
- ``uniform``: every class gets an equal share.
- ``given``: the user's shares (``teacher.prior.given``: class name -> share, normalised).
- ``estimated``: class sizes from evidence that does not go through the text encoder: a nearest-class-mean
  classifier built from the *synthetic* images (label = generating class) in the CLIP image space, counted
  on the unlabeled images, shrunk towards uniform by ``teacher.prior.shrink``
  (:func:`estimate_prior_from_prototypes`). Without a synthetic set there is no such evidence and the mode
  falls back to ``none`` (logged and in the report).

With a prior π (C,), every probability column is *matched* to it (:func:`match_prior`): a per-class bias b is
added to the column's log-probabilities so that its argmax counts on the unlabeled images are π·N
(:func:`count_bias`, an annealed Sinkhorn–Knopp fit of the column marginals); the same b applies to the
evaluation and synthetic rows. Selections (AiR's top-N per class, LaTTe-CLIP's c_zs, Vermouth's real
pseudo-labels, the manifest's hard labels) use :func:`balanced_labels` (an assignment that meets the class
sizes exactly) and rank by logit margin with a seeded hash breaking ties (:func:`select_top`), never by
saturated probabilities or file order.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

PRIOR_MODES = ("none", "uniform", "given", "estimated")
MIN_SHARE = 1e-3  # floor of any class's share in an estimated prior (a class the evidence never picks stays possible)


# ----------------------------------------------------------------------------------------------
# pure functions


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_probs(p: np.ndarray) -> np.ndarray:
    """log of a probability column (N, C), floored at 1e-30 (scores for :func:`count_bias` and margins)."""
    return np.log(np.maximum(np.asarray(p, np.float64), 1e-30))


def normalize_prior(prior: Sequence[float], n_classes: int | None = None) -> np.ndarray:
    """A share vector (C,) from non-negative weights (counts or fractions), summing to 1."""
    p = np.asarray(prior, np.float64)
    if p.ndim != 1 or (n_classes is not None and len(p) != n_classes):
        raise ValueError(f"prior: expected {n_classes or 'C'} shares, got shape {p.shape}.")
    if not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"prior: shares must be finite, >= 0 and not all 0, got {p.tolist()}.")
    return p / p.sum()


def count_bias(scores: np.ndarray, prior: Sequence[float], *, steps: int = 10, iters: int = 200,
               final_temperature: float = 0.01, tol: float = 1e-6) -> np.ndarray:
    """Per-class bias b (C,) such that the argmax counts of ``scores + b`` over the N rows are ≈ ``prior``·N.

    scores: (N, C) logits or log-probabilities (any scale); prior: (C,) shares > 0. The marginal of
    softmax((scores + b) / (σ τ)) is fitted to the prior by Sinkhorn–Knopp's column step
    (b_c += σ τ log(π_c / m_c), the exact solution for each τ), at temperatures τ from 1 down to
    ``final_temperature`` (σ = the standard deviation of the row-centred scores, so τ is scale-free): at a
    small τ the soft marginal is the argmax histogram, so the counts meet the prior to within a few images;
    the annealing keeps each step well conditioned. b is centred (mean 0): adding a constant changes nothing.
    """
    z = np.asarray(scores, np.float64)
    pi = normalize_prior(prior, z.shape[1])
    if (pi <= 0).any():
        raise ValueError("count_bias: every class needs a share > 0 (floor the prior first).")
    zc = z - z.mean(axis=1, keepdims=True)
    sigma = float(zc.std()) or 1.0
    b = np.zeros(z.shape[1])
    log_pi = np.log(pi)
    for tau in np.geomspace(1.0, final_temperature, steps):
        t = sigma * tau
        for _ in range(iters):
            m = _softmax((zc + b) / t).mean(axis=0)
            step = t * (log_pi - np.log(np.maximum(m, 1e-300)))
            b += step
            b -= b.mean()
            if np.abs(step).max() < tol * sigma:
                break
    return b


def class_sizes(prior: Sequence[float], n: int) -> np.ndarray:
    """Integer class sizes summing to n, proportional to ``prior`` (largest remainder; ties to the lower class)."""
    pi = normalize_prior(prior)
    raw = pi * n
    sizes = np.floor(raw).astype(np.int64)
    rest = n - int(sizes.sum())
    order = np.lexsort((np.arange(len(pi)), -(raw - sizes)))
    sizes[order[:rest]] += 1
    return sizes


def tie_key(sha256: Sequence[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random number in [0, 1) per image, from its content hash: breaks ties in rankings so
    that the order of the files never decides a selection, and another seed gives another order."""
    out = np.empty(len(sha256))
    for i, s in enumerate(sha256):
        h = hashlib.sha256(f"{seed}:{s}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2.0 ** 64
    return out


def margins(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """m_i = scores[i, label_i] − max_{k ≠ label_i} scores[i, k]: how far row i's label leads the runner-up."""
    z = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.int64)
    rows = np.arange(len(z))
    own = z[rows, labels]
    other = z.copy()
    other[rows, labels] = -np.inf
    return own - other.max(axis=1)


def balanced_labels(scores: np.ndarray, prior: Sequence[float], keys: np.ndarray | None = None) -> np.ndarray:
    """Hard labels (N,) whose class counts are exactly :func:`class_sizes` (prior, N): a greedy assignment on
    ``scores + count_bias(scores, prior)`` — pairs (image, class) taken best first, an image once, a class
    until full. Ties (equal scores) are broken by ``keys`` (e.g. :func:`tie_key`), then by index."""
    z = np.asarray(scores, np.float64)
    n, c = z.shape
    sizes = class_sizes(prior, n)
    adj = z + count_bias(z, np.maximum(normalize_prior(prior, c), 1e-12))
    keys = np.zeros(n) if keys is None else np.asarray(keys, np.float64)
    order = np.lexsort((np.repeat(keys, c), -adj.ravel()))  # flat index i*c + k, best first
    labels = np.full(n, -1, np.int64)
    free = sizes.copy()
    left = n
    for flat in order:
        i, k = divmod(int(flat), c)
        if labels[i] < 0 and free[k] > 0:
            labels[i] = k
            free[k] -= 1
            left -= 1
            if left == 0:
                break
    return labels


def select_top(scores: np.ndarray, labels: np.ndarray, n_per_class: int, keys: np.ndarray,
               n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) of the ``n_per_class`` rows with the largest margin (:func:`margins`) among the rows
    labelled c, for every class c, grouped by class then rank; equal margins are ordered by ``keys``."""
    z = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.int64)
    m = margins(z, labels)
    idx, lab = [], []
    for c in range(n_classes or z.shape[1]):
        rows = np.flatnonzero(labels == c)
        rows = rows[np.lexsort((keys[rows], -m[rows]))][:n_per_class]
        idx.append(rows)
        lab.append(np.full(len(rows), c))
    return np.concatenate(idx).astype(np.int64), np.concatenate(lab).astype(np.int64)


def match_prior(p: np.ndarray, prior: Sequence[float] | None, others: Sequence[np.ndarray] = ()) \
        -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """A probability column (N, C) matched to the prior: softmax(log p + b) with b = :func:`count_bias` fitted on
    these rows, and the same b applied to ``others`` (the column on the evaluation / synthetic images).
    Returns (column, others, b); with ``prior`` None everything is returned unchanged (b = 0)."""
    p = np.asarray(p, np.float64)
    if prior is None:
        return p, [np.asarray(o, np.float64) for o in others], np.zeros(p.shape[1])
    b = count_bias(log_probs(p), prior)
    return _softmax(log_probs(p) + b), [_softmax(log_probs(o) + b) for o in others], b


def estimate_prior_from_prototypes(real_features: np.ndarray, syn_features: np.ndarray, syn_labels: np.ndarray,
                                   n_classes: int, shrink: float = 0.0,
                                   class_names: Sequence[str] | None = None) -> tuple[np.ndarray, dict]:
    """Class shares of the unlabeled images from evidence that bypasses the text encoder.

    Each class's prototype is the normalised mean of its synthetic images' normalised features (label =
    generating class, so the synthetic set is balanced by construction and says nothing about the unlabeled
    pool's shares); each real image counts for its nearest prototype (cosine). The counts, as shares, are
    shrunk towards uniform: π = (1 − shrink)·counts/N + shrink/C, floored at MIN_SHARE, renormalised.
    Returns (π, {"counts": ..., "evidence": ...}). A class without synthetic images is an error.
    """
    f = _l2(real_features)
    g = _l2(syn_features)
    syn_labels = np.asarray(syn_labels, np.int64)
    missing = [c for c in range(n_classes) if not (syn_labels == c).any()]
    if missing:
        name = class_names[missing[0]] if class_names else f"#{missing[0]}"
        raise ValueError(f"teacher.prior: class {name!r} has no synthetic images to estimate its share from; generate "
                         "some (teacher.synth), or set teacher.prior.mode to uniform, given or none.")
    protos = _l2(np.stack([g[syn_labels == c].mean(axis=0) for c in range(n_classes)]))  # (C, D)
    counts = np.bincount((f @ protos.T).argmax(axis=1), minlength=n_classes)
    evidence = counts / max(1, len(f))
    pi = (1.0 - shrink) * evidence + shrink / n_classes
    pi = np.maximum(pi, MIN_SHARE)
    return pi / pi.sum(), {"counts": counts.tolist(), "evidence": evidence.round(6).tolist()}


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------------
# the stage's prior


def given_prior(cfg, class_names: Sequence[str]) -> np.ndarray:
    """``teacher.prior.given`` (class name -> share) as a vector in class order; every class must be named."""
    unknown = [k for k in cfg.given if k not in class_names]
    if unknown:
        raise ValueError(f"teacher.prior.given: {unknown[0]!r} is not a class of the job; classes: "
                         f"{', '.join(class_names)}.")
    missing = [c for c in class_names if c not in cfg.given]
    if missing:
        raise ValueError(f"teacher.prior.given: no share for class {missing[0]!r}; give every class a share "
                         "(fractions or counts, normalised), or use teacher.prior.mode=estimated.")
    return normalize_prior([float(cfg.given[c]) for c in class_names])


def resolve_prior(job, images, synthetic: list[dict] | None, executor, progress: bool = True) -> dict:
    """The run's prior: {"mode", "requested", "prior" (C shares, or None for none), "why", evidence...}.

    ``estimated`` computes the CLIP image features of the unlabeled and synthetic images through the shared
    feature store (the clip teacher reuses them) and counts them against synthetic class means."""
    cfg = job.teacher.prior
    names = job.class_names
    out: dict = {"requested": cfg.mode, "classes": list(names)}
    if cfg.mode == "none":
        return {**out, "mode": "none", "prior": None, "why": "teacher.prior.mode: none (the papers' behaviour)"}
    if cfg.mode == "uniform":
        return {**out, "mode": "uniform", "prior": [1.0 / len(names)] * len(names),
                "why": "teacher.prior.mode: uniform (every class an equal share)"}
    if cfg.mode == "given":
        return {**out, "mode": "given", "prior": given_prior(cfg, names).tolist(),
                "why": "teacher.prior.given (the user's shares)"}
    if not synthetic:
        return {**out, "mode": "none", "prior": None,
                "why": "teacher.prior.mode: estimated needs the synthetic images (class evidence that does not go "
                       "through the text encoder), and this run has none: no prior correction"}
    from distillery.images import ImageSet
    from distillery.models import load_clip

    from .clip import image_features_of

    device = _device(job)
    _, preprocess, _ = load_clip(job.models.clip, device=device)
    syn = ImageSet([r.get("full_path") or r["path"] for r in synthetic],
                   [r.get("full_sha256") or r["sha256"] for r in synthetic])
    real_f, syn_f = image_features_of(job, preprocess, device, [images, syn], executor, progress, desc="prior features")
    pi, ev = estimate_prior_from_prototypes(real_f, syn_f, [r["class_index"] for r in synthetic], len(names),
                                            cfg.shrink, names)
    return {**out, "mode": "estimated", "prior": pi.round(8).tolist(), "shrink": cfg.shrink, **ev,
            "why": f"estimated: nearest synthetic class mean (CLIP image features) counted on the {len(images)} "
                   f"unlabeled images, shrunk {cfg.shrink:g} towards uniform"}


def _device(job) -> str:
    from distillery.models import pick_device

    return pick_device(job.teacher.clip.device, key="teacher.clip.device")
