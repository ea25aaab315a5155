"""Export: a tiny random timm student -> ONNX with metadata, parity against PyTorch, gate, stamp."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from distillery.export import ExportGateError, export_onnx  # noqa: E402
from distillery.export.deploy import choose_deploy  # noqa: E402
from distillery.export.images import balanced_sample  # noqa: E402
from distillery.export.onnx import _load_student  # noqa: E402
from distillery.job import job_from_dict, settings_hash  # noqa: E402
from distillery.rundir import RunPaths, sha256_file, write_json, write_table  # noqa: E402
from distillery.runtime import Classifier  # noqa: E402
from distillery.runtime.preprocess import preprocess  # noqa: E402

CLASSES = ["a", "b", "c"]
ARCH = "mobilenetv3_small_050"
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "eurosat-sample" / "unlabeled"
DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
               "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center"}


def write_student(folder):
    """The student checkpoint contract: model.safetensors (timm state_dict) + config.json."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))
    with torch.no_grad():  # spread the random logits so top-1 is never a near-tie
        model.get_classifier().weight.mul_(20)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    write_json(folder / "config.json", {
        "architecture": ARCH, "num_classes": len(CLASSES), "class_names": CLASSES, "model_args": {},
        "data_config": DATA_CONFIG, "job_hash": "abc123", "versions": {"timm": timm.__version__}})


def write_images(folder, n=12):
    """Real domain images: the committed EuroSAT sample when present, else generated ones."""
    folder.mkdir(parents=True, exist_ok=True)
    real = sorted(SAMPLE.glob("*.jpg"))[:n]
    if len(real) == n:
        for p in real:
            shutil.copy(p, folder / p.name)
        return sorted(folder.glob("*.jpg"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(30, 80)), int(rng.integers(30, 80))
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        arr[..., i % 3] = 255 - arr[..., i % 3] // 4  # some image-to-image variety
        p = folder / f"img{i:02d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def make_export_job(tmp_path, name="t", pseudo_labels=True, **export):
    img_dir = tmp_path / "images"
    images = write_images(img_dir)
    job = job_from_dict({"name": name, "classes": CLASSES, "data": {"unlabeled": str(img_dir)},
                         "run_dir": str(tmp_path / "run"), "export": export}, base=tmp_path)
    paths = RunPaths(job.run_path)
    write_student(paths.student)
    if pseudo_labels:
        write_table(paths.pseudo_labels, [
            {"path": str(p), "sha256": sha256_file(p), "label": i % 3, "confidence": 0.9,
             **{f"p_clip_{c}": float(c == i % 3) for c in range(3)}} for i, p in enumerate(images)])
    return job, paths, images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export")
    job, paths, images = make_export_job(tmp_path, formats=["fp32", "fp16", "int8"], required=["fp32"], parity_images=9,
                                         deploy_timing_s=0.05)
    report = export_onnx(job, progress=False)
    return job, paths, images, report


def test_onnx_file_checker_and_metadata(exported):
    job, paths, _, report = exported
    assert paths.onnx.is_file() and (paths.export / "job.resolved.json").is_file()
    model = onnx.load(str(paths.onnx))
    onnx.checker.check_model(model, full_check=True)
    assert len(list(paths.export.glob("*.data"))) == 0  # one self-contained file
    assert model.opset_import[0].version == job.export.opset
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["distillery"])
    assert meta["class_names"] == CLASSES
    assert meta["provenance"] == "abc123" and meta["format"] == "fp32"
    assert {"torch", "timm", "onnx"} <= set(meta["versions"])
    assert meta["preprocess"] == {
        "input_size": [3, 32, 32], "resize": math.floor(32 / 0.875), "crop": "center", "interpolation": "bicubic",
        "mean": DATA_CONFIG["mean"], "std": DATA_CONFIG["std"], "channel_order": "RGB", "layout": "NCHW",
        "scale": 255}
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis


def test_dynamic_batch_and_logits_match_torch(exported):
    _, paths, images, _ = exported
    model, config = _load_student(paths.student)
    sess = ort.InferenceSession(str(paths.onnx), providers=["CPUExecutionProvider"])
    contract = Classifier.load(paths.onnx).contract
    x_all = np.stack([preprocess(p, contract) for p in images[:3]])
    for batch in (x_all[:1], x_all):
        got = sess.run(["logits"], {"input": batch})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(batch)).numpy()
        assert got.shape == (len(batch), len(CLASSES))
        diff = np.abs(got - ref)
        assert diff.max() < 1e-4, f"batch {len(batch)}: max |Δlogit| {diff.max():.3g}, mean {diff.mean():.3g}"


