"""Build the timm student (from scratch, local weights or a timm hub/local-dir id) and load a trained one.

Architecture and weights stay separate, as in timm: ``student.model`` names the architecture,
``student.pretrained`` names where initial weights come from:

- ``null``: random init;
- a local file (``.safetensors``/``.pth``/``.bin``) or folder (``model.safetensors`` or ``pytorch_model.bin``,
  plus an optional timm/distillery ``config.json`` whose ``model_args`` are reused): loaded here, the
  classifier head is re-initialised when its shape differs (a different number of classes);
- ``hf-hub:org/name`` or ``local-dir:/folder``: handed to ``timm.create_model(..., pretrained=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["build_student", "load_student", "student_data_config", "pretrained_files"]

_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def _base_name(name: str) -> str:
    from timm.models import split_model_name_tag

    return split_model_name_tag(name)[0]


def _check_arch(model: str, found: str, where: str) -> None:
    if _base_name(model) != _base_name(found):
        raise ValueError(f"student.pretrained: {where} holds a {found!r} model but student.model is {model!r}. "
                         f"Set student.model={_base_name(found)} or point student.pretrained at {model!r} weights.")


def _weights_in(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"student.pretrained: folder {str(folder)!r} holds none of {list(_WEIGHT_NAMES)}. "
                     "Point it at a weights file or a folder saved by timm or distillery.")


def pretrained_files(pretrained: str | None) -> list[Path]:
    """The local weight file a ``student.pretrained`` value reads (for the stage stamp); [] for none or hub ids."""
    if not pretrained:
        return []
    ref = pretrained
    if ref.startswith("hf-hub:"):
        return []
    path = Path(ref.removeprefix("local-dir:"))
    if path.is_file():
        return [path]
    return [_weights_in(path)] if path.is_dir() else []


def _load_matching(model, state_dict: dict, source: str) -> list[str]:
    """Load ``state_dict`` into ``model``; only classifier-head tensors may be missing or differ in shape.

    Returns the names of the head tensors that kept their fresh initialisation.
    """
    own = model.state_dict()
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)

    def is_head(k: str) -> bool:
        return any(k == h or k.startswith(h + ".") for h in heads)

    keep, fresh, bad = {}, [], []
    for k, v in state_dict.items():
        if k not in own:
            bad.append(f"unexpected {k}")
        elif own[k].shape != v.shape:
            (fresh if is_head(k) else bad).append(k if is_head(k) else f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            keep[k] = v
    missing = [k for k in own if k not in state_dict]
    fresh += [k for k in missing if is_head(k)]
    bad += [f"missing {k}" for k in missing if not is_head(k)]
    if bad:
        raise ValueError(f"student.pretrained: weights {source!r} do not fit the {model.pretrained_cfg.get('architecture')} "
                         f"student ({len(bad)} problems, e.g. {bad[:5]}). Check student.model and student.pretrained "
                         "name the same architecture with the same settings.")
    model.load_state_dict(keep, strict=False)
    return fresh


def _create(name: str, **kwargs):
    """``timm.create_model`` with the user's mistakes as messages naming the key (an unknown architecture,
    a keyword argument the model does not take) instead of timm's RuntimeError / TypeError."""
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise ValueError(f"student.model: timm has no model {name!r}. Use a timm model name such as "
                         "mobilenetv3_small_100 or resnet18 (python -c \"import timm; print(timm.list_models('*mobile*'))\" "
                         "lists them).") from e
    except TypeError as e:
        raise ValueError(f"student.model_args: {name!r} does not take these arguments ({e}); give keyword "
                         "arguments of timm.create_model for this model, e.g. {drop_rate: 0.2}.") from e


def build_student(model_name: str, num_classes: int, pretrained: str | None = None,
                  model_args: dict[str, Any] | None = None):
    """Create the student; returns ``(model, architecture, model_args)`` where ``model_args`` are the keyword
    arguments (besides ``pretrained``/``num_classes``) that rebuild the same architecture with ``create_model``."""
    from timm.models import load_state_dict
    from timm.models._factory import parse_model_name
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    model_args = dict(model_args or {})
    if not pretrained:
        model = _create(model_name, pretrained=False, num_classes=num_classes, **model_args)
        return model, model_name, model_args

    ref = pretrained
    if ref.startswith(("hf-hub:", "local-dir:")):
        source, mid = parse_model_name(ref)
        try:
            loader = load_model_config_from_hf if source == "hf-hub" else load_model_config_from_path
            _, arch, saved_args = loader(mid)
        except Exception as e:
            raise ValueError(f"student.pretrained: cannot read the model config of {ref!r}: {str(e).rstrip('.')}. For hub ids, "
                             "make sure the model is in the local Hugging Face cache (runs are offline).") from e
        _check_arch(model_name, arch, ref)
        saved_args = {k: v for k, v in (saved_args or {}).items() if k != "num_classes"}
        model = _create(ref, pretrained=True, num_classes=num_classes, **model_args)
        return model, arch, {**saved_args, **model_args}

    path = Path(ref)
    if not path.exists():
        raise ValueError(f"student.pretrained: {ref!r} does not exist. Give a local weights file or folder, "
                         "'hf-hub:org/name' for a timm hub model, or null to train from scratch.")
    if path.is_dir() and (path / "config.json").is_file():
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if saved.get("architecture"):
            _check_arch(model_name, saved["architecture"], str(path))
        model_args = {**{k: v for k, v in (saved.get("model_args") or {}).items() if k != "num_classes"}, **model_args}
    weights = _weights_in(path) if path.is_dir() else path
    model = _create(model_name, pretrained=False, num_classes=num_classes, **model_args)
    try:
        state_dict = load_state_dict(str(weights), use_ema=False)
    except Exception as e:
        raise ValueError(f"student.pretrained: cannot read weights {str(weights)!r}: {str(e).rstrip('.')}.") from e
    _load_matching(model, state_dict, str(weights))
    return model, model_name, model_args


def student_data_config(model, input_size: int | None = None) -> dict:
    """timm's data config for ``model`` (input size overridable), as JSON-able values."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, input_size, input_size)} if input_size else {}
    dc = resolve_data_config(args, model=model)
    return {
        "input_size": [int(x) for x in dc["input_size"]],
        "interpolation": str(dc["interpolation"]),
        "mean": [float(x) for x in dc["mean"]],
        "std": [float(x) for x in dc["std"]],
        "crop_pct": float(dc["crop_pct"]),
        # The runtime contract implements the center crop only; train, evaluate and export with that.
        "crop_mode": "center",
    }


def load_student(folder: str | Path, device: str = "cpu"):
    """Rebuild a trained student from its folder (``config.json`` + ``model.safetensors``).

    Returns ``(model in eval mode, config dict)``.
    """
    import timm
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"student folder {str(folder)!r} lacks {p.name}; run the student stage first.")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        outputs = config.get("embedding_dim") or config["num_classes"]  # an embedding head outputs the CLIP width
        arch = config["architecture"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(cfg_path)!r} is not a student config ({type(e).__name__}: {e}); it is damaged or "
                         "was written by something else: rerun the student stage (delete the student folder "
                         "first).") from e
    model = timm.create_model(arch, pretrained=False, num_classes=outputs, **config.get("model_args", {}))
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{str(weights)!r} cannot be read as safetensors weights ({type(e).__name__}: {e}); it is "
                         "truncated or damaged: rerun the student stage (delete that file first).") from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{str(weights)!r} does not fit the {arch} in {cfg_path.name} ({str(e).splitlines()[0]}); "
                         "the two files come from different runs: rerun the student stage.") from e
    return model.to(device).eval(), config
