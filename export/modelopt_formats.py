"""TensorRT-style export formats built with NVIDIA Model Optimizer (the ``distillery[modelopt]`` extra).

``int8_qdq`` -> ``model.int8_qdq.onnx``
    Explicit quantisation in the form TensorRT fuses: symmetric int8 QuantizeLinear/DequantizeLinear pairs on
    every Conv weight (per output channel, axis 0, zero point 0) and on their inputs (per tensor, zero
    point 0), placed by ``modelopt.torch.quantization`` (``mtq.quantize`` with ``INT8_DEFAULT_CFG``, max
    calibration on the export's calibration images -- the same class-balanced domain images today's INT8 uses;
    timm's classifier is ``timm.layers.Linear``, a subclass modelopt 0.47 does not convert, so it stays float,
    as ``export.int8_exclude`` keeps it in today's INT8),
    then, with ``export.qdq_qat_epochs`` > 0, quantisation-aware fine-tuning of the fake-quantised model by
    self-distillation from the student on the unlabeled domain images (as :mod:`distillery.export.qat`; no
    labels). Exported with ``torch.onnx.export``; onnxruntime runs it on the CPU (the parity gate), TensorRT
    builds an int8 engine from it where TensorRT and a GPU exist. It is never the CPU deploy choice: on the CPU
    the onnxruntime-exact ``int8`` file is the one to ship.

``sparse24`` -> ``model.sparse24.onnx``
    2:4 structured sparsity (``modelopt.torch.sparsity``, ``sparse_magnitude``): in every group of 4 consecutive
    input channels of a Conv/Linear weight (at each output channel and kernel position) 2 are zero, the pattern
    sparse tensor cores run. modelopt sparsifies only layers with ``out % 8 == 0`` and ``in % 16 == 0``
    (its ASP rule), which leaves out the first conv (3 input channels), every depthwise conv (1 input channel
    per group) and small layers such as a 10-class classifier; :func:`sparsifiable_layers` states that rule.
    Then ``export.sparse24_epochs`` of fine-tuning under the fixed mask (self-distillation from the dense student
    on the unlabeled domain images), ``mts.export`` and a plain FP32 ONNX export: BatchNorm folding scales whole
    output channels, so the zeros survive into the ONNX weights. Speed-up needs TensorRT on a GPU.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from distillery.rundir import atomic_path, log

__all__ = ["MODELOPT_FORMATS", "modelopt_unavailable_reason", "require_modelopt", "quantize_int8", "build_int8_qdq",
           "build_sparse24", "build_modelopt_format", "sparsifiable_layers", "qdq_summary", "sparsity_24_report"]

MODELOPT_FORMATS = {"int8_qdq": "model.int8_qdq.onnx", "sparse24": "model.sparse24.onnx"}
INSTALL_HINT = "pip install 'distillery[modelopt]'"


def modelopt_unavailable_reason() -> str | None:
    """None when ``modelopt.torch`` imports, else one line saying why and how to install it."""
    try:
        import modelopt.torch.quantization  # noqa: F401
        import modelopt.torch.sparsity  # noqa: F401
    except Exception as e:  # ImportError, or a modelopt that fails on this torch
        return f"NVIDIA Model Optimizer is not usable ({type(e).__name__}: {e}); {INSTALL_HINT}"
    return None


def require_modelopt(fmt: str) -> None:
    reason = modelopt_unavailable_reason()
    if reason:
        raise RuntimeError(f"export format {fmt!r} needs NVIDIA Model Optimizer: {reason}")


class _quiet:
    """modelopt prints a line per layer and it and the TorchScript exporter warn on every traced quantizer
    branch; that is noise in the stage's log (stdout and warnings are muted inside)."""

    def __enter__(self):
        import contextlib
        import io

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._out = contextlib.redirect_stdout(io.StringIO())
        self._out.__enter__()
        return self

    def __exit__(self, *exc):
        self._out.__exit__(*exc)
        self._w.__exit__(*exc)