def test_report(exported):
    job, paths, images, report = exported
    on_disk = json.loads(paths.export_report.read_text())
    assert on_disk == json.loads(json.dumps(report))
    fp32 = on_disk["formats"]["fp32"]
    assert fp32["passed"] is True and fp32["agreement"] == 1.0 and fp32["n_images"] == 9
    assert fp32["max_abs_diff"] < 1e-4, fp32
    assert fp32["path"] == str(paths.onnx) and fp32["file_size"] == paths.onnx.stat().st_size
    assert on_disk["tensorrt"]["built"] is False and on_disk["tensorrt"]["reason"]
    assert on_disk["parity_source"] == "pseudo_labels"
    label_of = {str(p): i % 3 for i, p in enumerate(images)}  # as written into pseudo_labels.parquet
    labels = [label_of[p] for p in on_disk["parity_images"]]
    assert sorted(np.bincount(labels).tolist()) == [3, 3, 3]  # class-balanced


def test_fp16_and_int8(exported):
    _, paths, images, report = exported
    for fmt, name in (("fp16", "model.fp16.onnx"), ("int8", "model.int8.onnx")):
        res = report["formats"][fmt]
        assert res["path"] == str(paths.export / name) and res["n_images"] == 9
        assert 0.0 <= res["agreement"] <= 1.0 and np.isfinite(res["max_abs_diff"]), res
        clf = Classifier.load(res["path"], providers=["CPUExecutionProvider"])
        assert clf.format == fmt and clf.class_names == CLASSES
        assert clf.session.get_inputs()[0].type == "tensor(float)"  # inputs stay float32
        assert len(clf.predict([str(p) for p in images[:2]])) == 2
    # fp16 keeps logits close; a random net's int8 error is only required to be bounded
    assert report["formats"]["fp16"]["max_abs_diff"] < 0.05, report["formats"]["fp16"]
    # export.int8_exclude's default keeps the first conv and the classifier in float: their weights are no
    # DequantizeLinear output, while every other Conv's are
    q = onnx.load(str(paths.export / "model.int8.onnx"))
    made_by = {o: n.op_type for n in q.graph.node for o in n.output}
    weight_src = {n.name: made_by.get(n.input[1], "initializer") for n in q.graph.node if n.op_type in ("Conv", "Gemm")}
    excluded = report["int8_quantization"]["excluded_nodes"]
    assert len(excluded) == 2 and excluded[0].endswith("Conv") and excluded[1].endswith("Gemm"), excluded
    assert report["int8_quantization"]["reduce_range"] is True
    assert {n for n, src in weight_src.items() if src != "DequantizeLinear"} == set(excluded), weight_src
    assert report["calibration_images"] == 3  # the 12 images minus the 9 parity ones
    # quantisation-aware fine-tuning ran (default 4 epochs) on the images that are not parity images, and the
    # report says which INT8 model was kept and why
    qat = report["int8_quantization"]["qat"]
    assert qat["epochs"] == 4 and qat["images"] == 3 and isinstance(qat["used"], bool), qat
    ca, mad = qat["choice_agreement"], qat["choice_mean_abs_diff"]
    assert set(ca) == {"post_training", "qat"} and all(0.0 <= v <= 1.0 for v in ca.values())
    assert qat["used"] == ((ca["qat"], -mad["qat"]) > (ca["post_training"], -mad["post_training"]))
    # no image is left after 9 parity + 3 QAT images: the two compete on the 3 calibration images
    assert (qat["choice_set"], qat["choice_images"]) == ("calibration images", 3)


def test_int8_without_qat(tmp_path):
    job, paths, _ = make_export_job(tmp_path, formats=["fp32", "int8"], required=["fp32"], parity_images=9,
                                    int8_qat_epochs=0, deploy_timing_s=0)
    report = export_onnx(job, progress=False)
    assert report["int8_quantization"]["qat"] == {"used": False, "why": "export.int8_qat_epochs is 0"}
    assert report["formats"]["int8"]["built"]


def test_deploy_entry_names_a_passing_format_the_runtime_loads(exported):
    _, paths, images, report = exported
    dep = report["deploy"]
    passing = {f for f, r in report["formats"].items() if r["passed"]}
    assert dep["format"] in passing and dep["file"] == Path(report["formats"][dep["format"]]["path"]).name
    assert set(dep["timings_ms"]) == passing and all(t > 0 for t in dep["timings_ms"].values())
    assert min(dep["timings_ms"].values()) * (1 + dep["tolerance"]) >= dep["timings_ms"][dep["format"]]
    assert dep["why"].startswith(dep["format"] + ": ") and set(dep["gates"]) == set(report["formats"])
    clf = Classifier.load(paths.export, providers=["CPUExecutionProvider"])  # the folder: the deployed file
    assert clf.path == str(paths.export / dep["file"]) and clf.format == dep["format"]
    assert len(clf.predict([str(images[0])])) == 1


