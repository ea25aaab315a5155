"""Image preprocessing that reproduces timm's eval transform with Pillow and numpy only.

The *contract* is the ``preprocess`` dict that ``distillery export`` writes into the ONNX metadata
(SPEC §8); it is built from the student's timm data config by :func:`contract_from_data_config`::

    {"input_size": [3, H, W], "resize": 256, "crop": "center", "interpolation": "bicubic",
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "channel_order": "RGB", "layout": "NCHW", "scale": 255}

For ``crop: center`` (timm's default) the image is resized so its shorter side is ``resize``
(``floor(H / crop_pct)``, torchvision ``Resize(int)``) and centre-cropped to ``H x W``. A
non-square input size stores ``resize: [h, w]`` and resizes keeping the aspect ratio so that both
sides cover ``[h, w]`` (timm ``ResizeKeepRatio``). ``crop: squash`` resizes to exactly
``resize: [h, w]`` before the centre crop. Pixels are then divided by ``scale`` and normalised
with ``mean``/``std`` per channel, giving a ``(3, H, W)`` float32 array (the runtime computes this as
one multiply-add per value, equal to timm's up to float32 rounding; see :class:`Preprocessor`).
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from functools import lru_cache
from typing import Any, Union

import numpy as np
from PIL import Image

__all__ = ["ImageInput", "INTERPOLATIONS", "DRAFT_MARGIN", "Preprocessor", "contract_from_data_config",
           "check_contract", "load_image", "to_rgb", "preprocess", "preprocess_batch"]

# What the runtime accepts as one image: a path, a PIL image or an HWC uint8 RGB array.
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# Same names as timm's ``str_to_interp_mode`` (which maps onto these PIL filters for PIL images).
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash")


def contract_from_data_config(data_config: dict[str, Any]) -> dict[str, Any]:
    """Turn a timm data config (``timm.data.resolve_data_config`` output) into the runtime contract."""
    try:
        c, h, w = (int(v) for v in data_config["input_size"])
        crop_pct = float(data_config.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT when unset
        crop = data_config.get("crop_mode") or "center"
        contract = {
            "input_size": [c, h, w],
            "resize": None,
            "crop": crop,
            "interpolation": str(data_config.get("interpolation") or "bilinear"),
            "mean": [float(v) for v in data_config["mean"]],
            "std": [float(v) for v in data_config["std"]],
            "channel_order": "RGB",
            "layout": "NCHW",
            "scale": 255,
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"data_config {data_config!r} is not a usable timm data config: {e!r}. Expected keys "
                         "input_size [3,H,W], interpolation, mean, std, crop_pct, crop_mode.") from e
    scale_h, scale_w = math.floor(h / crop_pct), math.floor(w / crop_pct)
    # timm: a square target resizes the shorter side (an int); otherwise a keep-ratio/squash resize to [h, w].
    contract["resize"] = scale_h if (crop == "center" and scale_h == scale_w) else [scale_h, scale_w]
    check_contract(contract)
    return contract


MAX_SIDE = 8192  # a network input side above this is a damaged contract, not a model (it would allocate GBs)


def check_contract(contract: Any) -> dict[str, Any]:
    """Validate a preprocessing contract; raise ValueError naming the bad field."""
    if not isinstance(contract, dict):
        raise ValueError(f"preprocess contract: expected a mapping, got {contract!r}.")
    required = ("input_size", "resize", "crop", "interpolation", "mean", "std")
    missing = [k for k in required if k not in contract]
    if missing:
        raise ValueError(f"preprocess contract: missing {', '.join(missing)} in {contract!r}; re-export the model "
                         "with `distillery export` so the metadata carries the whole contract.")
    size = contract["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and size[0] == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"preprocess contract: input_size {size!r} must be [3, H, W] with positive integers.")
    if max(size[1:]) > MAX_SIDE:
        raise ValueError(f"preprocess contract: input_size {size!r} is absurd (a side over {MAX_SIDE} pixels); the "
                         "metadata is damaged or was edited: re-export the model with `distillery export`.")
    resize = contract["resize"]
    ok_int = isinstance(resize, int) and not isinstance(resize, bool) and resize > 0
    ok_pair = isinstance(resize, list) and len(resize) == 2 and all(isinstance(v, int) and v > 0 for v in resize)
    if not (ok_int or ok_pair):
        raise ValueError(f"preprocess contract: resize {resize!r} must be a positive int or [h, w].")
    if max([resize] if ok_int else resize) > 2 * MAX_SIDE:
        raise ValueError(f"preprocess contract: resize {resize!r} is absurd (over {2 * MAX_SIDE} pixels); re-export "
                         "the model with `distillery export`.")
    if contract["crop"] not in CROP_MODES:
        raise ValueError(f"preprocess contract: crop {contract['crop']!r} is not supported; "
                         f"the runtime implements {', '.join(CROP_MODES)}.")
    if contract["crop"] == "squash" and not ok_pair:
        raise ValueError(f"preprocess contract: crop 'squash' needs resize as [h, w], got {resize!r}.")
    if contract["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"preprocess contract: interpolation {contract['interpolation']!r} is not one of "
                         f"{', '.join(INTERPOLATIONS)}.")
    for k in ("mean", "std"):
        v = contract[k]
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise ValueError(f"preprocess contract: {k} {v!r} must be 3 numbers (one per RGB channel).")
    if any(x == 0 for x in contract["std"]):
        raise ValueError(f"preprocess contract: std {contract['std']!r} contains 0.")
    if contract.get("channel_order", "RGB") != "RGB" or contract.get("layout", "NCHW") != "NCHW":
        raise ValueError(f"preprocess contract: channel_order/layout {contract.get('channel_order')!r}/"
                         f"{contract.get('layout')!r} not supported; the runtime feeds RGB NCHW.")
    return contract


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit grayscale modes (PNG, TIFF)
DRAFT_MARGIN = 2  # fast decode keeps >= 2x the resize target: measured max 5/255, mean 0.3/255 vs full decode


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an RGB image, converted the way the contract expects.

    8-bit modes (L, LA, P, RGBA, CMYK, YCbCr, 1, ...) go through ``Image.convert("RGB")`` as timm's loader
    does: alpha is dropped, not composited; CMYK uses Pillow's plain conversion. 16-bit grayscale (I;16*, and
    mode I from a PNG, which older Pillow used for 16-bit PNGs) keeps the high byte, as Pillow itself does
    for 16-bit RGB PNGs -- a bare ``convert("RGB")`` would clip every value above 255 to white. 32-bit
    integer or float images have no agreed 0..255 range and are refused.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and getattr(img, "format", None) == "PNG"):
        a = np.asarray(img).astype(np.int64)  # (H, W); I;16B arrives big-endian, astype normalises it
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        raise ValueError(f"image: mode {mode!r} ({'32-bit integer' if mode == 'I' else 'float'} pixels) has no "
                         "defined 0..255 range; scale it to 8 bits yourself (e.g. an 'L' or 'RGB' image) first.")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"image: Pillow cannot convert mode {mode!r} to RGB ({e}); convert it first.") from e


def _check_size(img: Image.Image, what: str) -> Image.Image:
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{what}: the image is empty ({img.width}x{img.height} pixels).")
    return img


def _array_to_image(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8:
        hint = (" For 16-bit data pass (a >> 8).astype(np.uint8) (full-range 16 bit) or scale it to 0..255."
                if image.dtype == np.uint16 else "")
        raise ValueError(f"image array: dtype {image.dtype} is not supported; pass uint8 pixels in 0..255 "
                         f"(e.g. np.asarray(pil_image)), not a normalised float array.{hint}")
    arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"image array: shape {image.shape} is not an image; expected (H, W), (H, W, 1), "
                         "(H, W, 3) or (H, W, 4) in HWC layout (a CHW array needs .transpose(1, 2, 0)).")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image array: shape {image.shape} is empty.")
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def _open_path(path: str, draft_size=None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``path`` to RGB; returns ``(image, (width, height) of the file)``.

    ``draft_size(w, h) -> (min_w, min_h)``: for JPEG files, let the decoder downscale by 1/2, 1/4 or 1/8
    (Pillow's draft mode) while the result stays at least that size. The returned image is then smaller
    than the file; the second element keeps the file's own size so the geometry is computed from it.
    """
    if not os.path.isfile(path):
        what = "is a directory, not an image file" if os.path.isdir(path) else "does not exist; check the path"
        raise FileNotFoundError(f"image {path!r} {what}.")
    try:
        im = Image.open(path)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path!r} could not be decoded ({e}); is it a valid, complete image file?") from e
    try:
        size = im.size
        if draft_size is not None and im.format == "JPEG":
            min_w, min_h = draft_size(*size)
            if size[0] >= 2 * min_w and size[1] >= 2 * min_h:
                im.draft(im.mode, (min_w, min_h))
        im.load()  # forces the full decode, so a truncated file fails here
        rgb = _check_size(to_rgb(im), f"image {path!r}")
        if rgb is im and getattr(im, "fp", None) is not None:  # a multi-frame file keeps its handle open
            rgb = im.copy()
    except (OSError, Image.DecompressionBombError) as e:
        im.close()
        raise ValueError(f"image {path!r} could not be decoded ({e}); is it a valid, complete image file?") from e
    except ValueError as e:
        im.close()
        raise ValueError(f"image {path!r}: {e}") from e
    if rgb is not im:
        im.close()
    return rgb, size


