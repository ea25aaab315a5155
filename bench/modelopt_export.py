"""Model Optimizer formats on a trained run (issue 19): top-1 on every EuroSAT ``test/`` image of FP32, today's
onnxruntime-exact INT8 (the run's own ``model.int8.onnx``), the TensorRT-style ``int8_qdq`` and the 2:4
``sparse24`` file, all run by the runtime's ``Classifier`` on onnxruntime's CPU provider.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.modelopt_export RUN_FOLDER [key=value ...]

RUN_FOLDER: a run folder with ``student/`` and the teachers' pseudo-labels (a copy: its ``export/`` is
rewritten; ``export/model.int8.onnx`` is kept aside first as the "today's INT8" row). Overrides are job
overrides (e.g. ``export.qdq_qat_epochs=1``). Prints one JSON object and writes it to
RUN_FOLDER/modelopt_bench.json. Test labels are read here only (evaluation).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillery.export import export_onnx
    from distillery.job import job_from_dict
    from distillery.runtime import Classifier

    from ._eurosat import labeled_items, staged_root

    run = Path(argv[0]).resolve()
    raw = json.loads((run / "export" / "job.resolved.json").read_text())
    raw["run_dir"] = str(run)
    old_int8 = run / "modelopt_bench.old_int8.onnx"
    if (run / "export" / "model.int8.onnx").is_file() and not old_int8.is_file():
        shutil.copyfile(run / "export" / "model.int8.onnx", old_int8)
    job = job_from_dict(raw, base=run, overrides=["export.formats=[fp32,int8_qdq,sparse24]", "export.tensorrt=[]",
                                                  *argv[1:]])
    t0 = time.perf_counter()
    report = export_onnx(job, progress=True)
    export_s = round(time.perf_counter() - t0, 1)
    classes = [c["folder"] if isinstance(c, dict) and c.get("folder") else c["name"] for c in raw["classes"]]
    test = labeled_items(staged_root() / "test", classes)
    paths, truth = [str(p) for p, _ in test], np.array([y for _, y in test])
    files = {"fp32": report["formats"]["fp32"]["path"], "int8 (today)": str(old_int8) if old_int8.is_file() else None,
             "int8_qdq": report["formats"].get("int8_qdq", {}).get("path"),
             "sparse24": report["formats"].get("sparse24", {}).get("path")}
    rows = {}
    for name, f in files.items():
        if not f:
            rows[name] = {"top1": None, "error": report["formats"].get(name, {}).get("error", "not built")}
            continue
        t1 = time.perf_counter()
        clf = Classifier.load(f, providers=["CPUExecutionProvider"])
        pred = np.array([p.index for p in clf.predict(paths, batch_size=100)])
        rows[name] = {"top1": round(float(np.mean(pred == truth)), 4), "eval_s": round(time.perf_counter() - t1, 1),
                      "parity_agreement": report["formats"].get(name, {}).get("agreement")}
    fp32 = rows["fp32"]["top1"]
    for r in rows.values():
        if r.get("top1") is not None:
            r["minus_fp32_points"] = round(100 * (r["top1"] - fp32), 2)
    res = {"run": str(run), "test_images": len(test), "top1": rows, "export_s": export_s,
           "int8_qdq": {k: v for k, v in (report.get("int8_qdq") or {}).items() if k != "pairs"},
           "sparse24": report.get("sparse24"), "overrides": argv[1:]}
    (run / "modelopt_bench.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
