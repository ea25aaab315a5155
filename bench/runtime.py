"""Runtime benchmark (issue 6 targets): image -> label at batch 1, 224 px, MobileNetV3-small, on this CPU.

    python -m bench runtime

* end to end: ``Classifier.predict(path)`` vs PyTorch eager with timm's eval transform on the same real
  EuroSAT test images (target >= 5x), interleaved in rounds so machine noise hits both alike;
* the preprocessing share of the runtime's end-to-end time (target <= 40%);
* model only: onnxruntime vs PyTorch on the same preprocessed tensor; INT8 (QDQ) vs FP32 speed;
* cold start: ``import distillery.runtime`` + session creation (+ first prediction) in a fresh interpreter;
* fast decode: JPEG draft mode vs full decode on large JPEGs made from EuroSAT images (upscaled, and
  mosaics of native tiles), time and pixel/logit differences;
* the installed size of the runtime's dependencies (numpy, Pillow, onnxruntime and theirs);
* where ``predict(path)`` spends its time: decode, resize + crop, to array + normalise, ``session.run``
  and predict's own overhead, each timed on its own.

The network is a *random-init* ``mobilenetv3_small_100`` exported through ``distillery.export``'s own
fp32/int8 code path: speed figures are real, accuracy figures would not be, so none are claimed here.
INT8/FP16/FP32 accuracy of a trained student on EuroSAT test/ is ``python -m bench export``.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._eurosat import eurosat_images, eurosat_root

ARCH = "mobilenetv3_small_100"
N_IMAGES = 100  # per round
ROUNDS = 3
COLD_RUNS = 3


def _build_models(tmp: Path, class_names: list[str], calib_paths: list[str]):
    import timm
    import torch

    from distillery.export.formats import _export_fp32, _export_int8
    from distillery.job import ExportCfg
    from distillery.runtime.preprocess import contract_from_data_config, preprocess_batch

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(class_names)).eval()
    data_config = timm.data.resolve_data_config({}, model=model)
    config = {"class_names": class_names, "data_config": data_config, "architecture": ARCH, "job_hash": "bench"}
    fp32, int8 = tmp / "model.onnx", tmp / "model.int8.onnx"
    _export_fp32(model, config, 17, fp32, progress=False)
    contract = contract_from_data_config(data_config)
    cfg = ExportCfg()  # the export stage's default INT8 settings
    _export_int8(fp32, config, preprocess_batch(calib_paths, contract), int8, cfg.int8_exclude,
                 cfg.int8_reduce_range)
    return model, data_config, fp32, int8


def _per_image_ms(fn, items) -> float:
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return (time.perf_counter() - t0) / len(items) * 1e3


def _breakdown(clf, paths: list[str], rounds: int = 2) -> dict:
    """Where ``Classifier.predict(path)`` spends its time, per image: each step timed on its own, in the
    order predict runs them, then predict itself on the same image; the rest is predict's own overhead
    (input checks, softmax, top-k, result objects)."""
    from distillery.runtime.preprocess import _open_path

    pre, sess = clf._pre, clf.session
    t = {"decode": 0.0, "resize_crop": 0.0, "to_array_normalize": 0.0, "session_run": 0.0, "predict": 0.0}
    out = np.empty((1, 3, pre.height, pre.width), dtype=np.float32)
    for _ in range(rounds):
        for p in paths:
            t0 = time.perf_counter()
            img, _ = _open_path(p, pre._draft_size if pre.fast_decode else None)
            t1 = time.perf_counter()
            img = pre.image(img)  # (decoded at full size: EuroSAT tiles are never drafted)
            t2 = time.perf_counter()
            pre.normalize(np.asarray(img), out=out[0])
            t3 = time.perf_counter()
            sess.run([clf.output_name], {clf.input_name: out})
            t4 = time.perf_counter()
            clf.predict(p)
            t5 = time.perf_counter()
            for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                t[k] += dt
    n = rounds * len(paths)
    ms = {k: round(v / n * 1e3, 3) for k, v in t.items()}
    ms["predict_overhead"] = round(ms["predict"] - sum(v for k, v in ms.items() if k != "predict"), 3)
    return ms


def _cold_start(model: Path, image: str) -> dict:
    code = f"""
