"""The embedding student (``student.head: embedding``): an open-vocabulary student that regresses the teacher
CLIP's image embedding instead of class logits (feature distillation), so new classes need only new text
embeddings, not retraining.

The timm model's classifier outputs D = the CLIP embedding width. Per image i of the manifest, with
t_i = norm(CLIP image feature of the *un-augmented* image) from the teacher's feature store (keyed by image
sha256; preprocessed by the CLIP's own eval transform, as the clip teacher computed it) and e_i = student(x_i)
of the *augmented* view x_i (RandomResizedCrop + flip, the usual student recipe):

    l_i = 1 − cos(e_i, t_i)  [+ β · KD(s · norm(e_i) · Tᵀ, p_i)]          L = Σ w_i l_i / Σ w_i

The target is the un-augmented image's embedding, as in feature distillation: the student learns to map every
crop of an image to where CLIP puts the whole image (recomputing CLIP on each crop would cost a CLIP forward per
step). T (C, D) is the class text-embedding matrix of the clip teacher (its templates and domain phrase, built by
``teacher/clip.py``'s own ``class_weights``), s its ``logit_scale``; the optional term (β =
``student.embedding_distill``, default 0 = off) is the usual :func:`distillation_loss` on those cosine logits
against the manifest's soft labels (``student.distill_alpha``, ``student.temperature``). Classification is
argmax of s · norm(e) · Tᵀ: evaluation, export parity and the runtime use exactly that.

Rows missing from the feature store (e.g. with the clip teacher disabled) are computed here through the same
store, with the same encoder and preprocessing, and said in one log line. The student stage saves T as
``student/text_embeddings.npz`` (``distillery.runtime.embeddings``; the export ships it beside the model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .loss import distillation_loss

__all__ = ["HEADS", "EMBEDDING_VERSION", "EmbeddingHead", "prepare_head", "embedding_loss", "CosineClassifier",
           "NormalizedEmbedding", "stage_settings", "TEXT_FILE"]

HEADS = ("logits", "embedding")
EMBEDDING_VERSION = "1"  # bump when the embedding loss or its targets change
TEXT_FILE = "text_embeddings.npz"
_NEW_KEYS = ("head", "embedding_distill")  # StudentCfg keys this module added; absent from a logits head's key


def stage_settings(settings: dict, job) -> dict:
    """The student stage's stamp settings: a logits head hashes exactly what it hashed before these settings
    existed (so its runs are not redone); an embedding head adds its version and the CLIP that makes targets."""
    student = dict(settings["student"])
    if job.student.head == "logits":
        for k in _NEW_KEYS:
            student.pop(k, None)
        return {**settings, "student": student}
    from distillery.teacher.features import model_fingerprint

    return {**settings, "embedding": {"version": EMBEDDING_VERSION, "clip": model_fingerprint(job.models.clip),
                                      "templates": job.teacher.clip.templates, "domain": job.domain_phrase,
                                      "logit_scale": job.teacher.clip.logit_scale}}


def embedding_loss(emb: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, *, text: torch.Tensor | None = None,
                   logit_scale: float = 100.0, distill: float = 0.0, soft: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, temperature: float = 1.0, alpha: float = 0.0,
                   target_temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Σ w_i (1 − cos(emb_i, target_i)) / Σ w_i, plus ``distill`` · KD on ``logit_scale · norm(emb) · textᵀ``.

    emb, target: (B, D); weights: (B,); text: (C, D) normalised rows (needed when ``distill`` > 0).
    """
    emb = emb.float()
    w = weights.to(emb.dtype)
    cos = F.cosine_similarity(emb, target.to(emb.dtype), dim=-1)  # (B,)
    loss = (w * (1.0 - cos)).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
    if distill > 0:
        logits = logit_scale * F.normalize(emb, dim=-1) @ text.to(emb.dtype).T  # (B, C)
        loss = loss + distill * distillation_loss(logits, soft, labels, weights, temperature=temperature, alpha=alpha,
                                                  target_temperature=target_temperature)
    return loss


class NormalizedEmbedding(torch.nn.Module):
    """The exported graph: image -> norm(student(image)), (B, D)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return F.normalize(self.model(x).float(), dim=-1)


class CosineClassifier(torch.nn.Module):
    """image -> logit_scale · norm(student(image)) · Tᵀ, (B, C): what evaluation, parity and the runtime compute."""

    def __init__(self, model: torch.nn.Module, text: np.ndarray | torch.Tensor, logit_scale: float):
        super().__init__()
        self.model = model
        self.register_buffer("text", torch.as_tensor(np.asarray(text, np.float32)))
        self.logit_scale = float(logit_scale)

    def forward(self, x):
        return self.logit_scale * F.normalize(self.model(x).float(), dim=-1) @ self.text.T


class _WithTargets:
    """A :class:`ManifestDataset` whose items also carry the row's CLIP target embedding (D,)."""

    def __init__(self, base, targets: torch.Tensor):
        self.base, self.targets = base, targets
        self.rows = base.rows

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return (*self.base[key], self.targets[i])


