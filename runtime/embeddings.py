"""Class text-embedding matrices for embedding students: numpy only.

An embedding student (``student.head: embedding``) outputs an L2-normalised image embedding in the teacher
CLIP's space; it classifies by cosine against a matrix of class text embeddings, one row per class:

    logits = logit_scale · emb · Tᵀ        emb (B, D) normalised, T (C, D) rows normalised

The matrix travels beside the model as a side file, ``text_embeddings.npz`` (arrays ``embeddings`` (C, D)
float32 and ``class_names`` (C,) unicode; no pickles), named with its sha256 in the model's metadata. A new
matrix (new classes, no retraining) is a new file of the same form: :func:`save_class_embeddings` writes one,
:meth:`distillery.runtime.Classifier.set_class_embeddings` / ``load_class_embeddings`` swaps it in.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from typing import Sequence

import numpy as np

__all__ = ["TEXT_EMBEDDINGS_FILE", "save_class_embeddings", "load_class_embeddings", "check_class_embeddings",
           "cosine_logits", "l2_normalize", "file_sha256"]

TEXT_EMBEDDINGS_FILE = "text_embeddings.npz"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip entry time: the same matrix gives the same bytes (and sha256)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_class_embeddings(matrix, names: Sequence[str], dim: int | None = None,
                           where: str = "class embeddings") -> tuple[np.ndarray, list[str]]:
    """``(matrix (C, D) float32 with normalised rows, names)``; ValueError naming what is wrong."""
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] < 1 or m.dtype.kind not in "fiu":
        raise ValueError(f"{where}: expected a numeric (classes, dim) matrix, got shape {m.shape} dtype {m.dtype}.")
    names = [str(n) for n in names]
    if len(names) != m.shape[0]:
        raise ValueError(f"{where}: {len(names)} class names for {m.shape[0]} matrix rows; give one name per row.")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: class names repeat ({names}); they must be unique.")
    if dim is not None and m.shape[1] != dim:
        raise ValueError(f"{where}: rows have dimension {m.shape[1]} but the model's embedding has {dim}; the "
                         "matrix must come from the same CLIP the student was distilled from (its text encoder).")
    m = m.astype(np.float32)
    if not np.isfinite(m).all() or (np.linalg.norm(m, axis=1) == 0).any():
        raise ValueError(f"{where}: the matrix holds NaN/inf or all-zero rows.")
    return l2_normalize(m), names


def save_class_embeddings(path: str | os.PathLike, matrix, names: Sequence[str]) -> str:
    """Write ``path`` (``.npz``: ``embeddings`` (C, D) float32 normalised, ``class_names``); deterministic bytes.

    Returns the file's sha256.
    """
    m, names = check_class_embeddings(matrix, names, where=os.fspath(path))
    path = os.fspath(path)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for key, arr in (("embeddings", m), ("class_names", np.asarray(names, dtype=str))):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_TIME), buf.getvalue())
    os.replace(tmp, path)
    return file_sha256(path)


def load_class_embeddings(path: str | os.PathLike, dim: int | None = None,
                          sha256: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a side file written by :func:`save_class_embeddings`; with ``sha256``, check it is that file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class embeddings file {path!r} does not exist; an embedding model needs the "
                                f"{TEXT_EMBEDDINGS_FILE} written beside it by `distillery export` (or pass one "
                                "made by save_class_embeddings / the exported text encoder).")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"class embeddings file {path!r}: sha256 {file_sha256(path)[:12]}... differs from the "
                         f"{sha256[:12]}... the model's metadata names; it is not the file exported with this model. "
                         "Re-export, or load your own matrix with load_class_embeddings / --text-embeddings.")
    try:
        with np.load(path, allow_pickle=False) as z:
            m, names = z["embeddings"], z["class_names"].tolist()
    except Exception as e:  # zip/npy errors of many types
        raise ValueError(f"class embeddings file {path!r} is not a readable .npz with 'embeddings' and "
                         f"'class_names' ({type(e).__name__}: {e}).") from e
    return check_class_embeddings(m, names, dim, where=path)


def cosine_logits(embeddings: np.ndarray, matrix: np.ndarray, scale: float) -> np.ndarray:
    """``scale · norm(emb) · Tᵀ``: (B, D), (C, D) -> (B, C) float32."""
    return (float(scale) * (l2_normalize(embeddings) @ matrix.T)).astype(np.float32)
