"""Zero-shot CLIP probabilities on the real unlabeled images (SPEC §3, first half).

p = softmax(s · f_img · Tᵀ), with T the L2-normalised mean over templates of the normalised text
embeddings of each class (a prompt ensemble) and s the model's own exp(logit_scale) (100 for a trained
CLIP; ``teacher.clip.logit_scale`` overrides it). The runner then matches the column to the run's class
prior (``teacher/prior.py``); the uncorrected column's counts are kept in the stamp and the report.

The runner writes ``teacher/probs/clip.parquet`` (path, sha256, probs); the image features live in the
shared feature store (``teacher/features/``, keyed by model, preprocessing and image sha256) for the
teachers that build on them (AiR, LaTTe-CLIP).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .base import TeacherResult, TeacherSettings, register_teacher


def format_templates(templates: list[str], class_name: str, domain: str) -> list[str]:
    return [t.format(c=class_name, domain=domain) for t in templates]


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def zero_shot_weights(text_features: np.ndarray) -> np.ndarray:
    """(C, M, D) text features per class and template -> (C, D) classifier: mean of normalised, renormalised."""
    return l2_normalize(l2_normalize(text_features).mean(axis=1))


def zero_shot_probs(image_features: np.ndarray, weights: np.ndarray, scale: float = 100.0) -> np.ndarray:
    """p = softmax(scale · norm(f_img) · Wᵀ), row-wise; (N, D), (C, D) -> (N, C)."""
    logits = scale * l2_normalize(image_features) @ weights.T
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def encode_texts(model, tokenizer, texts: list[str], device: str) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.encode_text(tokenizer(texts).to(device)).float().cpu().numpy()


@dataclass
class ClipCfg(TeacherSettings):
    templates: list[str] = field(default_factory=lambda: ["a {domain} of a {c}.", "a photo of a {c}."])  # {c}, {domain}
    logit_scale: float | None = None  # p = softmax(scale * f_img . T^T), SPEC §3; null = the model's own exp(logit_scale) (100 for a trained CLIP)
    batch_size: int = 64  # images per encoder batch

    def check(self, key: str) -> None:
        if not self.templates:
            raise ValueError(f"{key}.templates: empty; give at least one template such as 'a photo of a {{c}}.'.")
        for t in self.templates:
            try:
                t.format(c="x", domain="y")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{key}.templates: {t!r} is not a usable template ({type(e).__name__}: {e}); "
                                 "the placeholders are {c} (class) and {domain}.") from e
        if self.batch_size < 1:
            raise ValueError(f"{key}.batch_size: must be >= 1, got {self.batch_size}.")
        if self.logit_scale is not None and not (isinstance(self.logit_scale, (int, float))
                                                 and math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"{key}.logit_scale: must be a number > 0 or null (the model's own), got "
                             f"{self.logit_scale!r} (a trained CLIP's is 100).")


def class_weights(model, tokenizer, templates: list[str], class_names: list[str], domain: str,
                  device: str) -> np.ndarray:
    """The zero-shot classifier (C, D) of a template ensemble (open_clip's build_zero_shot_classifier)."""
    text = np.stack([encode_texts(model, tokenizer, format_templates(templates, c, domain), device)
                     for c in class_names])  # (C, M, D)
    return zero_shot_weights(text)


def model_logit_scale(model) -> float:
    """The CLIP model's own exp(logit_scale) (open_clip keeps the log); 100 when the model has none."""
    ls = getattr(model, "logit_scale", None)
    if ls is None:
        return 100.0
    import torch

    return float(torch.as_tensor(ls).detach().float().exp().item())


def logit_scale_of(setting: float | None, model) -> float:
    """A teacher's logit scale: its setting when given, else the model's own (:func:`model_logit_scale`)."""
    return float(setting) if setting is not None else model_logit_scale(model)


def image_features_of(job, preprocess, device: str, image_sets: list, executor, progress: bool = True,
                      desc: str = "clip features", batch_size: int | None = None) -> list[np.ndarray]:
    """CLIP image features of each image set, through the shared feature store (computed once per image)."""
    from .features import clip_feature_store, clip_image_encoder

    store = clip_feature_store(job, preprocess)
    bs = batch_size or job.teacher.clip.batch_size
    out = []
    for images in image_sets:
        store.ensure(images.paths, images.sha256, clip_image_encoder(job.models.clip, device), executor, bs,
                     desc=desc, progress=progress)
        out.append(store.get(images.sha256))
    return out


def image_features(ctx, model_ref: str, preprocess, device: str, batch_size: int, image_sets: list) -> list[np.ndarray]:
    """CLIP image features of each image set of a teacher's context (see :func:`image_features_of`)."""
    return image_features_of(ctx.job, preprocess, device, image_sets, ctx.executor, ctx.progress,
                             desc=f"{ctx.name} features", batch_size=batch_size)


@register_teacher("clip", settings=ClipCfg, roles=("clip",), needs=("features:clip",))
def run_clip(ctx) -> TeacherResult:
    """Zero-shot CLIP probabilities for every unlabeled (and evaluation) image."""
    from distillery.models import load_clip

    cfg, job = ctx.cfg, ctx.job
    device = ctx.device()
    model, preprocess, tokenizer = load_clip(job.models.clip, device=device)
    weights = class_weights(model, tokenizer, cfg.templates, job.class_names, job.domain_phrase, device)
    sets = prediction_sets(ctx)
    feats = image_features(ctx, job.models.clip, preprocess, device, cfg.batch_size, list(sets.values()))
    scale = logit_scale_of(cfg.logit_scale, model)
    probs = {k: {"clip": zero_shot_probs(f, weights, scale).astype(np.float32)} for k, f in zip(sets, feats)}
    return result_from_sets(probs, info={"logit_scale": round(scale, 6)})


def prediction_sets(ctx) -> dict:
    """The image sets a teacher predicts: "real" (always), "eval" and "synthetic" when the run has them."""
    sets = {"real": ctx.images}
    if ctx.eval_images is not None:
        sets["eval"] = ctx.eval_images
    if ctx.synthetic_images is not None:
        sets["synthetic"] = ctx.synthetic_images
    return sets


def result_from_sets(probs: dict[str, dict], **kw) -> TeacherResult:
    """A TeacherResult from {"real" | "eval" | "synthetic": {column: (n, C)}}."""
    return TeacherResult(probs=probs["real"], eval_probs=probs.get("eval", {}),
                         synthetic_probs=probs.get("synthetic", {}), **kw)
