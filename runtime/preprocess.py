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
with ``mean``/``std`` per channel, giving a ``(3, H, W)`` float32 array.
"""
from __future__ import annotations

import math
import os
from typing import Any, Union

import numpy as np
from PIL import Image

__all__ = ["ImageInput", "INTERPOLATIONS", "contract_from_data_config", "check_contract", "load_image",
           "preprocess", "preprocess_batch"]

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
            and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"preprocess contract: input_size {size!r} must be [3, H, W] with positive integers.")
    resize = contract["resize"]
    ok_int = isinstance(resize, int) and not isinstance(resize, bool) and resize > 0
    ok_pair = isinstance(resize, list) and len(resize) == 2 and all(isinstance(v, int) and v > 0 for v in resize)
    if not (ok_int or ok_pair):
        raise ValueError(f"preprocess contract: resize {resize!r} must be a positive int or [h, w].")
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


def load_image(image: ImageInput) -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Accepts a file path, a PIL image (any mode; alpha is dropped, as timm's loader does) or a uint8
    numpy array shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) in **RGB** order (convert OpenCV's
    BGR first). Raises FileNotFoundError for a missing file and ValueError for anything unreadable.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array: dtype {image.dtype} is not supported; pass uint8 pixels in 0..255 "
                             "(e.g. np.asarray(pil_image)), not a normalised float array.")
        arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise ValueError(f"image array: shape {image.shape} is not an image; expected (H, W), (H, W, 1), "
                             "(H, W, 3) or (H, W, 4) in HWC layout.")
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path!r} does not exist; check the path.")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")  # convert() forces the full decode, so a truncated file fails here
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"image {path!r} could not be decoded ({e}); is it a valid image file?") from e
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


def preprocess(image: ImageInput, contract: dict[str, Any]) -> np.ndarray:
    """One image -> ``(3, H, W)`` float32 array, exactly as timm's eval transform for this contract."""
    img = load_image(image)
    _, th, tw = contract["input_size"]
    new_w, new_h = _resized_size(img.width, img.height, contract["resize"], contract["crop"])
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), INTERPOLATIONS[contract["interpolation"]])
    img = _center_crop(img, th, tw)
    x = np.asarray(img, dtype=np.float32) / np.float32(contract.get("scale", 255))  # (H, W, 3)
    mean = np.asarray(contract["mean"], dtype=np.float32)
    std = np.asarray(contract["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)


def preprocess_batch(images: list[ImageInput], contract: dict[str, Any]) -> np.ndarray:
    """A list of images -> ``(B, 3, H, W)`` float32 batch."""
    if not images:
        _, h, w = contract["input_size"]
        return np.zeros((0, 3, h, w), dtype=np.float32)
    return np.stack([preprocess(im, contract) for im in images])
