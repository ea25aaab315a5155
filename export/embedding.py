"""Exporting an embedding student (``student.head: embedding``, ``student/embedding.py``).

The ONNX graph outputs the L2-normalised image embedding, ``"embedding"`` (B, D); the class text-embedding
matrix travels beside it as ``text_embeddings.npz`` (``distillery.runtime.embeddings``), named with its
sha256 in the model's ``distillery`` metadata (``head: embedding``, ``embedding: {dim, logit_scale,
text_embeddings, text_embeddings_sha256, clip, templates, domain}``). The runtime classifies by
``logit_scale · emb · Tᵀ``; parity compares exactly those logits with PyTorch's.

INT8 is post-training only here: quantisation-aware fine-tuning self-distils the torch model's class logits
and re-exports that model, which for this head is a different graph (not done).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from distillery.rundir import atomic_path, log, sha256_file

from .formats import STAGE

__all__ = ["prepare_embedding_export"]


def prepare_embedding_export(model, config: dict, student_dir: Path, out_dir: Path, cfg):
    """``(reference model, graph model, config, export settings)`` for an embedding student: the reference gives
    the cosine logits parity checks, the graph model the normalised embedding; the side file is copied into
    ``out_dir`` and the config carries the metadata and output name ``build_metadata`` / the exporter read."""
    import numpy as np

    from distillery.runtime.embeddings import load_class_embeddings
    from distillery.student.embedding import CosineClassifier, NormalizedEmbedding

    name = config.get("text_embeddings") or "text_embeddings.npz"
    src = Path(student_dir) / name
    if not src.is_file():
        raise FileNotFoundError(f"{STAGE}: the embedding student's class text embeddings {str(src)!r} are missing; "
                                "retrain the student (`distillery student`).")
    sha = sha256_file(src)
    if config.get("text_embeddings_sha256") and config["text_embeddings_sha256"] != sha:
        raise ValueError(f"{STAGE}: {str(src)!r} is not the file the student wrote (sha256 {sha[:12]}... vs "
                         f"config.json's {config['text_embeddings_sha256'][:12]}...); retrain the student.")
    text, names = load_class_embeddings(src, config["embedding_dim"])
    if names != list(config["class_names"]):
        raise ValueError(f"{STAGE}: {str(src)!r} names classes {names}, the student {config['class_names']}.")
    with atomic_path(Path(out_dir) / name) as tmp:
        shutil.copyfile(src, tmp)
    info = config.get("embedding") or {}
    meta = {"head": "embedding",
            "embedding": {"dim": int(config["embedding_dim"]), "logit_scale": float(config["logit_scale"]),
                          "text_embeddings": name, "text_embeddings_sha256": sha, "clip": info.get("clip"),
                          "templates": info.get("templates"), "domain": info.get("domain")}}
    config = {**config, "output_name": "embedding", "distillery_metadata": meta}
    if cfg.int8_qat_epochs > 0 and "int8" in cfg.formats:
        log(f"{STAGE}: embedding student: INT8 is post-training only (quantisation-aware fine-tuning distils class "
            "logits, not embeddings)")
    cfg = dataclasses.replace(cfg, int8_qat_epochs=0)
    reference = CosineClassifier(model, np.asarray(text), config["logit_scale"]).eval()
    return reference, NormalizedEmbedding(model).eval(), config, cfg
