"""Label-free weights for the ensemble: how accurate is each teacher column, without labels? (SPEC §6)

Agreement alone rewards columns that share a bias: zero-shot CLIP and the AiR column fused from it agree on
97% of the stand-in images because they make the same mistakes. Here each column's accuracy is estimated by a
chance-corrected latent-truth model, Dawid–Skene (1979):

- every column t votes its argmax y_ti for image i; the unknown true class has a prior π (the run's class
  prior when there is one, else estimated) and each column a confusion matrix θ_t[c, k] = P(vote k | truth c);
- EM: the posterior over the truth T_ic ∝ π_c Π_t θ_t[c, y_ti] (E), θ_t = normalised Σ_i T_ic [y_ti = k] + a
  small Dirichlet smoothing (M), starting from the majority vote (:func:`dawid_skene`);
- a column's estimated accuracy is a_t = Σ_c π_c θ_t[c, c]; its weight is the log-odds
  w_t = max(0, log(a_t (C − 1) / (1 − a_t))) (the optimal weighted vote for a symmetric error model),
  normalised (:func:`log_odds_weights`).

Dawid–Skene assumes the columns err independently given the truth. Columns that copy each other (a column
fused from another, two near-identical teachers) break that and would be counted twice, so columns form groups
(:func:`redundancy_groups`): the columns of one teacher (AiR's auxiliary, fused and prompt columns are built from
one another), the columns computed from one frozen feature store (zero-shot CLIP, AiR and the transductive teacher
all read the same CLIP image features: one view of the images, not independent raters), a teacher and the teacher
whose column it builds on (LaTTe-CLIP is fine-tuned on zero-shot CLIP's labels: measured in the stand-in world,
Dawid–Skene then rated it the most accurate column, 0.92, where it was the least, 0.51), and any two columns whose
chance-corrected agreement (Cohen's κ) reaches ``redundancy_kappa``.
Inside the EM a group's votes enter as the mean of its members' log-likelihoods, and its weight is shared among
its members. With fewer than 3 groups the model is not identifiable (two raters cannot tell which of them is
right), so the groups get equal weights and the accuracies are not estimated. Columns whose predicted-class histogram is far from the prior (total variation above
``collapse_tv``, e.g. a column that puts most images in one class) are dropped before the EM
(:func:`collapsed_columns`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def cohen_kappa(a: np.ndarray, b: np.ndarray, n_classes: int) -> float:
    """Cohen's κ of two vote vectors: (p_o − p_e) / (1 − p_e), p_e from the two vote histograms."""
    a, b = np.asarray(a), np.asarray(b)
    po = float((a == b).mean())
    pe = float((np.bincount(a, minlength=n_classes) / len(a)) @ (np.bincount(b, minlength=n_classes) / len(b)))
    return 1.0 if pe >= 1.0 else (po - pe) / (1.0 - pe)


