"""The student's data: the teacher's training manifest, the evaluation folder and the transforms.

The manifest (``runs/<job>/teacher/manifest.parquet``) has one row per training image with the
columns ``path, source, sha256, label, soft_target, weight`` and optionally ``temperature``: the
temperature its soft target was written at (missing or null = 1.0; the loss re-softens it to
``student.temperature``, see ``student/loss.py``). It is validated up front so that a bad row fails
the stage before any training, with a message naming the row, the path and the fix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "MANIFEST_COLUMNS", "TEMPERATURE_COLUMN", "read_manifest", "validate_manifest", "row_temperature", "ManifestDataset",
    "list_eval_images", "ImageListDataset", "train_transform", "eval_transform", "load_rgb", "EpochSampler", "Normalize",
    "sample_seed",
]

MANIFEST_COLUMNS = ("path", "source", "sha256", "label", "soft_target", "weight")
TEMPERATURE_COLUMN = "temperature"  # optional: the temperature the row's soft target was written at
_FIX = "Rerun the teacher stage to rebuild the manifest, or remove the row."


def load_rgb(path: str | Path):
    """Decode an image exactly as the runtime does (16-bit, CMYK, palette ... -> RGB by the same rules)."""
    from distillery.runtime.preprocess import load_image

    return load_image(str(path))


def _bad_row(manifest: Path, rows: list[dict], bad: np.ndarray, problem: str, fix: str = _FIX) -> ValueError:
    """A ValueError for the first offending row (index, path, what is wrong, how many rows share it)."""
    idx = np.flatnonzero(bad)
    i = int(idx[0])
    more = f" ({len(idx) - 1} more rows have the same problem)" if len(idx) > 1 else ""
    return ValueError(f"manifest {str(manifest)!r} row {i} (path {rows[i].get('path')!r}): {problem(i) if callable(problem) else problem}"
                      f"{more}. {fix}")


def validate_manifest(rows: list[dict], num_classes: int, manifest: str | Path = "manifest") -> None:
    """Check every row against the contract; raise ``ValueError`` naming the first bad row and the fix."""
    manifest = Path(manifest)
    if not rows:
        raise ValueError(f"manifest {str(manifest)!r} has no rows; the student has nothing to train on. "
                         "Check that the teacher stage found images in data.unlabeled (or enable synthetic data).")
    missing = [c for c in MANIFEST_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"manifest {str(manifest)!r} lacks the column(s) {missing}; expected {list(MANIFEST_COLUMNS)}. "
                         "Rebuild it with the teacher stage of this version of distillery.")
    n = len(rows)
    paths = [r["path"] for r in rows]
    bad = np.array([not isinstance(p, str) or not Path(p).is_file() for p in paths])
    if bad.any():
        raise _bad_row(manifest, rows, bad, "the image file does not exist",
                       "Restore the file, or rerun the teacher stage to rebuild the manifest.")
    labels = [r["label"] for r in rows]
    bad = np.array([not isinstance(y, (int, np.integer)) or isinstance(y, bool) or not 0 <= y < num_classes
                    for y in labels])
    if bad.any():
        raise _bad_row(manifest, rows, bad, lambda i: f"label {labels[i]!r} is not a class index in [0, {num_classes})"
                       f" (the job has {num_classes} classes)",
                       "The manifest was probably built for other classes: rerun the teacher stage for this job.")
    soft = [r["soft_target"] for r in rows]
    bad = np.array([s is None or len(s) != num_classes for s in soft])
    if bad.any():
        raise _bad_row(manifest, rows, bad, lambda i: f"soft_target has length "
                       f"{None if soft[i] is None else len(soft[i])}, expected {num_classes} (one per class)",
                       "The manifest was probably built for other classes: rerun the teacher stage for this job.")
    arr = np.asarray(soft, dtype=np.float64).reshape(n, num_classes)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise _bad_row(manifest, rows, bad, lambda i: f"soft_target contains NaN/inf: {arr[i].tolist()}")
    bad = (arr < 0).any(axis=1) | (np.abs(arr.sum(axis=1) - 1.0) > 1e-3)
    if bad.any():
        raise _bad_row(manifest, rows, bad, lambda i: f"soft_target is not a probability vector (sum "
                       f"{arr[i].sum():.6f}, min {arr[i].min():.6f}); it must be >= 0 and sum to 1")
    weights = np.array([np.nan if r["weight"] is None else r["weight"] for r in rows], dtype=np.float64)
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        raise _bad_row(manifest, rows, bad, lambda i: f"weight {rows[i]['weight']!r} must be a finite number >= 0")
    temps = np.array([row_temperature(r) for r in rows], dtype=np.float64)
    bad = ~np.isfinite(temps) | (temps <= 0)
    if bad.any():
        raise _bad_row(manifest, rows, bad, lambda i: f"{TEMPERATURE_COLUMN} {rows[i][TEMPERATURE_COLUMN]!r} must be a "
                       "finite number > 0 (the temperature its soft_target was written at; leave it empty for 1)")
    if not (weights > 0).any():
        raise ValueError(f"manifest {str(manifest)!r}: every row has weight 0, so there is nothing to train on. "
                         "Lower teacher.ensemble.min_confidence or enable synthetic data, then rerun the teacher stage.")


def row_temperature(row: dict) -> float:
    """The temperature a manifest row's soft target was written at: its ``temperature``, 1.0 when missing or null."""
    t = row.get(TEMPERATURE_COLUMN)
    return 1.0 if t is None else t