@dataclass
class EmbeddingHead:
    """What an embedding student's training needs from the teacher CLIP."""

    dim: int  # the CLIP embedding width D (the timm classifier's outputs)
    text: np.ndarray  # (C, D) normalised class text embeddings
    logit_scale: float
    distill: float  # β of the optional logits term
    clip_ref: str
    info: dict = field(default_factory=dict)
    _clip: Any = None  # (model, preprocess) while targets are being made

    def wrap(self, dataset, job, progress: bool = True):
        """``dataset`` with each row's normalised CLIP target (from the feature store; missing rows computed)."""
        from distillery.executor import LocalExecutor
        from distillery.rundir import log
        from distillery.teacher.features import clip_feature_store, clip_image_encoder

        from .cache import file_sha256
        from .dist import is_main

        _, preprocess = self._clip
        store = clip_feature_store(job, preprocess)
        rows = dataset.rows
        sha = [r["sha256"] or file_sha256(r["path"]) for r in rows]
        missing = store.missing(sha)
        if missing and is_main():
            log(f"student: {len(missing)} of {len(set(sha))} training images have no CLIP features in "
                f"{store.folder}; computing them with {self.clip_ref} (same encoder and preprocessing).")
            store.ensure([r["path"] for r in rows], sha, clip_image_encoder(self.clip_ref, "cpu"), LocalExecutor(job),
                         job.teacher.clip.batch_size, desc="student clip targets", progress=progress)
        feats = store.get(sha)  # (N, D)
        if feats.shape[1] != self.dim:
            raise ValueError(f"student.head=embedding: the feature store {store.folder} holds {feats.shape[1]}-d "
                             f"features but {self.clip_ref} embeds to {self.dim}; delete that folder and rerun.")
        self.info.update(targets=len(rows), computed_here=len(missing), store=store.folder.name)
        self._clip = None
        t = torch.as_tensor(feats)
        return _WithTargets(dataset, F.normalize(t, dim=-1))

    def loss(self, out, target, soft, labels, weights, soft_temp, perm, lam, cfg) -> torch.Tensor:
        """The training loss of one batch (mixing as the logits head does: λ·L(a) + (1−λ)·L(b))."""
        text = torch.as_tensor(self.text, device=out.device)

        def one(t, s, y, w, st):
            return embedding_loss(out, t, w, text=text, logit_scale=self.logit_scale, distill=self.distill, soft=s,
                                  labels=y, temperature=cfg.temperature, alpha=cfg.distill_alpha, target_temperature=st)

        loss = one(target, soft, labels, weights, soft_temp)
        if perm is not None:
            loss = lam * loss + (1.0 - lam) * one(target[perm], soft[perm], labels[perm], weights[perm],
                                                  soft_temp[perm])
        return loss

    def classifier(self, model: torch.nn.Module) -> CosineClassifier:
        return CosineClassifier(model, self.text, self.logit_scale).to(next(model.parameters()).device)

    def config(self) -> dict:
        """What ``student/config.json`` gains (the export reads it)."""
        return {"head": "embedding", "embedding_dim": self.dim, "logit_scale": self.logit_scale,
                "text_embeddings": TEXT_FILE, "embedding": dict(self.info)}

    def save_text(self, folder: Path, class_names: list[str]) -> str:
        from distillery.runtime.embeddings import save_class_embeddings

        return save_class_embeddings(Path(folder) / TEXT_FILE, self.text, class_names)


def prepare_head(job) -> EmbeddingHead | None:
    """None for ``student.head: logits``; else the teacher CLIP's class text matrix and embedding width.

    Loads the CLIP on the CPU before the student is seeded, so the student's initialisation is unchanged."""
    if job.student.head == "logits":
        return None
    from distillery.models import load_clip
    from distillery.teacher.clip import class_weights, logit_scale_of

    clip = job.teacher.clip
    model, preprocess, tokenizer = load_clip(job.models.clip, device="cpu")
    text = class_weights(model, tokenizer, clip.templates, job.class_names, job.domain_phrase, "cpu")  # (C, D)
    info = {"clip": job.models.clip, "templates": list(clip.templates), "domain": job.domain_phrase,
            "target": "CLIP image embedding of the un-augmented image (teacher feature store)",
            "distill": job.student.embedding_distill}
    return EmbeddingHead(dim=int(text.shape[1]), text=text.astype(np.float32), logit_scale=logit_scale_of(clip.logit_scale, model),
                         distill=float(job.student.embedding_distill), clip_ref=job.models.clip, info=info,
                         _clip=(model, preprocess))
