"""The device bundle: contents, the golden smoke test (passes from the bundle alone, fails loudly on
preprocessing drift), the example app, and the runtime wheel installing alone in a fresh virtual environment."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("torch")
pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")
yaml = pytest.importorskip("yaml")

from distillery.cli import main as cli_main  # noqa: E402
from distillery.rundir import sha256_file  # noqa: E402

from .test_export import CLASSES, make_export_job  # noqa: E402

SMOKE_TIMEOUT = 120


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real export of a tiny random timm student (fp32) and its bundle, written through the CLI."""
    from distillery.export import export_onnx

    tmp = tmp_path_factory.mktemp("bundle")
    job, paths, images = make_export_job(tmp, formats=["fp32"], required=["fp32"], parity_images=6,
                                         deploy_timing_s=0.0)
    export_onnx(job, progress=False)
    job_file = tmp / "job.yaml"
    job_file.write_text(yaml.safe_dump({"name": job.name, "classes": CLASSES,
                                        "data": {"unlabeled": str(tmp / "images")}, "run_dir": str(paths.root)}))
    assert cli_main(["bundle", "--job", str(job_file), "--images", "6", "--no-progress"]) == 0
    return paths.root / "bundle", paths, images


def _run(args, cwd=None, env=None, timeout=SMOKE_TIMEOUT):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_bundle_contents(bundle):
    out, paths, _ = bundle
    report = json.loads(paths.export_report.read_text())
    deployed = report["deploy"]["file"]
    for name in ("README.md", "app.py", "smoke_test.py", "golden.json", "bundle.json", "requirements-x86.txt",
                 "requirements-jetpack.txt", f"model/{deployed}", "model/report.json"):
        assert (out / name).is_file(), name
    assert sha256_file(out / "model" / deployed) == sha256_file(paths.export / deployed)
    wheels = list((out / "wheels").glob("*.whl"))
    assert len(wheels) == 1 and wheels[0].name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert {n for n in names if not n.startswith("distillery_runtime-")} == {
        f"distillery/runtime/{p.name}" for p in (Path(__file__).parents[1] / "runtime").glob("*.py")}
    requires = sorted(line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["Pillow>=10", "numpy>=1.24", "onnxruntime>=1.17"]
    golden = json.loads((out / "golden.json").read_text())
    assert len(golden["images"]) == 6 and golden["class_names"] == CLASSES
    for g in golden["images"]:
        assert (out / g["file"]).is_file() and (out / g["crop"]).is_file()
        assert abs(sum(g["probabilities"]) - 1) < 1e-5 and g["label"] == CLASSES[g["index"]]
    jetpack = (out / "requirements-jetpack.txt").read_text()
    assert "onnxruntime-gpu" in jetpack and "JetPack" in jetpack and "TensorRT" in jetpack
    assert "onnxruntime" in (out / "requirements-x86.txt").read_text()
    manifest = json.loads((out / "bundle.json").read_text())
    assert all(sha256_file(out / f) == v["sha256"] for f, v in manifest["files"].items())


def test_golden_images_are_class_balanced(bundle):
    out, paths, images = bundle
    from distillery.rundir import read_table

    label = {Path(r["path"]).name: r["label"] for r in read_table(paths.pseudo_labels)}
    golden = json.loads((out / "golden.json").read_text())
    counts = {}
    for g in golden["images"]:
        counts[label[g["source"]]] = counts.get(label[g["source"]], 0) + 1
    assert counts == {0: 2, 1: 2, 2: 2}


def test_smoke_test_passes_from_the_bundle_alone(bundle, tmp_path):
    """Copied elsewhere (nothing of the run folder or repository beside it), with torch blocked."""
    out, _, _ = bundle
    copy = tmp_path / "device"
    shutil.copytree(out, copy)
    block = tmp_path / "block"
    block.mkdir()
    (block / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(block)}
    res = _run([sys.executable, "smoke_test.py"], cwd=copy, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "smoke test passed: 6 images" in res.stdout


def _altered_model(src: Path, dst: Path, **contract) -> Path:
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["distillery"])
    meta["preprocess"].update(contract)
    props["distillery"] = json.dumps(meta)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("change", [{"interpolation": "nearest"}, {"resize": 48}])
def test_smoke_test_fails_loudly_when_preprocessing_drifts(bundle, tmp_path, change):
    """The same network behind a changed resize (filter or size) fails, naming image, expected and got."""
    out, _, _ = bundle
    golden = json.loads((out / "golden.json").read_text())
    altered = _altered_model(out / golden["model"], tmp_path / "drifted.onnx", **change)
    res = _run([sys.executable, str(out / "smoke_test.py"), "--model", str(altered)])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "smoke test FAILED" in res.stderr
    fails = [line for line in res.stderr.splitlines() if line.strip().startswith("FAIL")]
    assert fails
    for line in fails:
        assert "images/" in line and "expected '" in line and "got '" in line
        assert "preprocessed pixels differ from the bundle's crop" in line


def test_app_classifies_a_folder_and_explains_missing_opencv(bundle, tmp_path):
    out, _, _ = bundle
    res = _run([sys.executable, str(out / "app.py"), str(out / "images"), "--topk", "2"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 6 and all(len(line.split("\t")) == 5 for line in lines)
    assert all(line.split("\t")[1] in CLASSES for line in lines)
    block = tmp_path / "block"
    block.mkdir()
    (block / "cv2.py").write_text("raise ImportError('no OpenCV here')\n")
    res = _run([sys.executable, str(out / "app.py"), "--camera", "0"], env={**os.environ, "PYTHONPATH": str(block)})
    assert res.returncode != 0 and "need OpenCV, which is not installed" in res.stderr


def test_app_without_the_runtime_says_what_to_install(bundle, tmp_path):
    out, _, _ = bundle
    code = ("import runpy, sys; sys.modules['distillery.runtime'] = None; sys.argv = ['app.py', 'images']; "
            "sys.exit(runpy.run_path('app.py', run_name='__main__'))")
    res = _run([sys.executable, "-c", code], cwd=out)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "cannot import the runtime" in res.stderr and "pip install -r requirements-x86.txt" in res.stderr


def test_bundle_readme_names_the_format_once_and_the_report_names_the_bundle(bundle):
    from distillery.bundle import _readme

    out, paths, _ = bundle
    readme = (out / "README.md").read_text()
    assert "fp32: fp32" not in readme and "(fp32: " in readme
    text = _readme("j", "model/model.onnx", {"format": "fp16", "why": "fp16: fastest"},
                   {"images": [], "tolerance": {"probability": 0.02}, "class_names": ["a"]}, "w.whl", {})
    assert "(fp16: fastest)" in text
    html = (paths.root / "report.html").read_text()  # `bundle` refreshes the report; its summary names it
    assert "smoke test on 6 golden images" in html


def test_bundle_without_export_is_a_clear_error(tmp_path, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"name": "x", "classes": CLASSES, "data": {"unlabeled": str(tmp_path)},
                                        "run_dir": str(tmp_path / "run")}))
    assert cli_main(["bundle", "--job", str(job_file)]) == 2
    assert "export the student first" in capsys.readouterr().err


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def test_runtime_wheel_installs_alone_and_passes_the_smoke_test(bundle, tmp_path):
    """A fresh venv (no system site-packages) with only numpy, Pillow, onnxruntime and the wheel: no torch, no
    compiler; the bundle's smoke test passes there. Prints the installed size and the time it took."""
    out, _, _ = bundle
    t0 = time.perf_counter()
    venv = tmp_path / "venv"
    res = _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert res.returncode == 0, res.stderr
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    wheel = next((out / "wheels").glob("*.whl"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    res = _run([str(py), "-m", "pip", "install", "-q", "numpy", "Pillow", "onnxruntime", str(wheel)], env=env,
               timeout=600)
    if res.returncode != 0:
        pytest.skip(f"pip could not install numpy/Pillow/onnxruntime from the registry here: {res.stderr[-400:]}")
    t_install = time.perf_counter() - t0
    probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('distillery.runtime').origin)"
    # cwd: not the repository, whose distillery/ folder would shadow the installed wheel
    res = _run([str(py), "-c", probe], env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("None ") and str(venv) in res.stdout, res.stdout + res.stderr
    res = _run([str(py), str(out / "smoke_test.py")], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run([str(venv / "bin" / "distillery-run"), str(out / "model"), str(next((out / "images").iterdir()))],
               env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.split("\t")[1] in CLASSES, res.stderr
    site = next(venv.glob("lib/python*/site-packages"))
    size = _dir_size(site)
    print(f"\nruntime venv: site-packages {size / 1e6:.0f} MB, venv + install {t_install:.1f} s")
    assert size < 400e6


def test_smoke_test_tensorrt_flag_without_tensorrt_says_so_and_still_checks(bundle):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is available here; the skip line is not printed")
    out, _, _ = bundle
    res = _run([sys.executable, str(out / "smoke_test.py"), "--tensorrt", "fp16"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TensorRT engine skipped" in res.stdout + res.stderr and "smoke test passed" in res.stdout