import json, time
t0 = time.perf_counter()
from distillery.runtime import Classifier
t1 = time.perf_counter()
clf = Classifier.load({str(model)!r}, providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
clf.predict({image!r})
t3 = time.perf_counter()
import sys
print(json.dumps({{"import_s": t1 - t0, "session_s": t2 - t1, "first_predict_s": t3 - t2,
                   "torch_loaded": "torch" in sys.modules}}))
"""
    runs = []
    for _ in range(COLD_RUNS):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rec["process_s"] = time.perf_counter() - t0
        runs.append(rec)
    med = {k: statistics.median(r[k] for r in runs) for k in ("import_s", "session_s", "first_predict_s", "process_s")}
    med["import_plus_session_s"] = statistics.median(r["import_s"] + r["session_s"] for r in runs)
    med["torch_loaded"] = any(r["torch_loaded"] for r in runs)
    return med


def _install_size_mb(roots=("numpy", "pillow", "onnxruntime")) -> dict:
    """Bytes on disk of the runtime's distributions and their (non-extra) dependencies, from their RECORDs."""
    seen, todo, sizes = set(), list(roots), {}
    while todo:
        name = re.split(r"[ ;<>=!~\[]", todo.pop())[0].lower().replace("_", "-")
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        total = 0
        for f in dist.files or []:
            p = Path(dist.locate_file(f))
            if p.is_file():
                total += p.stat().st_size
        sizes[name] = round(total / 1e6, 1)
        todo += [r for r in (dist.requires or []) if "extra ==" not in r]
    return {"total_mb": round(sum(sizes.values()), 1), "packages_mb": sizes}


def _large_jpegs(tmp: Path, sources: list[Path], size=(2048, 1536)) -> dict[str, list[str]]:
    from PIL import Image

    tiles = [Image.open(p).convert("RGB") for p in sources]
    out = {"upscaled": [], "mosaic": []}
    for i in range(8):
        p = tmp / f"up{i}.jpg"
        tiles[i].resize(size, Image.Resampling.BICUBIC).save(p, quality=90)
        out["upscaled"].append(str(p))
        canvas, k = Image.new("RGB", size), i
        for y in range(0, size[1], 64):
            for x in range(0, size[0], 64):
                canvas.paste(tiles[k % len(tiles)].resize((64, 64)), (x, y))
                k += 7
        p = tmp / f"mosaic{i}.jpg"
        canvas.save(p, quality=90)
        out["mosaic"].append(str(p))
    return out


def main() -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm
    import torch
    from PIL import Image

    from distillery.runtime import Classifier
    from distillery.runtime.preprocess import Preprocessor

    root = eurosat_root()
    pairs = eurosat_images(N_IMAGES + 64, seed=0)
    class_names = sorted({c for _, c in pairs})
    paths = [str(p) for p, _ in pairs[:N_IMAGES]]
    calib = [str(p) for p, _ in pairs[N_IMAGES:]]
    print(f"images: {len(paths)} from {root}; model: random-init {ARCH}, {len(class_names)} classes, batch 1, "
          f"torch threads {torch.get_num_threads()}")
    res: dict = {"images": len(paths), "image_root": str(root), "model": ARCH, "weights": "random init",
                 "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp_s:
        tmp = Path(tmp_s)
        model, data_config, fp32, int8 = _build_models(tmp, class_names, calib)
        transform = timm.data.create_transform(**data_config)
        # The runtime's own session options (distillery.runtime.classifier.default_session_options): worker
        # threads spin only while a run is in progress, so they take no CPU from the PyTorch rounds in between.
        clf = Classifier.load(fp32, providers=["CPUExecutionProvider"])
        clf8 = Classifier.load(int8, providers=["CPUExecutionProvider"])
        res["onnxruntime_threads"] = (clf.session.get_session_options().intra_op_num_threads
                                      or "default: one per physical core")

        def torch_e2e(p):
            with Image.open(p) as im:
                x = transform(im.convert("RGB")).unsqueeze(0)
            with torch.no_grad():
                return class_names[int(model(x).argmax(1))]

        def rt_e2e(p):
            return clf.predict(p)[0].label

        split = {"pre": 0.0, "model": 0.0}

        def rt_split(p):
            t0 = time.perf_counter()
            x = clf.preprocess_batch([p])
            t1 = time.perf_counter()
            clf.predict_logits(x)
            split["pre"] += t1 - t0
            split["model"] += time.perf_counter() - t1

        # PyTorch gets its faster thread count here (2 OpenMP threads collapse when the cores are shared)
        probe = [torch.from_numpy(clf.preprocess_batch([p])) for p in paths[:20]]
        torch_ms = {}
        for n in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(n)
            with torch.no_grad():
                model(probe[0])
                torch_ms[n] = statistics.median(_per_image_ms(model, probe) for _ in range(2))
        torch_threads = min(torch_ms, key=torch_ms.get)
        torch.set_num_threads(torch_threads)
        res["torch_threads"] = torch_threads
        res["torch_model_ms_by_threads"] = {str(k): round(v, 3) for k, v in torch_ms.items()}

        # warm up, and check the two paths agree on labels
        agree = np.mean([torch_e2e(p) == rt_e2e(p) for p in paths[:50]])
        rounds = {"runtime": [], "torch": []}
        for _ in range(ROUNDS):
            rounds["runtime"].append(_per_image_ms(rt_e2e, paths))
            rounds["torch"].append(_per_image_ms(torch_e2e, paths))
        split["pre"] = split["model"] = 0.0
        for _ in range(2):
            for p in paths:
                rt_split(p)
        e2e = {k: statistics.median(v) for k, v in rounds.items()}
        pre_share = split["pre"] / (split["pre"] + split["model"])
        res["runtime_breakdown_ms"] = _breakdown(clf, paths)

        # model only, same preprocessed tensor
        xs = [clf.preprocess_batch([p]) for p in paths[:50]]
        torch_xs = [torch.from_numpy(x) for x in xs]
        with torch.no_grad():
            m_torch = statistics.median(_per_image_ms(model, torch_xs) for _ in range(3))
        m_ort = statistics.median(_per_image_ms(clf.predict_logits, xs) for _ in range(3))
        m_int8 = statistics.median(_per_image_ms(clf8.predict_logits, xs) for _ in range(3))
        pre_exact = Preprocessor(clf.contract)
        ref = np.stack([transform(Image.open(p).convert("RGB")).numpy() for p in paths[:50]])
        ours = np.stack([pre_exact(p) for p in paths[:50]])
        res["end_to_end_ms"] = {k: round(v, 3) for k, v in e2e.items()}
        res["end_to_end_rounds_ms"] = {k: [round(x, 3) for x in v] for k, v in rounds.items()}
        res["end_to_end_speedup_vs_torch"] = round(e2e["torch"] / e2e["runtime"], 2)
        res["preprocess_share"] = round(pre_share, 3)
        res["preprocess_ms"] = round(split["pre"] / (2 * len(paths)) * 1e3, 3)
        res["model_only_ms"] = {"torch": round(m_torch, 3), "onnxruntime_fp32": round(m_ort, 3),
                                "onnxruntime_int8": round(m_int8, 3)}
        res["model_only_speedup_vs_torch"] = round(m_torch / m_ort, 2)
        res["int8_vs_fp32_model_speed"] = round(m_ort / m_int8, 2)
        res["int8_accuracy"] = "not measured here (random-init model): see `python -m bench export`"
        res["label_agreement_runtime_vs_torch"] = float(agree)
        res["preprocess_vs_timm_max_abs_diff"] = float(np.abs(ours - ref).max())

        # fast decode on large JPEGs
        big = _large_jpegs(tmp, [Path(p) for p in paths[:40]])
        pre_fast = Preprocessor(clf.contract, fast_decode=True)
        fd = {}
        for kind, files in big.items():
            t_exact = statistics.median(_per_image_ms(pre_exact, files) for _ in range(2))
            t_fast = statistics.median(_per_image_ms(pre_fast, files) for _ in range(2))
            a = np.stack([np.asarray(pre_exact.image(f), dtype=np.int16) for f in files])
            b = np.stack([np.asarray(pre_fast.image(f), dtype=np.int16) for f in files])
            la = clf.predict_logits(np.stack([pre_exact(f) for f in files]))
            lb = clf.predict_logits(np.stack([pre_fast(f) for f in files]))
            d, spread = np.abs(a - b), float(np.ptp(la, axis=1).mean())  # random net: compare to its logit range
            fd[kind] = {"size": "2048x1536", "exact_ms": round(t_exact, 2), "fast_ms": round(t_fast, 2),
                        "speedup": round(t_exact / t_fast, 2), "pixel_max_abs_diff": int(d.max()),
                        "pixel_mean_abs_diff": round(float(d.mean()), 3),
                        "logit_max_abs_diff": float(np.abs(la - lb).max()), "logit_range_mean": spread,
                        "top1_agreement": float(np.mean(la.argmax(1) == lb.argmax(1)))}
        res["fast_decode"] = fd
        res["cold_start_s"] = {k: (round(v, 3) if isinstance(v, float) else v)
                               for k, v in _cold_start(fp32, paths[0]).items()}
    res["runtime_install"] = _install_size_mb()

    e, m, c = res["end_to_end_ms"], res["model_only_ms"], res["cold_start_s"]
    rows = [
        ("end-to-end, PyTorch eager + timm transform", f"{e['torch']:.2f} ms/image",
         f"torch threads {res['torch_threads']} (the faster of {sorted(res['torch_model_ms_by_threads'])})"),
        ("end-to-end, runtime fp32", f"{e['runtime']:.2f} ms/image",
         f"{res['end_to_end_speedup_vs_torch']:.1f}x faster (target >= 5x)"),
        ("preprocessing share of runtime e2e", f"{100 * res['preprocess_share']:.0f}%",
         f"{res['preprocess_ms']:.2f} ms (target <= 40%)"),
        ("runtime predict(path), step by step", f"{res['runtime_breakdown_ms']['predict']:.2f} ms/image",
         ", ".join(f"{k} {v:.2f}" for k, v in res["runtime_breakdown_ms"].items() if k != "predict")
         + f" ms; onnxruntime threads: {res['onnxruntime_threads']}"),
        ("model only: torch / ort fp32 / ort int8", f"{m['torch']:.2f} / {m['onnxruntime_fp32']:.2f} / "
         f"{m['onnxruntime_int8']:.2f} ms", f"ort {res['model_only_speedup_vs_torch']:.1f}x torch; "
         f"int8 {res['int8_vs_fp32_model_speed']:.2f}x fp32"),
        ("cold start: import + session", f"{c['import_plus_session_s'] * 1e3:.0f} ms",
         f"import {c['import_s'] * 1e3:.0f} + session {c['session_s'] * 1e3:.0f} ms, first predict "
         f"{c['first_predict_s'] * 1e3:.0f} ms (target < 500 ms); torch loaded: {c['torch_loaded']}"),
        ("runtime install (numpy+Pillow+onnxruntime+deps)", f"{res['runtime_install']['total_mb']:.0f} MB",
         "target < 250 MB"),
    ]
    for kind, f in res["fast_decode"].items():
        rows.append((f"fast decode, {kind} {f['size']} JPEG", f"{f['exact_ms']:.1f} -> {f['fast_ms']:.1f} ms",
                     f"{f['speedup']:.1f}x; pixels max {f['pixel_max_abs_diff']}/255 "
                     f"mean {f['pixel_mean_abs_diff']:.2f}; "
                     f"logits max {f['logit_max_abs_diff']:.1e} (range {f['logit_range_mean']:.1e}), top-1 agree "
                     f"{f['top1_agreement']:.2f}"))
    rows.append(("runtime vs timm input tensor (exact decode)",
                 f"max |Δ| {res['preprocess_vs_timm_max_abs_diff']:.1e}",
                 f"labels agree with torch on {100 * res['label_agreement_runtime_vs_torch']:.0f}% of 50"))
    w = max(len(r[0]) for r in rows)
    for name, val, note in rows:
        print(f"  {name:<{w}}  {val:>22}  {note}")
    print("  (random-init weights: speed only; accuracy of a trained student per format: python -m bench export)")
    return res


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
