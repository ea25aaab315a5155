"""Zero-shot CLIP probabilities on the real unlabeled images (SPEC §3, first half).

p = softmax(s · f_img · Tᵀ), with T the L2-normalised mean over templates of the normalised text
embeddings of each class (a prompt ensemble) and s the logit scale (100 in the paper).

The stage writes ``teacher/probs/clip.parquet`` (path, sha256, probs) and caches the image
features (``teacher/features/clip.npy``) for the teachers that build on them (AiR, LaTTe-CLIP).
Every teacher writes its own ``probs/<name>.parquet``; the ensemble fuses them.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from distillery.rundir import (RunPaths, atomic_path, is_done, list_images, log, mark_done, save_resolved_job,
                               sha256_file, stage_key, write_table)


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


def encode_images(model, preprocess, paths: list[Path], device: str, batch_size: int, progress: bool = True,
                  desc: str = "clip") -> np.ndarray:
    import torch
    from PIL import Image
    from tqdm import tqdm

    feats = []
    with torch.no_grad():
        for b in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
            ims = []
            for p in paths[b:b + batch_size]:
                try:
                    with Image.open(p) as im:
                        ims.append(preprocess(im.convert("RGB")))
                except OSError as e:
                    raise ValueError(f"image {str(p)!r} cannot be read ({e}); remove or replace it.") from e
            x = torch.stack(ims).to(device)
            feats.append(model.encode_image(x).float().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


def run_clip(job, progress: bool = True) -> dict:
    """Zero-shot CLIP probabilities for every unlabeled image -> ``probs/clip.parquet``."""
    paths = RunPaths(job.run_path)
    cfg = job.teacher.clip
    images = list_images(job.data.unlabeled, job.data.extensions)
    if not images:
        raise ValueError(f"data.unlabeled: no images found in {job.data.unlabeled!r} "
                         f"(looked for {', '.join(job.data.extensions)}).")
    hashes = [sha256_file(p) for p in images]
    out = paths.teacher / "probs" / "clip.parquet"
    feat_path = paths.teacher / "features" / "clip.npy"
    settings = {"clip": asdict(cfg), "classes": job.class_names, "domain": job.domain, "model": job.models.clip}
    key = stage_key(settings, extra=hashes)
    if is_done(paths.teacher, "clip", key, [out, feat_path]):
        log(f"clip: up to date ({len(images)} images in {out})")
        return {"images": len(images), "computed": 0}
    save_resolved_job(job, paths.teacher)
    from distillery.models import load_clip, pick_device

    t0 = time.perf_counter()
    device = pick_device(cfg.device, key="teacher.clip.device")
    model, preprocess, tokenizer = load_clip(job.models.clip, device=device)
    text = np.stack([encode_texts(model, tokenizer, format_templates(cfg.templates, c, job.domain), device)
                     for c in job.class_names])  # (C, M, D)
    weights = zero_shot_weights(text)
    feats = encode_images(model, preprocess, images, device, cfg.batch_size, progress)
    probs = zero_shot_probs(feats, weights, cfg.logit_scale).astype(np.float32)
    feat_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(feat_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, feats.astype(np.float32))
    write_table(out, {"path": [str(p.resolve()) for p in images], "sha256": hashes,
                      "probs": [row.tolist() for row in probs]})
    mark_done(paths.teacher, "clip", key, {"images": len(images)})
    elapsed = time.perf_counter() - t0
    log(f"clip: {len(images)} images in {elapsed:.1f}s -> {out}")
    return {"images": len(images), "computed": len(images), "seconds": round(elapsed, 2)}