def read_manifest(path: str | Path, num_classes: int) -> list[dict]:
    """Read and validate the manifest; each returned row carries its original index as ``row``."""
    from distillery.rundir import read_table

    rows = read_table(path, what="training manifest")
    validate_manifest(rows, num_classes, path)
    for i, r in enumerate(rows):
        r["row"] = i
    return rows


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: a pure function, so workers and resumes agree."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ManifestDataset:
    """Manifest rows -> ``(image (3, H, W) uint8, label, soft_target (C,), weight, temperature)``; zero-weight rows
    are dropped. ``temperature`` is the one the soft target was written at (:func:`row_temperature`).

    Items are fetched by ``(index, epoch)`` keys (see :class:`EpochSampler`): before transforming, Python's and
    NumPy's global RNGs are seeded from ``(seed, epoch, index)``, so the augmentation of every sample is fixed
    by the job's seed alone, whatever the number of DataLoader workers and wherever a run was resumed.
    With ``cache`` (a :class:`~distillery.student.cache.DecodeCache` holding every row's sha256) the pixels
    come from the uint8 memmap instead of the image file.
    """

    def __init__(self, rows: list[dict], transform, cache=None, seed: int = 0):
        import torch

        self.rows = [r for r in rows if r["weight"] > 0]  # weight 0 = ignore; no point decoding them
        self.transform = transform
        self.cache = cache
        self.seed = seed
        self.soft = torch.tensor(np.asarray([r["soft_target"] for r in self.rows], dtype=np.float32))
        self.labels = torch.tensor([r["label"] for r in self.rows], dtype=torch.long)
        self.weights = torch.tensor([r["weight"] for r in self.rows], dtype=torch.float32)
        self.temperatures = torch.tensor([float(row_temperature(r)) for r in self.rows], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int):
        """Row ``i``'s decoded RGB image (from the cache when there is one)."""
        from PIL import Image

        r = self.rows[i]
        if self.cache is not None:
            return Image.fromarray(self.cache.get(r["sha256"]))
        try:
            return load_rgb(r["path"])
        except Exception as e:  # PIL raises many types; name the row and the file
            raise ValueError(f"manifest row {r['row']}: cannot read image {r['path']!r}: {str(e).rstrip('.')}. Replace the file or "
                             "rerun the teacher stage.") from e

    def __getitem__(self, key):
        import random

        i, epoch = key if isinstance(key, tuple) else (key, 0)
        s = sample_seed(self.seed, epoch, i)
        random.seed(s)
        np.random.seed(s % 2**32)
        return self.transform(self.image(i)), self.labels[i], self.soft[i], self.weights[i], self.temperatures[i]


