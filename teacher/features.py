"""One image-feature store for every teacher that embeds images (CLIP now; AiR, LaTTe-CLIP, Vermouth next).

Features are keyed by (encoder, preprocessing, image sha256): the encoder is a model reference plus a
fingerprint of its local files, the preprocessing is a text that changes whenever the pixels fed to the
model would (for open_clip, the transform's repr: size, interpolation, crop, mean, std). Rows are
addressable by sha256, so a renamed or copied image reuses its row, a new image costs one forward pass and
a rerun costs none.

Layout (``teacher/features/<name>-<key[:16]>/``)::

    meta.json               the encoder, the preprocessing and the feature width
    shard-<n>.npz           sha256 (K,) and features (K, D) float32; each written whole (atomically)

A crash loses at most the shard being written; the rows before it stay.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from distillery import killpoints
from distillery.rundir import atomic_path, read_json, settings_hash, write_json

__all__ = ["FeatureStore", "model_fingerprint", "clip_feature_store", "clip_image_encoder"]


def model_fingerprint(ref: str) -> Any:
    """What identifies a model's weights: for a local folder its files' names, sizes and mtimes, else the ref."""
    from distillery.models import is_local, local_path

    if not is_local(ref):
        return ref
    root = local_path(ref)
    if root.is_file():
        st = root.stat()
        return [ref, st.st_size, st.st_mtime_ns]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [ref] + [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@dataclass
class FeatureStore:
    """Features of one (encoder, preprocessing), addressable by image sha256."""

    root: Path  # teacher/features
    name: str  # short readable prefix of the folder, e.g. "clip"
    encoder: Any  # JSON-able identity of the encoder (ref + fingerprint)
    preprocessing: str  # text that changes when the model's input pixels would

    def __post_init__(self):
        self.key = settings_hash(self.encoder, self.preprocessing)
        self.folder = Path(self.root) / f"{self.name}-{self.key[:16]}"
        self._rows: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            rows: dict[str, np.ndarray] = {}
            for f in sorted(self.folder.glob("shard-*.npz")):
                with np.load(f, allow_pickle=False) as z:
                    for s, v in zip(z["sha256"].tolist(), z["features"]):
                        rows[s] = v
            self._rows = rows
        return self._rows

    def __len__(self) -> int:
        return len(self._load())

    def missing(self, sha256: Sequence[str]) -> list[str]:
        """The hashes (first occurrence order, no repeats) that have no row yet."""
        have = self._load()
        return list(dict.fromkeys(s for s in sha256 if s not in have))

    def get(self, sha256: Sequence[str]) -> np.ndarray:
        """(N, D) float32 rows in the order asked; KeyError naming the first missing hash."""
        have = self._load()
        miss = [s for s in sha256 if s not in have]
        if miss:
            raise KeyError(f"feature store {self.folder.name}: no features for {len(miss)} image(s), e.g. {miss[0]}")
        if not sha256:
            return np.zeros((0, 0), np.float32)
        return np.stack([have[s] for s in sha256]).astype(np.float32)

    def add(self, sha256: Sequence[str], features: np.ndarray) -> None:
        """Write one shard (atomically) with these rows."""
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or len(features) != len(sha256):
            raise ValueError(f"feature store: expected ({len(sha256)}, D) features, got {features.shape}")
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.is_file():
            write_json(meta, {"encoder": self.encoder, "preprocessing": self.preprocessing,
                              "dim": int(features.shape[1])})
        n = len(list(self.folder.glob("shard-*.npz")))
        dest = self.folder / f"shard-{n:05d}-{os.getpid()}.npz"
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, sha256=np.asarray(list(sha256), dtype="U64"), features=features)
        rows = self._load()
        for s, v in zip(sha256, features):
            rows[s] = v
        killpoints.progress("features.shard")  # testing hook: after a shard is committed

    def ensure(self, paths: Sequence[os.PathLike], sha256: Sequence[str], make_fn: Callable[[], Callable],
               executor, batch_size: int, *, desc: str, progress: bool = True, shard_rows: int = 2048) -> int:
        """Compute (through ``executor``) the features of every image not in the store; returns how many.

        ``make_fn()`` builds the per-batch encoder ``fn(list of paths) -> (B, D)`` where the model lives.
        Rows are committed in shards of about ``shard_rows`` as they arrive.
        """
        todo = set(self.missing(sha256))
        items, seen = [], set()
        for p, s in zip(paths, sha256):
            if s in todo and s not in seen:
                items.append((str(p), s))
                seen.add(s)
        if not items:
            return 0
        fn_factory = partial(_paths_only, make_fn)
        pend_s: list[str] = []
        pend_f: list[np.ndarray] = []
        for batch, feats in executor.map_batches(fn_factory, items, batch_size, desc=desc, progress=progress):
            pend_s += [s for _, s in batch]
            pend_f.append(np.asarray(feats, np.float32))
            if len(pend_s) >= shard_rows:
                self.add(pend_s, np.concatenate(pend_f))
                pend_s, pend_f = [], []
        if pend_s:
            self.add(pend_s, np.concatenate(pend_f))
        return len(items)

    def meta(self) -> dict:
        return read_json(self.folder / "meta.json") if (self.folder / "meta.json").is_file() else {}


def _paths_only(make_fn: Callable[[], Callable]) -> Callable[[list], np.ndarray]:
    fn = make_fn()
    return lambda batch: fn([p for p, _ in batch])


# ----------------------------------------------------------------------------------------------
# CLIP image features (open_clip), shared by every CLIP-based teacher.


def _clip_encode_fn(ref: str, device: str) -> Callable[[list[str]], np.ndarray]:
    """Runs where the model lives: load CLIP once, then encode batches of image files."""
    import torch

    from distillery.images import load_rgb
    from distillery.models import load_clip

    model, preprocess, _ = load_clip(ref, device=device)

    def encode(paths: list[str]) -> np.ndarray:
        x = torch.stack([preprocess(load_rgb(p)) for p in paths]).to(device)
        with torch.no_grad():
            return model.encode_image(x).float().cpu().numpy()

    return encode


def clip_image_encoder(ref: str, device: str) -> Callable[[], Callable[[list[str]], np.ndarray]]:
    """A picklable factory of the per-batch CLIP image encoder (for :meth:`FeatureStore.ensure`)."""
    return partial(_clip_encode_fn, ref, device)


def clip_feature_store(job, preprocess, view: str = "clip") -> FeatureStore:
    """The store of ``models.clip`` image features under ``preprocess`` (the model's eval transform)."""
    from distillery.rundir import RunPaths

    return FeatureStore(RunPaths(job.run_path).features, view, model_fingerprint(job.models.clip), repr(preprocess))
