"""Export the student to ONNX, measure parity against PyTorch on real domain images, gate it (SPEC §8).

```
runs/<job>/student/model.safetensors + config.json
    -> runs/<job>/export/model.onnx        fp32, dynamic batch, input "input" (B,3,H,W) -> "logits" (B,K)
       runs/<job>/export/model.fp16.onnx   when "fp16" in export.formats (float32 inputs/outputs kept)
       runs/<job>/export/model.int8.onnx   when "int8" in export.formats (static QDQ, calibrated; export.int8_exclude
                                           layers -- by default the first conv and the classifier -- kept in float)
       runs/<job>/export/report.json       parity per format, the deploy choice, TensorRT status
```

Every file carries a ``distillery`` metadata entry: a JSON string with the class names, the
preprocessing contract (see ``distillery.runtime.preprocess``), the provenance hash and versions.

Parity images are real domain images, class-balanced by pseudo-label, preprocessed by the
*runtime's* preprocessing and scored by the runtime's ``Classifier``, so the export check also
tests the code apps will run. INT8 calibration images are drawn the same way, disjoint from the
parity images when there are enough.

INT8 is built twice when ``export.int8_qat_epochs`` > 0 (the default): post-training quantisation of the
student, and the same quantisation of a copy fine-tuned under simulated INT8 on up to
``export.int8_qat_images`` unlabeled domain images (self-distillation, :mod:`distillery.export.qat`; the
parity images are never among them). The one whose top-1 agrees more often with the student on up to 512
other held-out domain images (the calibration images when none are left) is written; both figures are in
``report["int8_quantization"]["qat"]``.

After the parity gate, every format that passed it is timed with onnxruntime on this machine's CPU
(batch 1, the parity images, rounds interleaved across formats) and the fastest is recorded as
``report["deploy"]`` -- format, file, why, timings and gate figures -- and said in one line. A format
that failed its gate is never chosen; a less precise format must be ``export.deploy_tolerance`` faster
than a more precise passing one to win (on a near-tie the more precise one is deployed). The runtime
loads that file when given the export folder (``Classifier.load("runs/<job>/export")``).

The exporter is ``torch.onnx.export(..., dynamo=False)`` (TorchScript tracing): it honours the
requested opset and takes well under a second on a small CNN. The dynamo exporter works offline
too but always emits opset >= 18 (its down-conversion to 17 fails on timm models) and takes
15-20 s on a tiny model, so it is only the fallback when tracing fails.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from distillery.rundir import (RunPaths, atomic_path, is_done, list_images, log, mark_done, read_json, read_table,
                               save_resolved_job, sha256_file, stage_key, stamp_path, write_json)
from distillery.runtime.classifier import METADATA_KEY, Classifier
from distillery.runtime.preprocess import contract_from_data_config, preprocess_batch

__all__ = ["export_onnx", "ExportGateError", "balanced_sample", "build_metadata", "parity",
           "FORMAT_FILES", "choose_deploy", "time_formats"]

STAGE = "export"
EXPORT_VERSION = "2"  # bump when the export itself changes, so stale exports are redone (2: deploy choice)
FORMAT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
PRECISION_ORDER = ("fp32", "fp16", "int8")  # most precise first: the deploy choice's tie-break
DEFAULT_MIN_AGREEMENT = {"fp32": 0.995, "fp16": 0.995, "int8": 0.98}
HINTS = {
    "fp32": "fp32 should match PyTorch almost exactly, so a large max |Δlogit| points at an operator the exporter "
            "translated differently: try another export.opset (e.g. 18); if max |Δlogit| is tiny the images sit on "
            "class ties and you can lower export.min_agreement.fp32",
    "fp16": "half precision loses too much for this model: keep fp32, drop fp16 from export.required, "
            "or lower export.min_agreement.fp16",
    "int8": "quantisation loses too much: keep more layers in float (export.int8_exclude: first_conv, classifier "
            "or node names), give more/more varied unlabeled images (calibration uses export.calibration_images "
            "class-balanced pseudo-labeled ones), drop int8 from export.required, or lower export.min_agreement.int8",
}


class ExportGateError(RuntimeError):
    """A required export format failed its parity gate; the message names the format, the figure and the fix."""


# ----------------------------------------------------------------------------------------------
# Student


def _load_student(folder: str | Path):
    """The trained student as ``(eval-mode model, config)``, through the student room's own loader."""
    from distillery.student import load_student

    return load_student(folder)