def _gates(**passed):
    """Report-like gate results: fmt=True/False (built, passed or failed), fmt=None (build failed)."""
    out = {}
    for f, ok in passed.items():
        out[f] = ({"built": False, "error": "RuntimeError: boom", "passed": False, "min_agreement": 0.98}
                  if ok is None else {"built": True, "passed": ok, "agreement": 1.0 if ok else 0.5,
                                      "min_agreement": 0.98, "max_abs_diff": 0.01})
    return out


class FakeTimer:
    """Deterministic stand-in for time_formats: fixed ms per format; records what it was asked to time."""

    def __init__(self, ms):
        self.ms, self.asked = ms, []

    def __call__(self, files, images, seconds):
        self.asked.append(sorted(files))
        return {f: self.ms[f] for f in files}


FILES = {f: Path("/x") / n for f, n in {"fp32": "model.onnx", "fp16": "model.fp16.onnx",
                                        "int8": "model.int8.onnx"}.items()}


def test_deploy_picks_the_fastest_passing_format():
    timer = FakeTimer({"fp32": 3.0, "fp16": 9.0, "int8": 2.0})
    dep = choose_deploy(_gates(fp32=True, fp16=True, int8=True), FILES, np.zeros((2, 3, 4, 4)), timer=timer)
    assert dep["format"] == "int8" and dep["file"] == "model.int8.onnx" and dep["path"] == str(FILES["int8"])
    assert dep["timings_ms"] == {"fp32": 3.0, "fp16": 9.0, "int8": 2.0} and dep["speed_vs_fp32"]["int8"] == 1.5
    assert "int8: the fastest" in dep["why"] and "fp32 passed its gate but ran 0.67x int8's speed" in dep["why"]
    # int8 slower than fp32 on this CPU: fp32, and the line says why int8 lost
    dep = choose_deploy(_gates(fp32=True, int8=True), FILES, None, timer=FakeTimer({"fp32": 3.0, "int8": 5.0}))
    assert dep["format"] == "fp32" and "int8 passed its gate but ran 0.60x fp32's speed" in dep["why"]


def test_deploy_never_times_or_picks_a_failed_format():
    timer = FakeTimer({"fp32": 3.0, "fp16": 0.1, "int8": 0.1})  # the failed ones would win on speed
    dep = choose_deploy(_gates(fp32=True, fp16=False, int8=None), FILES, None, timer=timer)
    assert dep["format"] == "fp32" and timer.asked == [["fp32"]] and set(dep["timings_ms"]) == {"fp32"}
    assert "fp16 failed its gate (agreement 0.5000 < 0.98)" in dep["why"] and "int8 not built" in dep["why"]
    dep = choose_deploy(_gates(fp32=False, int8=True), FILES, None, timer=FakeTimer({"int8": 7.0}))
    assert dep["format"] == "int8" and "the only format that passed" in dep["why"]
    timer = FakeTimer({})
    dep = choose_deploy(_gates(fp32=False, int8=False), FILES, None, timer=timer)
    assert dep["format"] is None and dep["file"] is None and timer.asked == []
    assert dep["why"].startswith("no format passed its parity gate")


def test_deploy_near_tie_keeps_the_more_precise_format_and_timing_can_be_off():
    timer = FakeTimer({"fp32": 3.0, "int8": 2.9})  # int8 3% faster: within the 5% tolerance
    dep = choose_deploy(_gates(fp32=True, int8=True), FILES, None, timer=timer, tolerance=0.05)
    assert dep["format"] == "fp32" and "within the 5% tolerance" in dep["why"]
    dep = choose_deploy(_gates(fp32=True, int8=True), FILES, None, timer=timer, tolerance=0.0)
    assert dep["format"] == "int8"
    timer = FakeTimer({"fp32": 3.0, "int8": 1.0})
    dep = choose_deploy(_gates(fp32=True, int8=True), FILES, None, timer=timer, seconds=0)
    assert dep["format"] == "fp32" and timer.asked == [] and "no timing" in dep["why"]


