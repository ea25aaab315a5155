"""Building the exported files: fp32 (``torch.onnx.export`` + onnxslim), fp16 (onnxruntime's converter) and
int8 (static QDQ, calibrated; post-training and, with ``export.int8_qat_epochs``, after quantisation-aware
fine-tuning, the better of the two kept), each with the ``distillery`` metadata entry.

The exporter is ``torch.onnx.export(..., dynamo=False)`` (TorchScript tracing): it honours the
requested opset and takes well under a second on a small CNN. The dynamo exporter works offline
too but always emits opset >= 18 (its down-conversion to 17 fails on timm models) and takes
15-20 s on a tiny model, so it is only the fallback when tracing fails.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from distillery.rundir import atomic_path, log
from distillery.runtime.classifier import METADATA_KEY
from distillery.runtime.preprocess import contract_from_data_config, preprocess_batch

from .parity import _torch_logits, parity

__all__ = ["STAGE", "FORMAT_FILES", "INT8_EXCLUDE_KEYWORDS", "build_metadata"]

STAGE = "export"  # the stage's name: its stamp and the prefix of its log lines
FORMAT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
                "int8_qdq": "model.int8_qdq.onnx", "sparse24": "model.sparse24.onnx"}  # these two: modelopt_formats

INT8_EXCLUDE_KEYWORDS = ("first_conv", "classifier")  # export.int8_exclude's layer names besides ONNX node names


def build_metadata(config: dict, fmt: str) -> dict[str, Any]:
    """The ``distillery`` metadata object written into every exported file."""
    import onnx
    import timm
    import torch

    import onnxruntime

    versions = {"torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__}
    try:
        import onnxslim

        versions["onnxslim"] = onnxslim.__version__
    except ImportError:
        pass
    return {
        "class_names": list(config["class_names"]),
        "preprocess": contract_from_data_config(config["data_config"]),
        "provenance": config.get("job_hash", ""),
        "architecture": config["architecture"],
        "versions": versions,
        "format": fmt,
        **config.get("distillery_metadata", {}),  # an embedding student's head and side file (export/embedding.py)
    }


def _set_metadata(model, meta: dict) -> None:
    import onnx

    props = {p.key: p.value for p in model.metadata_props if p.key != METADATA_KEY}
    props[METADATA_KEY] = json.dumps(meta, sort_keys=True)
    onnx.helper.set_model_props(model, props)


def _torch_to_onnx(model, input_size: list[int], opset: int, out: Path, output_name: str = "logits") -> str:
    """Write the raw export to ``out``; returns the exporter used ("torchscript" or "dynamo")."""
    import torch

    dummy = torch.randn(2, *input_size)  # batch 2 so nothing specialises on a batch of 1
    names = dict(input_names=["input"], output_names=[output_name], opset_version=opset)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
            torch.onnx.export(model, (dummy,), str(out), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, output_name: {0: "batch"}}, **names)
        return "torchscript"
    except Exception as e:
        log(f"{STAGE}: TorchScript export failed ({type(e).__name__}: {e}); trying the dynamo exporter")
    if opset < 18:  # its down-conversion below 18 fails on timm models (Reduce* axes), so ask for 18
        log(f"{STAGE}: the dynamo exporter emits opset 18, not export.opset={opset}")
        names["opset_version"] = 18
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (dummy,), str(out), dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes=({0: batch},), **names)
    return "dynamo"


def _export_fp32(model, config: dict, opset: int, out: Path, progress: bool) -> dict:
    import onnx

    with tempfile.TemporaryDirectory(prefix="distillery-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        exporter = _torch_to_onnx(model, config["data_config"]["input_size"], opset, raw,
                                  config.get("output_name", "logits"))
        proto = onnx.load(str(raw))
    onnx.checker.check_model(proto, full_check=True)
    slimmed = False
    try:
        import onnxslim
    except ImportError:
        log(f"{STAGE}: onnxslim is not installed; keeping the graph as exported")
    else:
        try:
            candidate = onnxslim.slim(proto)
            onnx.checker.check_model(candidate, full_check=True)
            proto, slimmed = candidate, True
        except Exception as e:
            log(f"{STAGE}: onnxslim failed ({type(e).__name__}: {e}); keeping the graph as exported")
    _set_metadata(proto, build_metadata(config, "fp32"))
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    opset_out = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if progress:
        log(f"{STAGE}: fp32 {out} ({exporter} exporter, opset {opset_out}, "
            f"{'simplified by onnxslim' if slimmed else 'not simplified'}, {out.stat().st_size / 1e6:.1f} MB)")
    return {"exporter": exporter, "opset": opset_out, "onnxslim": slimmed}


def _export_fp16(src: Path, config: dict, out: Path) -> None:
    """Weights and activations in float16, float32 input/output (onnxruntime's own float16 converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _toposort(proto.graph)  # the converter appends its input/output Casts at the end of the node list
    _set_metadata(proto, build_metadata(config, "fp16"))
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))


