"""bench/device_check.py --cpu: the GPU script's code paths run on the CPU (a smoke check; the GPU figures
themselves need a lent GPU). Needs the modelopt extra for the tiny int8_qdq / sparse24 files (in CI a missing
modelopt fails, as in tests/test_modelopt.py)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")

from distillery.export.modelopt_formats import modelopt_unavailable_reason  # noqa: E402

REASON = modelopt_unavailable_reason()
if REASON and os.environ.get("CI"):
    raise RuntimeError(f"CI: tests/test_device_check.py needs the modelopt extra: {REASON}")


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_device_check_cpu_smoke(tmp_path, capsys, tiny_models):
    from bench.device_check import main

    out = tmp_path / "dc.json"  # a fresh clone has no models/tiny: the tests' own tiny diffusion model
    assert main(["--cpu", "--json", str(out), "--diffusion", str(tiny_models["diffusion"])]) == 0
    r = json.loads(out.read_text())
    files = r["onnxruntime"]["files"]
    assert set(files) == {"fp32", "int8_qdq", "sparse24"}
    assert all(f["ran"] and f["top1_agreement_with_cpu"] == 1.0 for f in files.values())
    assert r["fp16_synthesis"]["ran"] and r["fp16_synthesis"]["finite"]
    assert r["bf16_student"]["ran"] and r["bf16_student"]["finite"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # what cannot run says so in one line
        assert r["tensorrt"]["ran"] is False and "tensorrt" in r["tensorrt"]["why"]
        assert "device_check: tensorrt: NOT RUN:" in capsys.readouterr().out
