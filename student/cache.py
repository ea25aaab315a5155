"""Decode-once image cache for the student (issue 5, item 3): a uint8 memmap at the training resolution.

Each training image is decoded (by the runtime's rules), resized so its shorter side is ``size`` pixels and
center-cropped to ``size x size`` exactly once; epochs then read a memory-mapped ``uint8`` array instead of
decoding JPEG/PNG files. Augmentation (RandomResizedCrop, flip, RandAugment) runs on the cached pixels.

Layout of a cache folder (one per ``(size, interpolation)``, shared by every run that points at it)::

    <cache>/decode-<size>px-<interpolation>-v1/
        pixels.u8      (slots, size, size, 3) uint8, append-only
        index.json     {"<sha256 of the file's bytes>": slot, ...}, replaced atomically after the pixels are synced

Entries are keyed by the *content hash* of the image file, so a renamed or copied file reuses its slot and
an edited file gets a new one. A crash while appending leaves at most some unreferenced bytes at the end of
``pixels.u8``; the index only ever names slots whose pixels were flushed to disk. One writer at a time.

The difference from decoding every step: RandomResizedCrop samples from the ``size x size`` cached square
instead of the original file, so for non-square images the outer edges of the long side are never seen, and
an image smaller than ``size`` is upsampled once before cropping (a second interpolation).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from distillery.rundir import atomic_path

__all__ = ["DecodeCache", "cache_folder", "decode_square", "file_sha256"]

VERSION = 1


def cache_folder(root: str | Path, size: int, interpolation: str) -> Path:
    return Path(root) / f"decode-{size}px-{interpolation}-v{VERSION}"


def _resample(interpolation: str):
    from distillery.runtime.preprocess import INTERPOLATIONS as table  # the runtime's names and filters

    if interpolation not in table:
        raise ValueError(f"decode cache: unknown interpolation {interpolation!r}; use one of {sorted(table)}.")
    return table[interpolation]


def decode_square(path: str | Path, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """``(size, size, 3)`` uint8: the image decoded like the runtime does, shorter side -> ``size``, center crop."""
    from distillery.runtime.preprocess import load_image

    img = load_image(str(path))
    w, h = img.size
    # Crop box in source pixels (the central square), resized in one call.
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    if (w, h) != (size, size):
        img = img.resize((size, size), _resample(interpolation), box=(left, top, left + side, top + side))
    return np.asarray(img, dtype=np.uint8)


class DecodeCache:
    """A content-addressed ``uint8`` image cache at one resolution (see the module docstring).

    Args:
        root: the cache's parent folder (``student.cache``); created when missing.
        size: side of the cached square in pixels (the training input size).
        interpolation: Pillow resampling for the one-time resize (the student's data-config interpolation).
    """

    def __init__(self, root: str | Path, size: int, interpolation: str = "bicubic"):
        if size < 1:
            raise ValueError(f"decode cache: size must be >= 1 pixel, got {size}.")
        _resample(interpolation)
        self.size, self.interpolation = int(size), interpolation
        self.folder = cache_folder(root, self.size, interpolation)
        self.slot_bytes = self.size * self.size * 3
        self.pixels_path, self.index_path = self.folder / "pixels.u8", self.folder / "index.json"
        self.index: dict[str, int] = {}
        if self.index_path.is_file():
            try:
                self.index = {str(k): int(v) for k, v in json.loads(self.index_path.read_text()).items()}
            except (ValueError, AttributeError) as e:
                raise ValueError(f"decode cache: {self.index_path} is unreadable ({e}); delete the folder "
                                 f"{self.folder} and rerun (it is rebuilt from the images).") from e
            have = self.pixels_path.stat().st_size // self.slot_bytes if self.pixels_path.is_file() else 0
            stale = [k for k, v in self.index.items() if v >= have]
            for k in stale:  # pixels lost (e.g. a truncated file): forget those entries, they are re-decoded
                del self.index[k]
        self._array: np.ndarray | None = None

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.index

    def __len__(self) -> int:
        return len(self.index)

    def add(self, items: list[tuple[str, str | Path]], progress: bool = False, flush_every: int = 512) -> int:
        """Decode and append every ``(sha256, path)`` not cached yet; returns how many were added.

        The pixels are appended and synced, then the index is replaced atomically, every ``flush_every``
        images, so an interruption loses at most that batch of work.
        """
        from tqdm.auto import tqdm

        todo, seen = [], set()
        for sha, path in items:
            if sha not in self.index and sha not in seen:
                todo.append((sha, path))
                seen.add(sha)
        if not todo:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self._array = None  # the memmap grows; reopen on next read
        bar = tqdm(total=len(todo), desc="decode cache", unit="img", disable=not progress, dynamic_ncols=True)
        pending: dict[str, int] = {}
        with open(self.pixels_path, "ab") as f:
            slot = f.tell() // self.slot_bytes
            if f.tell() % self.slot_bytes:  # a torn tail from a crash: pad to a slot boundary, never reuse it
                f.write(b"\0" * (self.slot_bytes - f.tell() % self.slot_bytes))
                slot += 1
            for sha, path in todo:
                try:
                    pixels = decode_square(path, self.size, self.interpolation)
                except Exception as e:  # PIL raises many types: name the file
                    raise ValueError(f"decode cache: cannot read image {str(path)!r}: {str(e).rstrip('.')}. Replace "
                                     "the file or rerun the teacher stage.") from e
                f.write(pixels.tobytes())
                pending[sha] = slot
                slot += 1
                bar.update(1)
                if len(pending) >= flush_every:
                    self._commit(f, pending)
                    pending = {}
            self._commit(f, pending)
        bar.close()
        return len(todo)

    def _commit(self, f, pending: dict[str, int]) -> None:
        if not pending:
            return
        f.flush()
        os.fsync(f.fileno())
        self.index.update(pending)
        with atomic_path(self.index_path) as tmp:
            tmp.write_text(json.dumps(self.index, separators=(",", ":")))

    def array(self) -> np.ndarray:
        """The cache as a read-only ``(slots, size, size, 3)`` uint8 memmap."""
        if self._array is None:
            slots = self.pixels_path.stat().st_size // self.slot_bytes
            self._array = np.memmap(self.pixels_path, dtype=np.uint8, mode="r",
                                    shape=(slots, self.size, self.size, 3))
        return self._array

    def get(self, sha256: str) -> np.ndarray:
        return self.array()[self.index[sha256]]

    def __getstate__(self):  # DataLoader workers reopen the memmap instead of pickling it
        state = self.__dict__.copy()
        state["_array"] = None
        return state


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