def _toposort(graph) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs (stable)."""
    produced_by = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    deps = [{produced_by[x] for x in n.input if x in produced_by} - {i} for i, n in enumerate(graph.node)]
    order, placed = [], set()
    while len(order) < len(graph.node):
        ready = [i for i in range(len(graph.node)) if i not in placed and deps[i] <= placed]
        if not ready:
            raise ValueError("the fp16 graph has a cycle; cannot order its nodes")
        for i in ready:
            order.append(i)
            placed.add(i)
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _int8_excluded_nodes(model, exclude: list[str]) -> list[str]:
    """ONNX node names for ``export.int8_exclude``: "first_conv" (the first Conv), "classifier" (the last
    Gemm/MatMul) or node names; ValueError naming what does not exist."""
    first_conv, classifier = INT8_EXCLUDE_KEYWORDS
    nodes = list(model.graph.node)
    names = {n.name for n in nodes}
    out = []
    for item in exclude:
        if item == first_conv:
            found = [n.name for n in nodes if n.op_type == "Conv"][:1]
        elif item == classifier:
            found = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
        else:
            found = [item] if item in names else []
        if not found:
            raise ValueError(f"export.int8_exclude: {item!r} matches no node of the model; use "
                             f"{' or '.join(INT8_EXCLUDE_KEYWORDS)}, or ONNX node names such as "
                             f"{[n.name for n in nodes if n.op_type == 'Conv'][:2]}.")
        out += [f for f in found if f not in out]
    return out


def _export_int8(src: Path, config: dict, calib: np.ndarray, out: Path, exclude: list[str] = (),
                 reduce_range: bool = False) -> dict:
    """Static INT8 (QDQ, per-channel int8 weights, uint8 activations) calibrated with MinMax on real,
    class-balanced images. ``exclude``: layers kept in float (see :func:`_int8_excluded_nodes`);
    ``reduce_range``: 7-bit weights, which keeps x86 CPUs without VNNI (AVX2, AVX-512) from saturating the
    int16 sums of their uint8 x int8 kernels. Returns what was done (for the report)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="distillery-int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:
            log(f"{STAGE}: int8 pre-processing failed ({type(e).__name__}: {e}); quantising the fp32 graph as is")
            pre = src
        excluded = _int8_excluded_nodes(onnx.load(str(pre)), list(exclude))
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded, reduce_range=reduce_range)
        proto = onnx.load(str(q))
    _set_metadata(proto, build_metadata(config, "int8"))
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return {"calibration": "minmax", "per_channel": True, "reduce_range": bool(reduce_range),
            "excluded_nodes": excluded}