def load_image(image: ImageInput) -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Accepts a file path, a PIL image (any mode; see :func:`to_rgb`) or a uint8 numpy array shaped (H, W),
    (H, W, 1), (H, W, 3) or (H, W, 4) in **RGB** order (convert OpenCV's BGR first). Raises
    FileNotFoundError for a missing file and ValueError for anything unreadable or of the wrong type.
    """
    if isinstance(image, Image.Image):
        return _check_size(to_rgb(image), "image")
    if isinstance(image, np.ndarray):
        return _array_to_image(image)
    if isinstance(image, (str, os.PathLike)):
        return _open_path(os.fspath(image))[0]
    raise ValueError(f"image: expected a path, a PIL image or a uint8 HWC numpy array, got {type(image).__name__}.")


def _center_crop(img: Image.Image, th: int, tw: int) -> Image.Image:
    """torchvision ``CenterCrop``: zero-pad when the image is smaller, then crop the centre."""
    w, h = img.size
    if w < tw or h < th:
        pad_l, pad_t = max(tw - w, 0) // 2, max(th - h, 0) // 2
        canvas = Image.new("RGB", (max(w, tw), max(h, th)), (0, 0, 0))
        canvas.paste(img, (pad_l, pad_t))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def _resized_size(w: int, h: int, resize: int | list[int], crop: str) -> tuple[int, int]:
    """Output (w, h) of the resize step, with torchvision's and timm's rounding."""
    if crop == "squash":
        return resize[1], resize[0]
    if isinstance(resize, int):  # torchvision Resize(int): shorter side -> resize, longer side truncated
        if w <= h:
            return resize, int(resize * h / w)
        return int(resize * w / h), resize
    ratio = min(h / resize[0], w / resize[1])  # timm ResizeKeepRatio(longest=0)
    return round(w / ratio), round(h / ratio)


def _is_dyadic(ratio: Fraction) -> bool:
    """``ratio`` is m / 2**k: every multiple of it by a half-integer below 2**20 is an exact float."""
    d = ratio.denominator
    return d & (d - 1) == 0 and ratio.numerator < 2 ** 20 and d <= 2 ** 20


@lru_cache(maxsize=256)
def _plan(w: int, h: int, resize: int | tuple[int, int], crop: str, th: int, tw: int):
    """How an image of ``w x h`` pixels becomes ``th x tw``: ``(resized (w, h), crop (left, top), box)``.

    ``box`` is the source rectangle for ONE ``Image.resize(size=(tw, th), box=box)`` call that gives exactly the
    pixels of resize-then-centre-crop, or None where that is not guaranteed. Pillow computes each output
    pixel's filter centre as ``box_left + (x + 0.5) * box_width / tw``; the two-step path computes
    ``(left + x + 0.5) * w / resized_w``. Both give the same float -- hence the same integer filter
    coefficients and pixels -- when ``w / resized_w`` (and ``h / resized_h``) is a dyadic fraction, where
    every one of these products and sums is exact (e.g. 64 -> 256 px: 1/4), and when Pillow runs its two
    passes in the same order for both calls (:func:`_horizontal_first`). Otherwise (or when the crop needs
    zero padding) the caller resizes and crops in two steps, as torchvision does.
    """
    new_w, new_h = _resized_size(w, h, list(resize) if isinstance(resize, tuple) else resize, crop)
    left, top = int(round((new_w - tw) / 2.0)), int(round((new_h - th) / 2.0))
    box = None
    sx, sy = Fraction(w, new_w), Fraction(h, new_h)
    if (new_w >= tw and new_h >= th and _is_dyadic(sx) and _is_dyadic(sy)
            and _horizontal_first(w, h, new_w, new_h) and _horizontal_first(w, h, tw, th)):
        box = (float(left * sx), float(top * sy), float((left + tw) * sx), float((top + th) * sy))
    return (new_w, new_h), (left, top), box


def _horizontal_first(w: int, h: int, out_w: int, out_h: int) -> bool:
    """Whether Pillow resamples ``w x h -> out_w x out_h`` horizontally first (the order changes the rounding).

    Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice the width's
    shrinkage (libImaging/Resample.c); earlier versions always go horizontally first. The one-call path is
    only taken where both versions run both calls horizontally first.
    """
    return not (h - out_h > 0 and h - out_h > (w - out_w) * 2)


class Preprocessor:
    """A contract's preprocessing: decode, resize + centre crop (Pillow), normalise (numpy) into float32 CHW.

    Resize and crop equal timm's eval transform pixel for pixel: where the geometry allows it they run as one
    ``Image.resize(box=...)`` call over just the cropped region (see :func:`_plan`; 20% faster on EuroSAT's
    64 px tiles), else as resize then crop. Normalisation is one fused expression,
    ``pixels * (1 / (scale * std)) + (-mean / std)`` in float32, written straight into the output buffer
    with the HWC -> CHW transpose folded in. It differs from timm's ``(pixels / scale - mean) / std`` only by
    float32 rounding: at most 4.8e-7 with ImageNet's mean/std (checked over all 256 values), for about half
    the time of that three-pass form and a third of a per-channel lookup table's. It holds no mutable state,
    so one instance may be shared by threads.

    ``fast_decode=True`` lets JPEG files decode at 1/2, 1/4 or 1/8 scale (draft mode) when they are at
    least ``2 * DRAFT_MARGIN`` times larger than the resize target, keeping ``DRAFT_MARGIN`` times the target
    so the contract's resize filter still does the final, anti-aliased step. This changes pixels slightly
    (measured on 2048-4096 px mosaics of real EuroSAT tiles: max 4-5, mean 0.3 levels out of 255 after
    resizing; `python -m bench runtime`), for a 2-4x faster decode of large photos.
    """

    def __init__(self, contract: dict[str, Any], fast_decode: bool = False):
        self.contract = check_contract(contract)
        self.fast_decode = bool(fast_decode)
        _, self.height, self.width = contract["input_size"]
        resize = contract["resize"]
        self._resize_key = tuple(resize) if isinstance(resize, list) else resize  # hashable, for _plan's cache
        scale = np.float32(contract.get("scale", 255))
        mean = np.asarray(contract["mean"], dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(contract["std"], dtype=np.float32).reshape(3, 1, 1)
        self._mul = (np.float32(1) / (scale * std)).astype(np.float32)  # (3, 1, 1)
        self._add = (-mean / std).astype(np.float32)
        self._filter = INTERPOLATIONS[contract["interpolation"]]

    def _plan(self, w: int, h: int):
        return _plan(w, h, self._resize_key, self.contract["crop"], self.height, self.width)

    def _draft_size(self, w: int, h: int) -> tuple[int, int]:
        (new_w, new_h), _, _ = self._plan(w, h)
        return DRAFT_MARGIN * new_w, DRAFT_MARGIN * new_h

    def image(self, image: ImageInput) -> Image.Image:
        """Decode, resize and crop: the ``H x W`` RGB image the network sees (before normalisation)."""
        if isinstance(image, (str, os.PathLike)):
            img, (w, h) = _open_path(os.fspath(image), self._draft_size if self.fast_decode else None)
        else:
            img = load_image(image)
            w, h = img.size
        (new_w, new_h), (left, top), box = self._plan(w, h)
        size = (self.width, self.height)
        if img.size != (w, h):  # drafted: map the file's full extent (the last block may be partial) exactly
            sx, sy = w / img.width, h / img.height
            s = float(min((1, 2, 4, 8), key=lambda v: abs(v - sx)))
            fx, fy = w / s / new_w, h / s / new_h  # drafted pixels per resized pixel
            # drafted pixels are approximate anyway, so resize + crop are always one call here
            return img.resize(size, self._filter, box=(left * fx, top * fy, (left + self.width) * fx,
                                                       (top + self.height) * fy))
        if box is not None:  # resize + crop in one call, same pixels (see _plan)
            return img.resize(size, self._filter, box=box)
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), self._filter)
        return _center_crop(img, self.height, self.width)

    def normalize(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(H, W, 3)`` uint8 pixels -> ``(3, H, W)`` float32 (written into ``out`` when given)."""
        if out is None:
            out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
        np.multiply(pixels.transpose(2, 0, 1), self._mul, out=out, dtype=np.float32)
        np.add(out, self._add, out=out)
        return out

    def __call__(self, image: ImageInput, out: np.ndarray | None = None) -> np.ndarray:
        """One image -> ``(3, H, W)`` float32 (written into ``out`` when given)."""
        return self.normalize(np.asarray(self.image(image)), out)

    def batch(self, images: list[ImageInput]) -> np.ndarray:
        """A list of images -> ``(B, 3, H, W)`` float32, filled in place (no stacking copy)."""
        out = np.empty((len(images), 3, self.height, self.width), dtype=np.float32)
        for i, im in enumerate(images):
            self(im, out=out[i])
        return out


def preprocess(image: ImageInput, contract: dict[str, Any], fast_decode: bool = False) -> np.ndarray:
    """One image -> ``(3, H, W)`` float32 array: timm's eval transform for this contract (same pixels, float32
    rounding in the normalisation; approximate pixels for large JPEG files with ``fast_decode=True``; see
    :class:`Preprocessor`)."""
    return Preprocessor(contract, fast_decode)(image)


def preprocess_batch(images: list[ImageInput], contract: dict[str, Any], fast_decode: bool = False) -> np.ndarray:
    """A list of images -> ``(B, 3, H, W)`` float32 batch."""
    return Preprocessor(contract, fast_decode).batch(images)