class EpochSampler:
    """Yields ``(index, epoch)``: a permutation fixed by ``(seed, epoch)``, optionally starting mid-epoch.

    Call :meth:`set_epoch` before iterating. With ``drop_last`` the permutation is cut to whole batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False):
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        used = self.n // self.batch_size * self.batch_size if self.drop_last else self.n
        return max(used - self.start_batch * self.batch_size, 0)

    def __iter__(self):
        import torch

        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        if self.drop_last:
            order = order[: self.n // self.batch_size * self.batch_size]
        for i in order[self.start_batch * self.batch_size:]:
            yield i, self.epoch


def list_eval_images(folder: str | Path, folders: list[str], extensions, check: bool = False) -> list[tuple[Path, int]]:
    """ImageFolder layout -> ``[(image path, class index)]``; ``folders[i]`` is class i's sub-folder name.

    A sub-folder that matches no class is an error (it would silently be left out of the accuracy). ``check``:
    decode every file first and refuse the folder, naming the files, when one is not a usable image.
    """
    from distillery.rundir import list_images

    folder = Path(folder)
    index = {name: i for i, name in enumerate(folders)}
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [d for d in subdirs if d not in index]
    if unknown:
        raise ValueError(f"data.eval: sub-folder(s) {unknown} of {str(folder)!r} match no class; the classes' folders are "
                         f"{folders}. Set classes[i].folder to the sub-folder name of each class.")
    items = [(p, index[d]) for d in subdirs for p in list_images(folder / d, extensions)]
    if not items:
        raise ValueError(f"data.eval: no images found in the class sub-folders of {str(folder)!r} (looked for {folders}). "
                         "Use the ImageFolder layout: one sub-folder of images per class.")
    if check:  # before any training: an evaluation file that cannot be decoded would fail only at the end
        from distillery.images import check_image

        bad = [(p, why) for p, _ in items if (why := check_image(p)) is not None]
        if bad:
            shown = "; ".join(f"{str(p)!r}: {why}" for p, why in bad[:3])
            raise ValueError(f"data.eval: {len(bad)} file(s) in {str(folder)!r} cannot be used as images ({shown}"
                             f"{'; ...' if len(bad) > 3 else ''}); remove them or fix data.eval.")
    return items


class ImageListDataset:
    """``[(path, label)]`` -> ``(image (3, H, W), label)``."""

    def __init__(self, items: list[tuple[Path, int]], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(load_rgb(path)), label


class _HorizontalFlip:
    """Flip left-right with probability ``p``, drawing from Python's ``random`` (seeded per sample)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img):
        import random

        from PIL import Image

        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else img


def _to_uint8_chw(img):
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def train_transform(data_config: dict, scale: tuple[float, float] = (0.08, 1.0), randaugment: str | None = None):
    """PIL image -> ``(3, H, W)`` uint8 tensor: RandomResizedCrop + horizontal flip (the DDN recipe), then
    timm's RandAugment when ``randaugment`` is a config string such as ``"rand-m9-mstd0.5"``.

    Only Python's and NumPy's RNGs are used (seeded per sample by :class:`ManifestDataset`). Normalisation
    happens on the device, batched: :class:`Normalize`.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    size = tuple(data_config["input_size"][1:])
    ops = [RandomResizedCropAndInterpolation(size, scale=scale, interpolation=data_config["interpolation"]),
           _HorizontalFlip()]
    if randaugment:
        from timm.data.auto_augment import rand_augment_transform

        import re

        bad = [c for c in str(randaugment).split("-")[1:]
               if not (c.startswith("t") or re.fullmatch(r"(mstd|mmax|inc|m|n|p)\d+(\.\d+)?", c))]
        if bad or not str(randaugment).startswith("rand"):
            raise ValueError(f"student.randaugment: {randaugment!r} is not a timm RandAugment string (cannot read "
                             f"{bad or randaugment!r}); use e.g. 'rand-m9-mstd0.5' or 'rand-m7-n2' (m = magnitude "
                             "0-10, n = ops per image, mstd = magnitude noise, p = probability, inc1 = increasing ops).")
        hparams = {"translate_const": int(min(size) * 0.45),
                   "img_mean": tuple(int(round(255 * m)) for m in data_config["mean"])}
        try:
            ops.append(rand_augment_transform(randaugment, hparams))
        except Exception as e:  # timm raises AssertionError/ValueError/KeyError on a bad string
            raise ValueError(f"student.randaugment: {randaugment!r} is not a timm RandAugment string ({e}); "
                             "use e.g. 'rand-m9-mstd0.5' or 'rand-m7-n2'.") from e
    ops.append(_to_uint8_chw)
    return T.Compose(ops)


class Normalize:
    """uint8 ``(B, 3, H, W)`` on any device -> float32 ``(x / 255 - mean) / std`` in one fused multiply-add."""

    def __init__(self, mean, std, device="cpu", channels_last: bool = False):
        import torch

        std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x):
        return (x.float() * self.scale - self.shift).contiguous(memory_format=self.memory_format)


def eval_transform(data_config: dict):
    """timm's own eval transform for the data config (resize, center crop, normalise)."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)