def _build_int8(model, config: dict, contract: dict, calib_paths: list[str], qat_paths: list[str],
                choice_paths: list[str], files: dict[str, Path], cfg, *, seed: int, progress: bool) -> dict:
    """``files["int8"]``: post-training INT8 of the student and, with ``export.int8_qat_epochs``, INT8 of a
    quantisation-aware fine-tuned copy (:mod:`distillery.export.qat`); of the two, the one whose top-1 agrees
    more often with the student on ``choice_paths`` is kept: domain images that are neither parity nor QAT
    images (the calibration images when none are left). The parity images, which gate the result, are never
    used to choose. Returns what was done, with both agreements."""
    calib = preprocess_batch(calib_paths, contract)
    q = _export_int8(files["fp32"], config, calib, files["int8"], cfg.int8_exclude, cfg.int8_reduce_range)
    if cfg.int8_qat_epochs <= 0 or cfg.int8_qat_images <= 0 or not qat_paths:
        q["qat"] = {"used": False, "why": "export.int8_qat_epochs is 0" if cfg.int8_qat_epochs <= 0
                    else "export.int8_qat_images is 0" if cfg.int8_qat_images <= 0
                    else "no unlabeled domain images left after the parity images"}
        return q
    try:
        q["qat"] = _qat_int8(model, config, contract, calib, qat_paths, choice_paths, files, cfg, seed=seed,
                             progress=progress)
    except Exception as e:  # the post-training model is already written: keep it, say why QAT is missing
        q["qat"] = {"used": False, "why": f"quantisation-aware fine-tuning failed: {type(e).__name__}: {e}"}
        log(f"{STAGE}: int8: {q['qat']['why']}; keeping the post-training INT8 model")
    return q


def _qat_int8(model, config: dict, contract: dict, calib: np.ndarray, qat_paths: list[str],
              choice_paths: list[str], files: dict[str, Path], cfg, *, seed: int, progress: bool) -> dict:
    """QAT half of :func:`_build_int8`: fine-tune, quantise, compete; replaces ``files["int8"]`` when QAT wins."""
    from .qat import qat_finetune

    if progress:
        log(f"{STAGE}: int8: quantisation-aware fine-tuning, {cfg.int8_qat_epochs} epochs on {len(qat_paths)} "
            "unlabeled domain images (self-distillation from the student; export.int8_qat_epochs: 0 skips it)")
    t0 = time.perf_counter()
    images = preprocess_batch(qat_paths, contract)
    tuned, info = qat_finetune(model, images, calib, epochs=cfg.int8_qat_epochs, lr=cfg.int8_qat_lr,
                               weight_bits=7 if cfg.int8_reduce_range else 8, exclude=list(cfg.int8_exclude),
                               seed=seed, progress=progress)
    choice = preprocess_batch(choice_paths, contract) if choice_paths else calib
    choice_set = "held-out pseudo-labelled images" if choice_paths else "calibration images"
    reference = _torch_logits(model, choice)
    ptq = parity(files["int8"], reference, choice)
    with tempfile.TemporaryDirectory(prefix="distillery-qat-") as tmp:
        src, out = Path(tmp) / "qat.onnx", Path(tmp) / "qat.int8.onnx"
        _export_fp32(tuned, config, cfg.opset, src, progress=False)
        _export_int8(src, config, calib, out, cfg.int8_exclude, cfg.int8_reduce_range)
        qat = parity(out, reference, choice)
        used = (qat["agreement"], -qat["mean_abs_diff"]) > (ptq["agreement"], -ptq["mean_abs_diff"])
        if used:
            with atomic_path(files["int8"]) as dst:
                shutil.copyfile(out, dst)
    info.update(seconds=round(time.perf_counter() - t0, 1), used=used, choice_images=len(choice),
                choice_set=choice_set, choice_agreement={"post_training": ptq["agreement"], "qat": qat["agreement"]},
                choice_mean_abs_diff={"post_training": ptq["mean_abs_diff"], "qat": qat["mean_abs_diff"]})
    log(f"{STAGE}: int8: top-1 agreement with the student on {len(choice)} {choice_set}: post-training "
        f"{ptq['agreement']:.4f}, after QAT {qat['agreement']:.4f} -> {'QAT' if used else 'post-training'} model kept")
    return info