def _self_distill(student, teacher, images: np.ndarray, *, epochs: int, lr: float, seed: int, batch_size: int = 32,
                  desc: str = "", progress: bool = True) -> list[float]:
    """Fine-tune ``student`` (eval mode: BatchNorm statistics stay) towards ``teacher``'s softmax on ``images``
    (random horizontal flips), KL loss, AdamW with a cosine schedule. Returns the mean loss per epoch."""
    import torch
    import torch.nn.functional as F

    from distillery.student.loss import distillation_loss

    student.eval()
    teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = max(1, math.ceil(len(images) / batch_size))
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        acc = 0.0
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size].numpy()
            x = torch.from_numpy(images[idx])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
            with torch.no_grad():
                target = F.softmax(teacher(x), dim=1)
            loss = distillation_loss(student(x), target, target.argmax(1), alpha=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            acc += float(loss.detach())
        history.append(round(acc / steps, 5))
        if progress:
            log(f"export: {desc} epoch {epoch + 1}/{epochs}: KL to the student {history[-1]:.4f}")
    return history


def _probe_kl(model, teacher, images: np.ndarray) -> float:
    import torch
    import torch.nn.functional as F

    if len(images) == 0:
        return float("nan")
    x = torch.from_numpy(images)
    with torch.no_grad():
        p = F.softmax(teacher.eval()(x), dim=1)
        logq = F.log_softmax(model.eval()(x), dim=1)
        return float((p * (torch.log(p.clamp_min(1e-12)) - logq)).sum(1).mean())


def _save_onnx(model, input_size: list[int], opset: int, out: Path, config: dict, fmt: str) -> None:
    import onnx
    import torch

    from .formats import _set_metadata, build_metadata

    with tempfile.TemporaryDirectory(prefix="distillery-modelopt-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with _quiet():
            torch.onnx.export(model.eval(), (torch.randn(2, *input_size),), str(raw), dynamo=False,
                              opset_version=max(opset, 13), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(str(raw))
    _set_metadata(proto, build_metadata(config, fmt))
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))


def quantize_int8(model, calib: np.ndarray):
    """A fake-quantised copy of ``model``: ``mtq.quantize(copy, INT8_DEFAULT_CFG, forward_loop)`` with max
    calibration over ``calib`` (preprocessed float32 NCHW), in eval mode."""
    require_modelopt("int8_qdq")
    import torch
    import modelopt.torch.quantization as mtq

    q = copy.deepcopy(model).eval()
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, len(calib), 32):
                m(torch.from_numpy(calib[i:i + 32]))

    with _quiet():
        return mtq.quantize(q, cfg, forward_loop).eval()


def build_int8_qdq(model, config: dict, calib: np.ndarray, qat_images: np.ndarray, out: Path, *, opset: int,
                   epochs: int, lr: float, seed: int, progress: bool = True) -> dict[str, Any]:
    """Write ``out``: the student fake-quantised by modelopt (int8, symmetric; weights per channel, inputs per
    tensor; max calibration on ``calib``), fine-tuned ``epochs`` on ``qat_images`` when > 0, as a QDQ ONNX."""
    require_modelopt("int8_qdq")
    t0 = time.perf_counter()
    teacher = model.eval()
    q = quantize_int8(model, calib)
    probe = (qat_images if len(qat_images) else calib)[:256]
    kl_ptq = _probe_kl(q, teacher, probe)
    info: dict[str, Any] = {"tool": "modelopt.torch.quantization", "config": "INT8_DEFAULT_CFG",
                            "calibration": "max", "calibration_images": int(len(calib)),
                            "weights": "int8 symmetric per output channel", "activations": "int8 symmetric per tensor",
                            "kl_to_student": {"post_training": round(kl_ptq, 5)}}
    if epochs > 0 and len(qat_images):
        if progress:
            log(f"export: int8_qdq: quantisation-aware fine-tuning (modelopt), {epochs} epochs on {len(qat_images)} "
                "unlabeled domain images (self-distillation from the student)")
        with _quiet():
            info["qat_kl_by_epoch"] = _self_distill(q, teacher, qat_images, epochs=epochs, lr=lr, seed=seed,
                                                    desc="int8_qdq QAT", progress=progress)
        info["kl_to_student"]["after_qat"] = round(_probe_kl(q, teacher, probe), 5)
    info.update(qat_epochs=int(epochs) if len(qat_images) else 0, qat_lr=lr)
    _save_onnx(q, config["data_config"]["input_size"], opset, out, config, "int8_qdq")
    info.update(qdq_summary(out), seconds=round(time.perf_counter() - t0, 1))
    if progress:
        log(f"export: int8_qdq {out} ({info['quantized_weights']} weights, {info['quantized_activations']} activations "
            f"quantised; KL to the student {info['kl_to_student']})")
    return info


