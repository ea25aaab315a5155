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

This module runs the stage; the pieces live beside it: ``images.py`` (which images: parity, calibration,
QAT, choice), ``formats.py`` (building fp32/fp16/int8 files and their metadata), ``parity.py`` (runtime vs
PyTorch logits, CPU timing), ``deploy.py`` (the deploy choice), ``qat.py`` and ``tensorrt.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distillery import killpoints
from distillery.job import DEFAULT_MIN_AGREEMENT
from distillery.rundir import (RunPaths, is_done, log, mark_done, portable_paths, read_json, save_resolved_job,
                               sha256_file, stage_key, stamp_path, write_json)
from distillery.runtime.preprocess import contract_from_data_config, preprocess_batch

from .deploy import _gate_figures, choose_deploy
from .formats import FORMAT_FILES, STAGE, _build_int8, _export_fp16, _export_fp32, build_metadata
from .images import select_images
from .parity import _torch_logits, parity

__all__ = ["export_onnx", "ExportGateError"]

EXPORT_VERSION = "2"  # bump when the export itself changes, so stale exports are redone (2: deploy choice)
HINTS = {
    "fp32": "fp32 should match PyTorch almost exactly, so a large max |Δlogit| points at an operator the exporter "
            "translated differently: try another export.opset (e.g. 18); if max |Δlogit| is tiny the images sit on "
            "class ties and you can lower export.min_agreement.fp32",
    "fp16": "half precision loses too much for this model: keep fp32, drop fp16 from export.required, "
            "or lower export.min_agreement.fp16",
    "int8": "quantisation loses too much: keep more layers in float (export.int8_exclude: first_conv, classifier "
            "or node names), give more/more varied unlabeled images (calibration uses export.calibration_images "
            "class-balanced pseudo-labeled ones), drop int8 from export.required, or lower export.min_agreement.int8",
    "int8_qdq": "TensorRT-style QDQ loses too much: more export.qdq_qat_epochs (or int8_qat_images), drop int8_qdq "
                "from export.required, or lower export.min_agreement.int8_qdq",
    "sparse24": "2:4 sparsity loses too much: more export.sparse24_epochs (or int8_qat_images), drop sparse24 from "
                "export.required, or lower export.min_agreement.sparse24",
}


class ExportGateError(RuntimeError):
    """A required export format failed its parity gate; the message names the format, the figure and the fix."""