# ----------------------------------------------------------------------------------------------
# Image selection


def balanced_sample(rows: list[dict], n: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[str]:
    """Up to ``n`` paths drawn round-robin over ``label`` (classes in index order, each shuffled with ``seed``).

    Classes with fewer images run out and the others fill the remaining slots, so the sample is as
    balanced as the data allows. Rows whose path is in ``exclude`` are skipped.
    """
    by_label: dict[int, list[str]] = {}
    for r in rows:
        if r["path"] not in exclude:
            by_label.setdefault(int(r["label"]), []).append(r["path"])
    rng = random.Random(seed)
    queues = []
    for label in sorted(by_label):
        paths = sorted(set(by_label[label]))
        rng.shuffle(paths)
        queues.append(paths)
    return interleave(queues, n)


def interleave(queues: list[list], n: int) -> list:
    """Take one item from each queue in turn (round robin) until ``n`` items or all queues are used up."""
    out: list = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < n:
                out.append(q[depth])
        depth += 1
    return out


def _domain_images(job, paths: RunPaths) -> tuple[list[dict], str]:
    """Rows {path, label} of real domain images: pseudo-labeled when the teacher ran, else the folder unlabeled."""
    if paths.pseudo_labels.is_file():
        rows = [{"path": r["path"], "label": r["label"]} for r in read_table(paths.pseudo_labels, "pseudo labels")]
        rows = [r for r in rows if Path(r["path"]).is_file()]
        if rows:
            return rows, "pseudo_labels"
        log(f"{STAGE}: no image listed in {paths.pseudo_labels} exists any more; using {job.data.unlabeled}")
    images = list_images(job.data.unlabeled, job.data.extensions)
    return [{"path": str(p), "label": 0} for p in images], "unlabeled"


# ----------------------------------------------------------------------------------------------
# ONNX building blocks


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
    }


def _set_metadata(model, meta: dict) -> None:
    import onnx

    props = {p.key: p.value for p in model.metadata_props if p.key != METADATA_KEY}
    props[METADATA_KEY] = json.dumps(meta, sort_keys=True)
    onnx.helper.set_model_props(model, props)


def _torch_to_onnx(model, input_size: list[int], opset: int, out: Path) -> str:
    """Write the raw export to ``out``; returns the exporter used ("torchscript" or "dynamo")."""
    import torch

    dummy = torch.randn(2, *input_size)  # batch 2 so nothing specialises on a batch of 1
    names = dict(input_names=["input"], output_names=["logits"], opset_version=opset)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
            torch.onnx.export(model, (dummy,), str(out), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
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
        exporter = _torch_to_onnx(model, config["data_config"]["input_size"], opset, raw)
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


INT8_EXCLUDE_KEYWORDS = ("first_conv", "classifier")


def _int8_excluded_nodes(model, exclude: list[str]) -> list[str]:
    """ONNX node names for ``export.int8_exclude``: "first_conv" (the first Conv), "classifier" (the last
    Gemm/MatMul) or node names; ValueError naming what does not exist."""
    nodes = list(model.graph.node)
    names = {n.name for n in nodes}
    out = []
    for item in exclude:
        if item == "first_conv":
            found = [n.name for n in nodes if n.op_type == "Conv"][:1]
        elif item == "classifier":
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


INT8_CHOICE_IMAGES = 512  # held-out pseudo-labelled images on which post-training and QAT INT8 compete


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


# ----------------------------------------------------------------------------------------------
# Parity


def parity(model_path: Path, reference: np.ndarray, batch: np.ndarray) -> dict[str, Any]:
    """Runtime (onnxruntime, CPU) logits on ``batch`` vs PyTorch ``reference`` logits: agreement and |Δlogit|."""
    clf = Classifier.load(model_path, providers=["CPUExecutionProvider"])
    got = np.concatenate([clf.predict_logits(batch[i:i + 32]) for i in range(0, len(batch), 32)])
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    return {
        "agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "n_images": int(len(batch)),
    }


def _torch_logits(model, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(batch[i:i + 32])).float().numpy()
                               for i in range(0, len(batch), 32)])


