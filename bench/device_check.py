"""The GPU paths in one short script (issue 19): a few minutes on an H200 when one is lent; ``--cpu`` runs the
same code on the CPU as a smoke check of the script itself (tests/test_device_check.py), measuring nothing
that matters.

    .venv/bin/python -m bench.device_check [--export RUN/export] [--cpu] [--json OUT.json]

1. onnxruntime's CUDA provider (``onnxruntime-gpu``) on the export folder's ``model.onnx``,
   ``model.int8_qdq.onnx`` and ``model.sparse24.onnx``: top-1 agreement with the same file on the CPU provider
   and ms per batch of 32, per file. Without ``--export`` the three files are built here from a tiny timm
   model (needs ``distillery[modelopt]``).
2. fp16 synthesis: the tiny diffusion model (``models/tiny/diffusion``) in float16, 2 images, 4 DDIM steps,
   through the teacher's own ``generate``; seconds and whether the images are finite.
3. bf16 student steps: a MobileNetV3-small at 64 px, 20 AdamW steps of the distillation loss under
   ``torch.autocast(bfloat16)``; ms per step and whether the loss is finite and falls.
4. TensorRT: whether it imports (it cannot be installed here: the registry's tensorrt-*-libs are placeholders),
   so the 2:4 sparse speed-up and the TensorRT int8 engine of the QDQ file are reported as unavailable.

Every step that cannot run says so in one line; the script always prints its JSON and exits 0 unless a step
that could run failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FILES = {"fp32": "model.onnx", "int8_qdq": "model.int8_qdq.onnx", "sparse24": "model.sparse24.onnx"}


def _tiny_export(folder: Path) -> Path:
    """fp32, int8_qdq and sparse24 files of a tiny timm model (random weights) in ``folder``."""
    import timm
    import torch

    from distillery.export.formats import _export_fp32
    from distillery.export.modelopt_formats import build_int8_qdq, build_sparse24

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4).eval()
    config = {"class_names": list("abcd"), "architecture": "mobilenetv3_small_050",
              "data_config": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                              "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}}
    x = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    _export_fp32(model, config, 17, folder / FILES["fp32"], progress=False)
    build_int8_qdq(model, config, x, x, folder / FILES["int8_qdq"], opset=17, epochs=0, lr=1e-5, seed=0, progress=False)
    build_sparse24(model, config, x, folder / FILES["sparse24"], opset=17, epochs=1, lr=1e-4, seed=0, progress=False)
    return folder


def check_onnxruntime(export: Path, cpu: bool) -> dict:
    import onnxruntime as ort

    provider = "CPUExecutionProvider" if cpu else "CUDAExecutionProvider"
    if provider not in ort.get_available_providers():
        return {"ran": False, "why": f"onnxruntime {ort.__version__} has no {provider} (install onnxruntime-gpu)"}
    out = {"ran": True, "provider": provider, "files": {}}
    for fmt, name in FILES.items():
        path = export / name
        if not path.is_file():
            out["files"][fmt] = {"ran": False, "why": f"{path} is missing (export.formats without {fmt})"}
            continue
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shape = ref.get_inputs()[0].shape
        x = np.random.default_rng(1).standard_normal((32, *[int(d) for d in shape[1:]])).astype(np.float32)
        want = ref.run(None, {"input": x})[0]
        s = ort.InferenceSession(str(path), providers=[provider, "CPUExecutionProvider"])
        got = s.run(None, {"input": x})[0]
        times = []
        for _ in range(20):
            t = time.perf_counter()
            s.run(None, {"input": x})
            times.append(1000 * (time.perf_counter() - t))
        out["files"][fmt] = {"ran": True, "providers_in_use": s.get_providers(),
                             "top1_agreement_with_cpu": float(np.mean(got.argmax(1) == want.argmax(1))),
                             "max_abs_diff_vs_cpu": float(np.abs(got - want).max()),
                             "ms_per_batch32_median": round(float(np.median(times[5:])), 3)}
    return out


def check_fp16_synthesis(cpu: bool, diffusion: Path | None = None) -> dict:
    import torch

    if not cpu and not torch.cuda.is_available():
        return {"ran": False, "why": "no CUDA device visible to torch"}
    ref = diffusion or REPO / "models" / "tiny" / "diffusion"
    if not ref.is_dir():
        return {"ran": False, "why": f"{ref} is missing (make tiny-models)"}
    from distillery.models import load_diffusion
    from distillery.teacher.synth import generate

    device, half = ("cpu", False) if cpu else ("cuda", True)  # float16 convolutions are GPU kernels
    pipe = load_diffusion(str(ref), device=device, half=half)
    t = time.perf_counter()
    images = generate(pipe, ["a satellite photo of forest", "a satellite photo of a river"], [5.0, 5.0], [0, 1], 4)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"ran": True, "device": device, "dtype": str(pipe.unet.dtype), "images": list(images.shape),
            "seconds": round(time.perf_counter() - t, 2), "finite": bool(torch.isfinite(images).all())}


def check_bf16_student(cpu: bool, steps: int = 20) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    from distillery.student.loss import distillation_loss

    if not cpu and not torch.cuda.is_available():
        return {"ran": False, "why": "no CUDA device visible to torch"}
    device = "cpu" if cpu else "cuda"
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64 if not cpu else 8, 3, 64, 64, device=device)
    soft = F.softmax(torch.randn(len(x), 10, device=device), 1)
    losses, times = [], []
    for _ in range(steps if not cpu else 4):
        t = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = distillation_loss(model(x).float(), soft, soft.argmax(1), alpha=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
        losses.append(float(loss))
    return {"ran": True, "device": device, "batch": len(x), "steps": len(losses),
            "loss_first_last": [losses[0], losses[-1]], "finite": bool(np.isfinite(losses).all()),
            "ms_per_step_median": round(float(np.median(times[1:])), 2)}


def check_tensorrt() -> dict:
    from distillery.export.tensorrt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    return {"ran": False, "why": reason} if reason else {
        "ran": False, "why": "TensorRT imports here, but this script does not build engines yet: "
                             "`distillery export` with export.tensorrt builds them"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path,
                    help="an export folder with model.onnx / model.int8_qdq.onnx / model.sparse24.onnx")
    ap.add_argument("--cpu", action="store_true", help="smoke check on the CPU (measures nothing that matters)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--diffusion", type=Path, help="diffusion model folder for the fp16 synthesis check "
                                                     "(default models/tiny/diffusion, built by make tiny-models)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res, failed = {"cpu_smoke": args.cpu}, []
    with tempfile.TemporaryDirectory(prefix="distillery-device-") as tmp:
        steps = {"onnxruntime": lambda: check_onnxruntime(args.export or _tiny_export(Path(tmp)), args.cpu),
                 "fp16_synthesis": lambda: check_fp16_synthesis(args.cpu, args.diffusion),
                 "bf16_student": lambda: check_bf16_student(args.cpu),
                 "tensorrt": check_tensorrt}
        for name, fn in steps.items():
            t = time.perf_counter()
            try:
                res[name] = fn()
            except Exception as e:
                res[name] = {"ran": False, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-2000:]}
                failed.append(name)
            res[name]["wall_s"] = round(time.perf_counter() - t, 1)
            r = res[name]
            print(f"device_check: {name}: " + ("ran" if r.get("ran") else f"NOT RUN: {r.get('why') or r.get('error')}"),
                  flush=True)
    res["unmeasured"] = ["TensorRT engines (int8 from the QDQ file, 2:4 sparse kernels): "
                         + (res["tensorrt"].get("why") or "")]
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