def _load_student(folder: str | Path):
    """The trained student as ``(eval-mode model, config)``, through the student room's own loader."""
    from distillery.student import load_student

    return load_student(folder)


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
    images = select_images(job, paths, formats)
    parity_paths, calib_paths, qat_paths, choice_paths = images.parity, images.calibration, images.qat, images.choice

    inputs = [paths.student_weights, paths.student_config]
    from distillery.student.embedding import TEXT_FILE

    if (paths.student / TEXT_FILE).is_file() and paths.student_config.is_file() \
            and read_json(paths.student_config).get("head") == "embedding":
        inputs.append(paths.student / TEXT_FILE)  # an embedding student's class matrix is part of what is exported
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"{STAGE}: student file {str(p)!r} is missing; train the student first "
                                    "(`distillery student --job JOB.yaml`).")
    image_hashes = [sha256_file(p) for p in parity_paths + calib_paths]
    key = stage_key({"export": _key_settings(cfg), "classes": job.class_names, "version": EXPORT_VERSION}, inputs,
                    extra={"parity": portable_paths(parity_paths, paths.root),
                           "calibration": portable_paths(calib_paths, paths.root), "images": image_hashes,
                           "qat": portable_paths(qat_paths, paths.root),
                           "int8_choice": portable_paths(choice_paths, paths.root)})
    if is_done(out_dir, STAGE, key, [files["fp32"], paths.export_report]) and all(
            files[f].is_file() for f in read_json(stamp_path(out_dir, STAGE)).get("formats", formats)):
        if progress:
            log(f"{STAGE}: up to date ({paths.export_report}); nothing to do")
        return read_json(paths.export_report)

    model, config = _load_student(paths.student)
    if list(config["class_names"]) != job.class_names:
        raise ValueError(f"{STAGE}: the student in {paths.student} was trained for classes {config['class_names']} "
                         f"but the job names {job.class_names}; retrain the student (`distillery student`).")
    contract = contract_from_data_config(config["data_config"])
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_model = model  # what is traced to ONNX; `model` gives the logits parity compares
    if config.get("head") == "embedding":
        from .embedding import prepare_embedding_export

        model, graph_model, config, cfg = prepare_embedding_export(model, config, paths.student, out_dir, cfg)
    elif (out_dir / TEXT_FILE).exists():  # a logits model must not sit beside an older export's class matrix
        (out_dir / TEXT_FILE).unlink()
    for fmt, name in FORMAT_FILES.items():  # an app must not pick up a file from an older, different export
        if fmt not in formats and (out_dir / name).exists():
            (out_dir / name).unlink()
            log(f"{STAGE}: removed {out_dir / name} ({fmt} is no longer in export.formats)")
    save_resolved_job(job, out_dir)
    if progress:
        log(f"{STAGE}: {config['architecture']} -> {out_dir} (formats {', '.join(formats)}, "
            f"{len(parity_paths)} parity images from {images.source})")
    if len(parity_paths) < cfg.parity_images:
        log(f"{STAGE}: only {len(parity_paths)} real images available for parity (export.parity_images="
            f"{cfg.parity_images})")

    torch.manual_seed(job.seed)
    info = _export_fp32(graph_model, config, cfg.opset, files["fp32"], progress)
    killpoints.progress("export.fp32")  # testing hook: after each format's file
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
            elif fmt in ("int8_qdq", "sparse24"):  # NVIDIA Model Optimizer (distillery[modelopt])
                from .modelopt_formats import build_modelopt_format

                info[fmt] = build_modelopt_format(fmt, model, config, contract, calib_paths, qat_paths, files[fmt],
                                                  cfg, seed=job.seed, progress=progress)
        except Exception as e:
            if fmt in cfg.required:
                raise RuntimeError(f"{STAGE}: building the required {fmt} model failed: {e}. Drop {fmt} from "
                                   "export.required (and export.formats) to export without it.") from e
            files[fmt].unlink(missing_ok=True)  # never leave an older file that looks current
            build_errors[fmt] = f"{type(e).__name__}: {e}"
            log(f"{STAGE}: building the optional {fmt} model failed ({build_errors[fmt]}); continuing without it")
        killpoints.progress(f"export.{fmt}")

    report: dict[str, Any] = {
        "job": job.name,
        "provenance": config.get("job_hash", ""),
        "architecture": config["architecture"],
        **info,
        "preprocess": contract,
        "parity_source": images.source,
        "parity_images": parity_paths,
        "calibration_images": len(calib_paths),
        # too few images to keep them apart: INT8 is then measured on images it was calibrated on
        "calibration_overlaps_parity": len(set(calib_paths) & set(parity_paths)),
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
    if cfg.text_encoder:
        from .text_encoder import export_text_encoder

        report["text_encoder"] = export_text_encoder(job, out_dir, cfg.opset, progress)
    pre_file = out_dir / "model.pre.onnx"
    if cfg.preprocess_in_graph:
        from .preprocess_graph import build_preprocessing_model, compare_with_pillow

        try:
            build_preprocessing_model(files["fp32"], pre_file)
            report["preprocess_in_graph"] = compare_with_pillow(pre_file, files["fp32"], parity_paths)
            pig = report["preprocess_in_graph"]
            log(f"{STAGE}: {pre_file.name} (preprocessing in the graph): top-1 agreement {pig['top1_agreement']:.4f} "
                f"with the Pillow path, pixels within {pig['max_pixel_diff']:.2f} levels on {pig['n_images']} images")
        except Exception as e:  # optional: record, never fail the export
            pre_file.unlink(missing_ok=True)
            report["preprocess_in_graph"] = {"file": None, "error": f"{type(e).__name__}: {e}"}
            log(f"{STAGE}: preprocessing in the graph failed ({report['preprocess_in_graph']['error']})")
    elif pre_file.exists():
        pre_file.unlink()
    write_json(paths.export_report, report)
    killpoints.progress("export.report")  # report written, not stamped yet

    if failed:
        fmt, line = failed[0]
        raise ExportGateError(
            f"{STAGE}: required format {fmt!r} failed its parity gate: {line}. Try: {HINTS[fmt]}. "
            f"Details in {paths.export_report}."
            + (f" Also failed: {', '.join(f for f, _ in failed[1:])}." if len(failed) > 1 else ""))
    mark_done(out_dir, STAGE, key, {"formats": [f for f in formats if f not in build_errors]})
    return report


def _key_settings(cfg):
    """The export settings in the stage key: ``text_encoder`` only when on, so exports made before it existed
    keep their key."""
    import dataclasses

    d = dataclasses.asdict(cfg)
    if not d.get("text_encoder"):
        d.pop("text_encoder", None)
    return d


def _tensorrt_engines(fp32: Path, out_dir: Path, config: dict, formats: list[str], calib_paths: list[str],
                      contract: dict, reference: np.ndarray, batch: np.ndarray, progress: bool, cfg) -> dict:
    """Build the TensorRT engines ``export.tensorrt`` asks for (int8 only when int8 is exported) where TensorRT
    and a GPU exist, with parity.

    Never fails the export: a missing TensorRT or a failed build is recorded (and said in one line).
    """
    from .tensorrt import ENGINE_FILES, build_engine, tensorrt_unavailable_reason

    wanted = [f for f in cfg.tensorrt if f != "int8" or "int8" in formats]
    if wanted:  # the Model Optimizer formats are made for TensorRT: an engine whenever they are exported
        wanted += [f for f in ("int8_qdq", "sparse24") if f in formats and f not in wanted]
    reason = "export.tensorrt is empty" if not wanted else tensorrt_unavailable_reason()
    if reason is not None:
        log(f"{STAGE}: TensorRT engine skipped: {reason}")
        return {"built": False, "reason": reason, "engines": {}}
    engines: dict[str, Any] = {}
    for fmt in wanted:
        out = out_dir / ENGINE_FILES[fmt]
        try:
            calib = preprocess_batch(calib_paths, contract) if fmt == "int8" else None
            src = out_dir / FORMAT_FILES[fmt] if fmt in ("int8_qdq", "sparse24") else fp32
            sidecar = build_engine(src, out, build_metadata(config, fmt), fmt, calibration=calib,
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