# ----------------------------------------------------------------------------------------------
# Deploy choice


def time_formats(files: dict[str, Path], images: np.ndarray, seconds: float = 1.0) -> dict[str, float]:
    """Median milliseconds per image of each model file on onnxruntime's CPU provider at batch 1.

    Each format gets the same warm-up, then rounds over the same images (up to 16 of ``images``) interleaved
    across formats, so machine noise hits them alike; at least 3 rounds, then until about ``seconds`` per
    format is spent. Model time only: the preprocessing is the same for every format.
    """
    import statistics

    clfs = {f: Classifier.load(p, providers=["CPUExecutionProvider"]) for f, p in files.items()}
    xs = [images[i:i + 1] for i in range(min(len(images), 16))]
    for clf in clfs.values():  # warm-up: first runs allocate and tune
        for x in xs[:4]:
            clf.predict_logits(x)
    rounds: dict[str, list[float]] = {f: [] for f in clfs}
    start = time.perf_counter()
    while True:
        for f, clf in clfs.items():
            t0 = time.perf_counter()
            for x in xs:
                clf.predict_logits(x)
            rounds[f].append((time.perf_counter() - t0) / len(xs) * 1e3)
        done = len(rounds[next(iter(rounds))])
        if done >= 3 and (time.perf_counter() - start >= seconds * len(clfs) or done >= 200):
            break
    return {f: float(statistics.median(v)) for f, v in rounds.items()}


def _gate_figures(res: dict) -> dict:
    keep = ("built", "passed", "agreement", "min_agreement", "max_abs_diff", "mean_abs_diff", "n_images", "error")
    return {k: res[k] for k in keep if k in res}


def choose_deploy(gates: dict[str, dict], files: dict[str, Path], images: np.ndarray, *, seconds: float = 1.0,
                  tolerance: float = 0.05, timer=time_formats) -> dict[str, Any]:
    """Pick the format to deploy: the fastest of those that passed their parity gate, on this machine's CPU.

    ``gates``: the report's per-format results (``built``, ``passed``, ``agreement``, ``min_agreement`` ...).
    ``timer(files, images, seconds) -> {format: ms per image}`` (:func:`time_formats`; injectable for tests).
    A format that failed (or was not built) is never timed or chosen. A less precise format wins only when
    it is more than ``tolerance`` faster than every more precise passing one; ``seconds <= 0`` skips timing
    and deploys the most precise passing format. Returns the report's ``deploy`` entry.
    """
    passing = [f for f in PRECISION_ORDER if f in gates and gates[f].get("built", True) and gates[f].get("passed")]
    others = []
    for f in (f for f in PRECISION_ORDER if f in gates and f not in passing):
        g = gates[f]
        others.append(f"{f} not built ({g.get('error', 'failed')})" if not g.get("built", True) else
                      f"{f} failed its gate (agreement {g['agreement']:.4f} < {g['min_agreement']})")
    entry: dict[str, Any] = {"format": None, "file": None, "path": None, "why": "", "timings_ms": {},
                             "speed_vs_fp32": {}, "provider": "CPUExecutionProvider", "batch": 1,
                             "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs", "tolerance": tolerance,
                             "gates": {f: _gate_figures(g) for f, g in gates.items()}}
    if not passing:
        entry["why"] = "no format passed its parity gate" + (f" ({'; '.join(others)})" if others else "")
        return entry
    if seconds > 0:
        budget = seconds if len(passing) > 1 else 0.0  # one candidate: a few rounds, just to report its time
        timings = {f: float(t) for f, t in timer({f: files[f] for f in passing}, images, budget).items()}
        missing = [f for f in passing if not (f in timings and np.isfinite(timings[f]) and timings[f] > 0)]
        if missing:
            raise ValueError(f"deploy timing returned no usable time for {missing}: {timings}")
        fastest = min(timings[f] for f in passing)
        chosen = next(f for f in passing if timings[f] <= fastest * (1 + tolerance))  # most precise near the best
        entry["timings_ms"] = {f: round(timings[f], 4) for f in passing}
        if "fp32" in timings:
            entry["speed_vs_fp32"] = {f: round(timings["fp32"] / timings[f], 3) for f in passing}
        t = timings[chosen]
        if len(passing) == 1:
            why = f"the only format that passed its gate ({t:.2f} ms/image)"
        elif timings[chosen] == fastest:
            why = f"the fastest format that passed its gate ({t:.2f} ms/image)"
        else:
            why = (f"the most precise format within {tolerance:.0%} of the fastest passing one "
                   f"({t:.2f} ms/image)")
        for f in passing:
            if f == chosen:
                continue
            ratio = t / timings[f]  # f's speed relative to the chosen format
            if timings[f] < t:
                others.insert(0, f"{f} passed its gate and ran {ratio:.2f}x {chosen}'s speed, within the "
                                 f"{tolerance:.0%} tolerance")
            else:
                others.insert(0, f"{f} passed its gate but ran {ratio:.2f}x {chosen}'s speed")
        why += " on this CPU (onnxruntime, batch 1)"
    else:
        chosen = passing[0]
        why = "the most precise format that passed its gate (export.deploy_timing_s is 0: no timing)"
        others = [f"{f} passed its gate, not timed" for f in passing[1:]] + others
    entry.update(format=chosen, file=files[chosen].name, path=str(files[chosen]),
                 why=f"{chosen}: {why}" + (f"; {'; '.join(others)}" if others else ""))
    return entry