def sparsifiable_layers(model) -> dict[str, bool]:
    """Every Conv2d/Linear of ``model`` by name: True when modelopt's magnitude 2:4 sparsifies it (its rule:
    ``out_channels % 8 == 0`` and the weight's input dimension ``% 16 == 0``), False for the layers it leaves
    dense: the first conv (3 inputs), depthwise convs (1 input per group), small layers."""
    from torch import nn

    return {name: m.weight.shape[0] % 8 == 0 and m.weight.shape[1] % 16 == 0
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def build_sparse24(model, config: dict, images: np.ndarray, out: Path, *, opset: int, epochs: int, lr: float,
                   seed: int, progress: bool = True) -> dict[str, Any]:
    """Write ``out``: the student 2:4-sparsified (magnitude) by modelopt, fine-tuned ``epochs`` on ``images``
    with the mask fixed, exported FP32. Returns what was done (layers, KL right after pruning and after tuning)."""
    require_modelopt("sparse24")
    import torch
    import modelopt.torch.sparsity as mts

    from .formats import _export_fp32

    t0 = time.perf_counter()
    teacher = model.eval()
    s = copy.deepcopy(model).eval()
    layers = sparsifiable_layers(s)
    with _quiet():
        s = mts.sparsify(s, "sparse_magnitude", config={"forward_loop": lambda m: None})
    probe = images[:256]
    kl_pruned = _probe_kl(s, teacher, probe)
    history = []
    if epochs > 0 and len(images):
        if progress:
            log(f"export: sparse24: fine-tuning under the 2:4 mask, {epochs} epochs on {len(images)} unlabeled domain "
                "images (self-distillation from the dense student)")
        history = _self_distill(s, teacher, images, epochs=epochs, lr=lr, seed=seed, desc="sparse24 fine-tuning",
                                progress=progress)
    kl_tuned = _probe_kl(s, teacher, probe)
    s = mts.export(s)
    with torch.no_grad():  # the mask is no longer enforced after export; the weights must still carry it
        dense_params = {n: p for n, p in s.named_parameters()}
    sparse_names = [n for n, yes in layers.items() if yes]
    for n in sparse_names:
        w = dense_params[f"{n}.weight"].detach()
        if not _is_24(w.numpy()):
            raise RuntimeError(f"sparse24: layer {n} lost its 2:4 pattern during fine-tuning")
    _export_fp32(s, config, opset, out, progress=False)
    import onnx

    from .formats import _set_metadata, build_metadata

    proto = onnx.load(str(out))  # _export_fp32 wrote fp32 metadata; this file is sparse24
    _set_metadata(proto, build_metadata(config, "sparse24"))
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    rep = sparsity_24_report(out)
    info = {"tool": "modelopt.torch.sparsity", "mode": "sparse_magnitude", "pattern": "2:4 along input channels",
            "sparsified_layers": sparse_names, "dense_layers": [n for n, yes in layers.items() if not yes],
            "fine_tune_epochs": int(epochs), "fine_tune_lr": lr, "fine_tune_kl_by_epoch": history,
            "kl_to_student": {"after_pruning": round(kl_pruned, 5), "after_fine_tuning": round(kl_tuned, 5)},
            "onnx_24_weights": rep["sparse_24"], "onnx_weights_checked": rep["checked"],
            "seconds": round(time.perf_counter() - t0, 1),
            "speedup": "unmeasured here (needs TensorRT sparse kernels on a GPU; bench/device_check.py on a GPU)"}
    if progress:
        log(f"export: sparse24 {out}: {len(sparse_names)} of {len(layers)} conv/linear layers 2:4 sparse "
            f"({rep['sparse_24']} ONNX weights keep the pattern); KL to the dense student {info['kl_to_student']}")
    return info


def build_modelopt_format(fmt: str, model, config: dict, contract: dict, calib_paths: list[str], qat_paths: list[str],
                          out: Path, cfg, *, seed: int, progress: bool = True) -> dict[str, Any]:
    """The export stage's hook (``export/onnx.py``): build ``fmt`` ("int8_qdq" or "sparse24") from the job's
    images: calibration on ``calib_paths``, fine-tuning on ``qat_paths`` (unlabeled domain images, never the
    parity ones)."""
    from distillery.runtime.preprocess import preprocess_batch

    require_modelopt(fmt)
    tune = preprocess_batch(qat_paths, contract) if qat_paths else np.zeros((0, 3, 1, 1), np.float32)
    if fmt == "int8_qdq":
        calib = preprocess_batch(calib_paths, contract)
        return build_int8_qdq(model, config, calib, tune, out, opset=cfg.opset, epochs=cfg.qdq_qat_epochs,
                              lr=cfg.qdq_qat_lr, seed=seed, progress=progress)
    if fmt == "sparse24":
        return build_sparse24(model, config, tune, out, opset=cfg.opset, epochs=cfg.sparse24_epochs,
                              lr=cfg.sparse24_lr, seed=seed, progress=progress)
    raise ValueError(f"export.formats: {fmt!r} is not a Model Optimizer format ({', '.join(MODELOPT_FORMATS)})")


# ----------------------------------------------------------------------------------------------
# Reading the ONNX files back (tests, the report)


def _is_24(w: np.ndarray) -> bool:
    """True when every group of 4 consecutive input channels (dim 1) of a conv/linear weight has <= 2 non-zeros
    (at each output channel and kernel position); the input dimension must be a multiple of 4."""
    if w.ndim < 2 or w.shape[1] % 4:
        return False
    g = np.moveaxis(w, 1, -1).reshape(-1, w.shape[1] // 4, 4)
    return bool(((g != 0).sum(-1) <= 2).all())


def _initializers(proto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:  # the TorchScript exporter writes some constants as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def sparsity_24_report(path: Path) -> dict[str, Any]:
    """Of the Conv/Gemm/MatMul weights in the ONNX file: which keep the 2:4 pattern (``{name: bool}`` and the count)."""
    import onnx

    proto = onnx.load(str(path))
    vals = _initializers(proto)
    weights = {}
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in vals:
            weights[n.input[1]] = _is_24(vals[n.input[1]])
    return {"weights": weights, "checked": len(weights), "sparse_24": sum(weights.values())}


def qdq_summary(path: Path) -> dict[str, Any]:
    """The Q/DQ pairs of a QDQ ONNX file: which feed a Conv/Gemm weight (per channel?) or an activation (per
    tensor?), the int8 type and zero points. Returned as counts plus ``pairs``: one dict per QuantizeLinear."""
    import onnx

    proto = onnx.load(str(path))
    vals = _initializers(proto)
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    weight_inputs = {n.input[1] for n in proto.graph.node
                     if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    pairs = []
    for n in proto.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        dq = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        scale = vals.get(n.input[1])
        zp = vals.get(n.input[2]) if len(n.input) > 2 else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        is_weight = n.input[0] in vals or any(d.output[0] in weight_inputs for d in dq)
        pairs.append({"input": n.input[0], "weight": bool(is_weight), "has_dq": bool(dq),
                      "per_channel": scale is not None and scale.size > 1, "axis": axis,
                      "zero_point_dtype": None if zp is None else str(zp.dtype),
                      "zero_point_max_abs": None if zp is None else int(np.abs(zp.astype(np.int64)).max())})
    return {"quantized_weights": sum(p["weight"] for p in pairs),
            "quantized_activations": sum(not p["weight"] for p in pairs), "pairs": pairs}