def redundancy_groups(votes: np.ndarray, n_classes: int, kappa: float = 0.9,
                      linked: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """Columns (rows of ``votes`` (T, N)) linked when their κ >= ``kappa`` or when they are in one of ``linked``
    (e.g. the columns of one teacher); the connected groups, in column order."""
    t = len(votes)
    parent = list(range(t))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(t):
        for j in range(i + 1, t):
            if cohen_kappa(votes[i], votes[j], n_classes) >= kappa:
                parent[find(j)] = find(i)
    for members in linked:
        members = list(members)
        for j in members[1:]:
            parent[find(j)] = find(members[0])
    groups: dict[int, list[int]] = {}
    for i in range(t):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def collapsed_columns(votes: np.ndarray, prior: np.ndarray, tv: float = 0.5) -> list[int]:
    """Indices of columns whose vote histogram is further than ``tv`` (total variation) from ``prior``."""
    c = len(prior)
    out = []
    for i, v in enumerate(votes):
        h = np.bincount(v, minlength=c) / max(1, len(v))
        if 0.5 * np.abs(h - prior).sum() > tv:
            out.append(i)
    return out


def dawid_skene(votes: np.ndarray, n_classes: int, groups: Sequence[Sequence[int]] | None = None,
                prior: np.ndarray | None = None, iters: int = 100, smoothing: float = 0.01,
                tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dawid–Skene EM on hard votes (T, N) -> (posterior (N, C), confusions (T, C, C) [truth, vote], π (C,)).

    ``groups``: lists of column indices counted once each (their log-likelihoods averaged); default one group per
    column. ``prior``: a fixed class prior π; None = estimated (the posterior's mean). Starts from the (group-)
    majority vote. ``smoothing``: pseudo-count added to every confusion cell."""
    votes = np.asarray(votes, np.int64)
    t, n = votes.shape
    c = n_classes
    groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(t)]
    onehot = np.eye(c)[votes]  # (T, N, C)
    post = np.zeros((n, c))
    for g in groups:  # majority vote of groups, each group one vote (its members' share)
        post += onehot[g].mean(axis=0)
    post /= post.sum(axis=1, keepdims=True)
    conf = np.zeros((t, c, c))
    pi = np.full(c, 1.0 / c) if prior is None else np.asarray(prior, np.float64)
    for _ in range(iters):
        if prior is None:
            pi = np.maximum(post.mean(axis=0), 1e-12)
        for i in range(t):
            m = post.T @ onehot[i] + smoothing  # (C, C): truth x vote
            conf[i] = m / m.sum(axis=1, keepdims=True)
        logp = np.tile(np.log(pi), (n, 1))
        for g in groups:
            logp += np.mean([np.log(conf[i][:, votes[i]].T) for i in g], axis=0)
        logp -= logp.max(axis=1, keepdims=True)
        new = np.exp(logp)
        new /= new.sum(axis=1, keepdims=True)
        delta = np.abs(new - post).max()
        post = new
        if delta < tol:
            break
    return post, conf, pi


def estimated_accuracy(conf: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """a_t = Σ_c π_c θ_t[c, c] for every column (T,)."""
    return np.einsum("c,tcc->t", np.asarray(pi), np.asarray(conf))


def log_odds_weights(acc: np.ndarray, n_classes: int, groups: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """w_t = max(0, log(a_t (C − 1) / (1 − a_t))) / |group of t|, normalised to sum 1 (all 0 -> equal)."""
    acc = np.clip(np.asarray(acc, np.float64), 1e-6, 1 - 1e-6)
    w = np.maximum(0.0, np.log(acc * (n_classes - 1) / (1.0 - acc)))
    if groups is not None:
        for g in groups:
            w[list(g)] /= len(g)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))


def dawid_skene_weights(probs: dict[str, np.ndarray], prior: np.ndarray | None = None, redundancy_kappa: float = 0.9,
                        collapse_tv: float = 0.5, linked: Sequence[Sequence[str]] = ()) -> tuple[dict[str, float], dict]:
    """Weights per column (every column of ``probs``, (N, C) each) and the details for the report: estimated
    accuracies, groups, dropped (collapsed) columns, the estimated class prior. ``linked``: lists of column names
    that are one group whatever their agreement (the columns of one teacher)."""
    cols = list(probs)
    n_classes = next(iter(probs.values())).shape[1]
    votes = np.stack([np.asarray(probs[k]).argmax(axis=1) for k in cols])
    ref = np.asarray(prior) if prior is not None else np.full(n_classes, 1.0 / n_classes)
    dropped = collapsed_columns(votes, ref, collapse_tv) if collapse_tv < 1 else []
    keep = [i for i in range(len(cols)) if i not in dropped]
    details: dict = {"columns": cols, "dropped": {cols[i]: "collapsed: its predicted-class histogram is "
                                                  f"further than {collapse_tv} (total variation) from the prior"
                                                  for i in dropped}, "redundancy_kappa": redundancy_kappa}
    if not keep:  # every column collapsed: fall back to equal weights, said in the details
        details["note"] = "every column collapsed; equal weights"
        return {k: round(1.0 / len(cols), 6) for k in cols}, details
    kv = votes[keep]
    pos = {cols[i]: j for j, i in enumerate(keep)}
    links = [[pos[k] for k in group if k in pos] for group in linked]
    groups = redundancy_groups(kv, n_classes, redundancy_kappa, [g for g in links if len(g) > 1])
    details["groups"] = [[cols[keep[j]] for j in g] for g in groups]
    weights = {k: 0.0 for k in cols}
    if len(groups) < 3:  # two raters (or one) cannot be told apart without labels: equal weight per group
        for g in groups:
            for j in g:
                weights[cols[keep[j]]] = round(1.0 / (len(groups) * len(g)), 6)
        details["note"] = (f"{len(groups)} independent group(s): Dawid-Skene needs at least 3 to estimate accuracies "
                           "without labels; equal weight per group")
        return weights, details
    post, conf, pi = dawid_skene(kv, n_classes, groups, prior)
    acc = estimated_accuracy(conf, pi)
    w = log_odds_weights(acc, n_classes, groups)
    for j, i in enumerate(keep):
        weights[cols[i]] = round(float(w[j]), 6)
    details.update(estimated_accuracy={cols[i]: round(float(acc[j]), 4) for j, i in enumerate(keep)},
                   class_prior=np.round(pi, 4).tolist())
    return weights, details
