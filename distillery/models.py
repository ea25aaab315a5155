"""Loading every model role through its own library's loader, with errors that say what to do.

A role (``diffusion``, ``clip``, ``captioner``, ``expert``) names a hub id or a local folder. The
same call serves both: diffusers/transformers ``from_pretrained``, open_clip ``create_model``
(``'ViT-B-32/laion2b_s34b_b79k'`` or ``'local-dir:/path'``), timm ``create_model``
(``'resnet18'``, ``'hf-hub:...'`` or ``'local-dir:/path'``).

Where no hub can be reached, loading a missing model must fail in seconds, not after minutes of
retries: :func:`prepare_hub_access` probes the hub once and turns on ``HF_HUB_OFFLINE`` when it is
unreachable, before any Hugging Face library is imported.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .rundir import log

HUB_HOST = "huggingface.co"


class ModelLoadError(RuntimeError):
    """A model role could not be loaded; the message names the role, the reference and the fix."""


def is_local(ref: str) -> bool:
    return ref.startswith("local-dir:") or Path(ref).is_absolute() or ref.startswith((".", "~"))


def local_path(ref: str) -> Path:
    return Path(os.path.expanduser(ref.removeprefix("local-dir:")))


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def prepare_hub_access(refs: list[str]) -> None:
    """If any reference needs the hub and the hub is unreachable, go offline before importing HF libraries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    if any(not is_local(r) for r in refs) and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        log(f"{HUB_HOST} is unreachable: HF_HUB_OFFLINE=1 (models must be in the local cache or a local folder)")


def quiet_loading() -> None:
    """Silence the Hugging Face libraries' own loading bars ("Loading pipeline components", "Loading weights")
    when progress bars are off (``--no-progress`` sets HF_HUB_DISABLE_PROGRESS_BARS=1)."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        return
    for mod in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            __import__(mod, fromlist=["disable_progress_bar"]).disable_progress_bar()
        except ImportError:
            pass


def _fix_hint(role: str) -> str:
    return (f"Point models.{role} at a local folder holding the model (e.g. models.{role}=/path/to/folder on the "
            "command line), or cache it first on a machine with internet and copy ~/.cache/huggingface. Set "
            "HF_HUB_OFFLINE=1 where no hub is reachable. For the offline demo, `make tiny-models` builds tiny "
            "random models into models/tiny/.")


def _check_local(role: str, ref: str) -> None:
    if is_local(ref) and not local_path(ref).exists():
        raise ModelLoadError(f"models.{role}: local folder {str(local_path(ref))!r} does not exist. {_fix_hint(role)}")


def check_local_models(roles: dict[str, str]) -> None:
    """Before any work: every local model reference (``models.<role>`` / ``student.pretrained``) exists.
    Raises :class:`ModelLoadError` naming the first missing one; hub ids are left to the loaders."""
    for role, ref in roles.items():
        if ref and is_local(ref) and not local_path(ref).exists():
            key = role if "." in role else f"models.{role}"
            raise ModelLoadError(f"{key}: local path {str(local_path(ref))!r} does not exist (checked before any "
                                 f"work). Point {key} at an existing model folder or a hub id"
                                 f"{'; `make tiny-models` builds the offline demo models into models/tiny/' if '.' not in role else ''}.")


def _wrap(role: str, ref: str, e: Exception) -> ModelLoadError:
    offline = " (HF_HUB_OFFLINE=1: only locally cached files are used)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    why = str(e).splitlines()[0] if str(e) else ""
    if len(why) > 300:  # e.g. open_clip appends every pretrained tag it knows (4.5 KB): the start says it
        why = why[:300].rsplit(" ", 1)[0] + " ..."
    return ModelLoadError(f"models.{role}: could not load {ref!r}{offline}: {type(e).__name__}: {why}. "
                          f"{_fix_hint(role)}")


def pick_device(setting: str = "auto", key: str = "device") -> str:
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked to be a usable torch device.

    ``key`` names the job setting in the error message (e.g. ``student.device``).
    """
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(setting)
    except RuntimeError as e:
        raise ValueError(f"{key}: {setting!r} is not a device; use auto, cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}: {setting!r} requested but CUDA is not available here; use auto or cpu.")
    return setting


def load_diffusion(ref: str, device: str = "cpu", half: bool = False):
    """A diffusers StableDiffusionPipeline from a hub id or a local folder (safety checker off)."""
    _check_local("diffusion", ref)
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if (half and device.startswith("cuda")) else torch.float32
    quiet_loading()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local_path(ref)) if is_local(ref) else ref, dtype=dtype,
            safety_checker=None, requires_safety_checker=False,
        )
    except Exception as e:  # diffusers raises OSError/EnvironmentError/ValueError on a missing model
        raise _wrap("diffusion", ref, e) from e
    if len(pipe.tokenizer) == 0:
        raise ModelLoadError(f"models.diffusion: the tokenizer of {ref!r} is empty (a CLIP tokenizer loaded from a "
                             f"missing id comes back empty). {_fix_hint('diffusion')}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def open_clip_name(ref: str) -> tuple[str, str | None]:
    """Map a clip reference to open_clip's (model_name, pretrained) pair."""
    if ref.startswith(("hf-hub:", "local-dir:")):
        return ref, None
    if is_local(ref):
        return f"local-dir:{ref}", None
    if "/" in ref:
        arch, tag = ref.split("/", 1)
        return arch, tag
    raise ModelLoadError(f"models.clip: {ref!r} names an architecture without weights. Use 'ARCH/TAG' "
                         "(e.g. ViT-B-32/laion2b_s34b_b79k), 'hf-hub:org/name' or a local folder holding "
                         "open_clip_config.json and open_clip_model.safetensors.")


def load_clip(ref: str, device: str = "cpu"):
    """(model, preprocess, tokenizer) from open_clip."""
    _check_local("clip", ref)
    if is_local(ref) and not (local_path(ref) / "open_clip_config.json").is_file():
        raise ModelLoadError(f"models.clip: {str(local_path(ref))!r} has no open_clip_config.json; a local CLIP "
                             "folder needs open_clip_config.json and open_clip_model.safetensors "
                             "(open_clip's hf-hub layout).")
    import open_clip

    name, pretrained = open_clip_name(ref)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:
        raise _wrap("clip", ref, e) from e
    model.eval()
    return model, preprocess, tokenizer


def load_captioner(ref: str, device: str = "cpu"):
    """(model, processor) for an image-to-text model (BLIP, LLaVA-class) via transformers' Auto classes."""
    _check_local("captioner", ref)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = str(local_path(ref)) if is_local(ref) else ref
    quiet_loading()
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path)
    except Exception as e:
        raise _wrap("captioner", ref, e) from e
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and len(tok) == 0:
        raise ModelLoadError(f"models.captioner: the tokenizer of {ref!r} is empty. {_fix_hint('captioner')}")
    return model.to(device).eval(), processor


def load_expert(ref: str, device: str = "cpu", **kwargs):
    """A timm model: a registry name (with its default pretrained weights), 'hf-hub:...' or a local folder."""
    _check_local("expert", ref)
    import timm

    name = f"local-dir:{local_path(ref)}" if is_local(ref) and not ref.startswith("local-dir:") else ref
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        raise _wrap("expert", ref, e) from e
    return model.to(device).eval()