# ----------------------------------------------------------------------------------------------
# The stage


def export_onnx(job, *, progress: bool = True) -> dict:
    """Export the job's student to ONNX (fp32, and fp16/int8 when listed in ``export.formats``), check parity
    against PyTorch on real domain images and write ``runs/<job>/export/report.json``.

    Returns the report. Raises :class:`ExportGateError` when a format in ``export.required`` misses its
    ``export.min_agreement``; the report and files are still written for inspection, but the stage is not
    stamped done. An unchanged rerun returns the existing report without doing anything.
    """
    import torch

    cfg = job.export
    paths = RunPaths(job.run_path)
    out_dir = paths.export
    formats = list(dict.fromkeys(["fp32", *cfg.formats]))  # fp32 is the source of the others
    files = {f: out_dir / FORMAT_FILES[f] for f in formats}

    if not (cfg.deploy_timing_s >= 0 and cfg.deploy_tolerance >= 0):
        raise ValueError(f"export.deploy_timing_s / export.deploy_tolerance: must be >= 0, got {cfg.deploy_timing_s} / "
                         f"{cfg.deploy_tolerance} (e.g. 1.0 s of timing per format, 0.05 = 5%).")
    if cfg.parity_images < 1:
        raise ValueError(f"export.parity_images: must be >= 1, got {cfg.parity_images}; parity is what makes the "
                         "export trustworthy (64 is a good default).")
    rows, source = _domain_images(job, paths)
    if not rows:
        raise FileNotFoundError(f"{STAGE}: no real domain images for the parity check: {paths.pseudo_labels} is "
                                f"missing and data.unlabeled {job.data.unlabeled!r} holds no images "
                                f"({', '.join(job.data.extensions)}). Parity is measured on real images; add some.")
    parity_paths = balanced_sample(rows, cfg.parity_images, seed=job.seed)
    calib_paths: list[str] = []
    if "int8" in formats:
        calib_paths = balanced_sample(rows, cfg.calibration_images, seed=job.seed + 1, exclude=set(parity_paths))
        calib_paths = calib_paths or balanced_sample(rows, cfg.calibration_images, seed=job.seed + 1)
    qat_paths: list[str] = []
    choice_paths: list[str] = []  # held-out images on which the post-training and the QAT INT8 models compete
    if "int8" in formats and cfg.int8_qat_epochs > 0:
        qat_paths = balanced_sample(rows, cfg.int8_qat_images, seed=job.seed + 2, exclude=set(parity_paths))
        choice_paths = balanced_sample(rows, INT8_CHOICE_IMAGES, seed=job.seed + 3,
                                       exclude=set(parity_paths) | set(qat_paths))

    inputs = [paths.student_weights, paths.student_config]
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"{STAGE}: student file {str(p)!r} is missing; train the student first "
                                    "(`distillery train --job JOB.yaml`).")
    image_hashes = [sha256_file(p) for p in parity_paths + calib_paths]
    key = stage_key({"export": cfg, "classes": job.class_names, "version": EXPORT_VERSION}, inputs,
                    extra={"parity": parity_paths, "calibration": calib_paths, "images": image_hashes,
                           "qat": qat_paths, "int8_choice": choice_paths})
    if is_done(out_dir, STAGE, key, [files["fp32"], paths.export_report]) and all(
            files[f].is_file() for f in read_json(stamp_path(out_dir, STAGE)).get("formats", formats)):
        if progress:
            log(f"{STAGE}: up to date ({paths.export_report}); nothing to do")
        return read_json(paths.export_report)

    model, config = _load_student(paths.student)
    if list(config["class_names"]) != job.class_names:
        raise ValueError(f"{STAGE}: the student in {paths.student} was trained for classes {config['class_names']} "
                         f"but the job names {job.class_names}; retrain the student (`distillery train`).")
    contract = contract_from_data_config(config["data_config"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for fmt, name in FORMAT_FILES.items():  # an app must not pick up a file from an older, different export
        if fmt not in formats and (out_dir / name).exists():
            (out_dir / name).unlink()
            log(f"{STAGE}: removed {out_dir / name} ({fmt} is no longer in export.formats)")
    save_resolved_job(job, out_dir)
    if progress:
        log(f"{STAGE}: {config['architecture']} -> {out_dir} (formats {', '.join(formats)}, "
            f"{len(parity_paths)} parity images from {source})")
    if len(parity_paths) < cfg.parity_images:
        log(f"{STAGE}: only {len(parity_paths)} real images available for parity (export.parity_images="
            f"{cfg.parity_images})")

    torch.manual_seed(job.seed)
    info = _export_fp32(model, config, cfg.opset, files["fp32"], progress)
    batch = preprocess_batch(parity_paths, contract)  # the runtime's preprocessing, (N,3,H,W)
    reference = _torch_logits(model, batch)
    build_errors: dict[str, str] = {}
    for fmt in formats[1:]:
        try:
            if fmt == "fp16":
                _export_fp16(files["fp32"], config, files["fp16"])
            elif fmt == "int8":
                info["int8_quantization"] = _build_int8(model, config, contract, calib_paths, qat_paths, choice_paths,
                                                        files, cfg, seed=job.seed, progress=progress)
        except Exception as e:
            if fmt in cfg.required:
                raise RuntimeError(f"{STAGE}: building the required {fmt} model failed: {e}. Drop {fmt} from "
                                   "export.required (and export.formats) to export without it.") from e
            files[fmt].unlink(missing_ok=True)  # never leave an older file that looks current
            build_errors[fmt] = f"{type(e).__name__}: {e}"
            log(f"{STAGE}: building the optional {fmt} model failed ({build_errors[fmt]}); continuing without it")

    report: dict[str, Any] = {
        "job": job.name,
        "provenance": config.get("job_hash", ""),
        "architecture": config["architecture"],
        **info,
        "preprocess": contract,
        "parity_source": source,
        "parity_images": parity_paths,
        "calibration_images": len(calib_paths),
        "formats": {},
    }
    failed = []
    for fmt in formats:
        threshold = float(cfg.min_agreement.get(fmt, DEFAULT_MIN_AGREEMENT[fmt]))
        if fmt in build_errors:
            report["formats"][fmt] = {"built": False, "error": build_errors[fmt], "path": None,
                                      "min_agreement": threshold, "required": False, "passed": False}
            continue
        res = {"built": True, **parity(files[fmt], reference, batch)}
        res.update(path=str(files[fmt]), file_size=files[fmt].stat().st_size, min_agreement=threshold,
                   required=fmt in cfg.required, passed=res["agreement"] >= threshold)
        report["formats"][fmt] = res
        line = (f"top-1 agreement {res['agreement']:.4f} (gate {threshold}), max |Δlogit| "
                f"{res['max_abs_diff']:.2e}, mean {res['mean_abs_diff']:.2e} on {res['n_images']} images")
        if progress or not res["passed"]:
            log(f"{STAGE}: {fmt}: {line}{'' if res['passed'] else ' -- FAILED'}")
        if not res["passed"] and fmt in cfg.required:
            failed.append((fmt, line))
    if failed:  # the export fails anyway: no time spent on a choice nobody gets
        report["deploy"] = {"format": None, "file": None, "path": None,
                            "why": f"not chosen: required format(s) {', '.join(f for f, _ in failed)} failed the gate",
                            "gates": {f: _gate_figures(r) for f, r in report["formats"].items()}}
    else:
        report["deploy"] = choose_deploy(report["formats"], files, batch, seconds=cfg.deploy_timing_s,
                                         tolerance=cfg.deploy_tolerance)
    dep = report["deploy"]
    log(f"{STAGE}: deploy{' ' + dep['file'] if dep['file'] else ''}: {dep['why']}")
    report["tensorrt"] = _tensorrt_engines(files["fp32"], out_dir, config, formats, calib_paths, contract,
                                           reference, batch, progress, cfg)
    report["onnxruntime"] = _onnxruntime_status()
    write_json(paths.export_report, report)

    if failed:
        fmt, line = failed[0]
        raise ExportGateError(
            f"{STAGE}: required format {fmt!r} failed its parity gate: {line}. Try: {HINTS[fmt]}. "
            f"Details in {paths.export_report}."
            + (f" Also failed: {', '.join(f for f, _ in failed[1:])}." if len(failed) > 1 else ""))
    mark_done(out_dir, STAGE, key, {"formats": [f for f in formats if f not in build_errors]})
    return report


def _tensorrt_engines(fp32: Path, out_dir: Path, config: dict, formats: list[str], calib_paths: list[str],
                      contract: dict, reference: np.ndarray, batch: np.ndarray, progress: bool, cfg) -> dict:
    """Build the TensorRT engines ``export.tensorrt`` asks for (int8 only when int8 is exported) where TensorRT
    and a GPU exist, with parity.

    Never fails the export: a missing TensorRT or a failed build is recorded (and said in one line).
    """
    from .tensorrt import ENGINE_FILES, build_engine, tensorrt_unavailable_reason

    wanted = [f for f in cfg.tensorrt if f != "int8" or "int8" in formats]
    reason = "export.tensorrt is empty" if not wanted else tensorrt_unavailable_reason()
    if reason is not None:
        log(f"{STAGE}: TensorRT engine skipped: {reason}")
        return {"built": False, "reason": reason, "engines": {}}
    engines: dict[str, Any] = {}
    for fmt in wanted:
        out = out_dir / ENGINE_FILES[fmt]
        try:
            calib = preprocess_batch(calib_paths, contract) if fmt == "int8" else None
            sidecar = build_engine(fp32, out, build_metadata(config, fmt), fmt, calibration=calib,
                                   batch_profile=tuple(cfg.tensorrt_batch), workspace_mb=cfg.tensorrt_workspace_mb)
            from distillery.runtime.tensorrt import TensorRTClassifier

            clf = TensorRTClassifier.load(out)
            got = clf.predict_logits(batch)
            diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
            engines[fmt] = {"built": True, "path": str(out), "file_size": out.stat().st_size,
                            "tensorrt": sidecar["tensorrt"], "gpu": sidecar["gpu"],
                            "agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
                            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                            "n_images": int(len(batch))}
            if progress:
                log(f"{STAGE}: TensorRT {fmt} engine {out} (TensorRT {sidecar['tensorrt']}, {sidecar['gpu']}): "
                    f"top-1 agreement {engines[fmt]['agreement']:.4f}, "
                    f"max |Δlogit| {engines[fmt]['max_abs_diff']:.2e}")
        except Exception as e:  # TensorRT is optional: record, never fail the export
            engines[fmt] = {"built": False, "error": f"{type(e).__name__}: {e}"}
            log(f"{STAGE}: TensorRT {fmt} engine failed ({engines[fmt]['error']}); continuing without it")
    built = any(e["built"] for e in engines.values())
    return {"built": built, "reason": None if built else "every engine build failed", "engines": engines}


def _onnxruntime_status() -> dict:
    """Which onnxruntime execution providers this build has; parity always runs on CPU (one line when no GPU EP)."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if not gpu:
        log(f"{STAGE}: onnxruntime CUDA/TensorRT execution providers skipped: this onnxruntime "
            f"{onnxruntime.__version__} build has only {', '.join(available)} (install onnxruntime-gpu for them)")
    return {"version": onnxruntime.__version__, "available_providers": available, "gpu_providers": gpu,
            "parity_provider": "CPUExecutionProvider"}