def test_unchanged_rerun_is_skipped(exported, capsys):
    job, paths, _, report = exported
    mtime = paths.onnx.stat().st_mtime_ns
    again = export_onnx(job, progress=True)
    assert again == json.loads(json.dumps(report))
    assert paths.onnx.stat().st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().err


def test_failed_required_gate_raises(tmp_path, monkeypatch):
    import distillery.export.onnx as stage

    real = stage.parity

    def disagreeing(*args, **kwargs):  # the measured figures, with a top-1 agreement below any sane gate
        return {**real(*args, **kwargs), "agreement": 0.75}

    monkeypatch.setattr(stage, "parity", disagreeing)
    job, paths, _ = make_export_job(tmp_path, pseudo_labels=False, min_agreement={"fp32": 0.98}, parity_images=4)
    with pytest.raises(ExportGateError, match=r"'fp32'.*agreement 0\.7500.*0\.98.*Try:") as e:
        export_onnx(job, progress=False)
    print(e.value)
    report = json.loads(paths.export_report.read_text())
    assert report["formats"]["fp32"]["passed"] is False and report["parity_source"] == "unlabeled"
    assert report["deploy"]["format"] is None and "fp32 failed" in report["deploy"]["why"]
    with pytest.raises(ExportGateError):  # not stamped: the rerun checks again
        export_onnx(job, progress=False)


def test_int8_exclude_names_must_exist(tmp_path):
    job, paths, _ = make_export_job(tmp_path, formats=["fp32", "int8"], required=["fp32", "int8"], parity_images=3,
                                    int8_exclude=["first_conv", "/no/such/Conv"])
    with pytest.raises(RuntimeError, match=r"int8.*'/no/such/Conv' matches no node.*first_conv or classifier"):
        export_onnx(job, progress=False)


def test_balanced_sample_by_hand():
    rows = [{"path": f"a{i}", "label": 0} for i in range(5)] + [{"path": "b0", "label": 1}] + \
           [{"path": f"c{i}", "label": 2} for i in range(3)]
    got = balanced_sample(rows, 6, seed=0)
    counts = {k: sum(p[0] == k for p in got) for k in "abc"}
    assert counts == {"a": 3, "b": 1, "c": 2} and len(set(got)) == 6
    assert got == balanced_sample(rows, 6, seed=0)  # deterministic
    rest = balanced_sample(rows, 100, seed=1, exclude=set(got))
    assert sorted(rest) == sorted({r["path"] for r in rows} - set(got))


def test_student_class_mismatch_is_refused(tmp_path):
    job, paths, _ = make_export_job(tmp_path)
    cfg = json.loads(paths.student_config.read_text())
    write_json(paths.student_config, {**cfg, "class_names": ["x", "y", "z"]})
    with pytest.raises(ValueError, match="retrain"):
        export_onnx(job, progress=False)
    assert settings_hash(job.export)  # job untouched


def test_optional_format_failure_is_reported_not_fatal(tmp_path, monkeypatch, capsys):
    import distillery.export.onnx as ex

    def broken(*args, **kwargs):
        raise RuntimeError("simulated converter bug")

    monkeypatch.setattr(ex, "_export_fp16", broken)
    job, paths, _ = make_export_job(tmp_path, formats=["fp32", "fp16"], required=["fp32"], parity_images=3)
    report = export_onnx(job, progress=False)
    assert report["formats"]["fp32"]["passed"] is True
    assert report["formats"]["fp16"] == {**report["formats"]["fp16"], "built": False, "passed": False}
    assert "simulated converter bug" in report["formats"]["fp16"]["error"]
    assert not (paths.export / "model.fp16.onnx").exists()
    capsys.readouterr()
    export_onnx(job, progress=True)
    assert "up to date" in capsys.readouterr().err


def test_int8_qat_failure_keeps_the_post_training_model(tmp_path, monkeypatch):
    import distillery.export.qat as qat

    def broken(*args, **kwargs):
        raise RuntimeError("no memory left")

    monkeypatch.setattr(qat, "qat_finetune", broken)
    job, paths, _ = make_export_job(tmp_path, formats=["fp32", "int8"], required=["fp32", "int8"], parity_images=6,
                                    deploy_timing_s=0, min_agreement={"int8": 1e-9})
    report = export_onnx(job, progress=False)  # int8 is required: a QAT failure must not fail it
    assert report["int8_quantization"]["qat"] == {
        "used": False, "why": "quantisation-aware fine-tuning failed: RuntimeError: no memory left"}
    assert report["formats"]["int8"]["built"] and (paths.export / "model.int8.onnx").is_file()
