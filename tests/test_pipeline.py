"""End to end through the CLI: teacher -> student -> export -> run, caching, and a kill mid-stage."""
from __future__ import annotations

import json

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distillery.cli import main
from distillery.rundir import RunPaths, read_json, read_table
from tests.conftest import EUROSAT_CLASSES, SAMPLE

DISTILLERY = [sys.executable, "-m", "distillery.cli"]


def write_job(tmp_path: Path, tiny_models, unlabeled: Path, **teacher_synth) -> Path:
    raw = {
        "name": "e2e",
        "domain": "satellite photo",
        "classes": [{"name": n, "folder": f} for n, f in EUROSAT_CLASSES],
        "data": {"unlabeled": str(unlabeled), "eval": str(SAMPLE / "eval")},
        "run_dir": str(tmp_path / "run"),
        "models": {k: str(v) for k, v in tiny_models.items()},
        "teacher": {"synth": {"images_per_class": 1, "steps": 2, "resolution": 64, "output_size": 64,
                              "batch_size": 10, **teacher_synth},
                    "lora": {"steps": 2, "batch_size": 2}},
        "student": {"model": "mobilenetv3_small_050", "input_size": 64, "epochs": 1, "batch_size": 16},
        "export": {"parity_images": 20},
    }
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_end_to_end_cli(tmp_path, tiny_models, small_unlabeled, capsys):
    job = write_job(tmp_path, tiny_models, small_unlabeled)
    for stage in ("teacher", "student", "export"):
        assert main([stage, "--job", str(job), "--no-progress"]) == 0, stage
    paths = RunPaths(tmp_path / "run")
    # the run-folder contract
    for f in (paths.synthetic, paths.pseudo_labels, paths.manifest, paths.student_weights, paths.student_config,
              paths.student_metrics, paths.onnx, paths.export_report):
        assert f.is_file(), f
    syn = read_table(paths.synthetic)
    assert len(syn) == 10 and {"path", "class_index", "class_name", "trick", "prompt", "guidance", "steps", "seed",
                                "sha256"} <= set(syn[0])
    assert len(list(paths.synthetic_dir.rglob("*.png"))) == 10
    man = read_table(paths.manifest)
    assert {"path", "source", "label", "soft_target", "weight"} <= set(man[0]) and len(man) == 30
    for folder in (paths.teacher, paths.student, paths.export):
        assert (folder / "job.resolved.json").is_file()
    report = read_json(paths.export_report)
    assert report["formats"]["fp32"]["passed"] is True
    metrics = read_json(paths.student_metrics)
    assert metrics["eval"]["images"] == 100

    # the runtime's top-1 matches the PyTorch student on the sample images
    import torch
    from PIL import Image
    from timm.data import create_transform

    from distillery.runtime import Classifier
    from distillery.student import load_student

    model, cfg = load_student(paths.student)
    tf = create_transform(**cfg["data_config"])
    images = sorted((SAMPLE / "eval").rglob("*.jpg"))
    with torch.no_grad():
        ref = model(torch.stack([tf(Image.open(p).convert("RGB")) for p in images])).argmax(1).numpy()
    clf = Classifier.load(paths.onnx)
    got = np.array([p.index for p in clf.predict([str(p) for p in images])])
    assert (got == ref).mean() == 1.0, f"top-1 agreement {(got == ref).mean():.3f} on {len(images)} images"

    # `distillery run` prints a class and a probability
    capsys.readouterr()
    assert main(["run", str(paths.onnx), str(images[0])]) == 0
    line = capsys.readouterr().out.strip().split("\t")
    assert line[0] == str(images[0]) and line[1] in [n for n, _ in EUROSAT_CLASSES] and 0 < float(line[2]) <= 1

    # `distillery eval` on the export folder: the student stage's own top-1 on data.eval, the same confusion
    capsys.readouterr()
    assert main(["eval", str(paths.export), str(SAMPLE / "eval"), "--json", "-"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["images"] == metrics["eval"]["images"] == 100
    assert ev["top1"] == pytest.approx(metrics["eval"]["top1"], abs=1e-9), (ev["top1"], metrics["eval"]["top1"])
    assert np.asarray(ev["confusion"]).sum() == 100 and len(ev["worst"]) <= 10
    assert main(["eval", str(paths.export), str(SAMPLE)]) == 2  # sub-folders that are not classes: refused
    assert "do not match the model's classes" in capsys.readouterr().err

    # running every stage again changes nothing
    before = snapshot(paths.root)
    for stage in ("teacher", "student", "export"):
        assert main([stage, "--job", str(job), "--no-progress"]) == 0
    assert snapshot(paths.root) == before

    # a changed setting reruns that stage
    assert main(["student", "--job", str(job), "--no-progress", "student.epochs=2"]) == 0
    assert read_json(paths.student_metrics)["epochs"] == 2

    # a moved run folder continues where it stopped: paths inside it are stored relative to it
    import pyarrow.parquet as pq

    stored = pq.read_table(paths.manifest).column("path").to_pylist()
    assert sum(not os.path.isabs(p) for p in stored) == 10  # the synthetic images, relative to teacher/
    assert main(["export", "--job", str(job), "--no-progress", "student.epochs=2"]) == 0  # the retrained student
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    os.rename(paths.root, moved)
    raw = yaml.safe_load(job.read_text())
    raw["run_dir"] = str(moved)
    job.write_text(yaml.safe_dump(raw))

    def outputs(root):
        return {str(Path(p).relative_to(root)): t for p, t in snapshot(root).items()
                if not p.endswith(("report.html", ".lock"))}

    before = outputs(moved)
    for stage in ("teacher", "student", "export"):
        assert main([stage, "--job", str(job), "--no-progress", "student.epochs=2"]) == 0, stage
    assert outputs(moved) == before  # nothing recomputed
    assert all(r["path"].startswith(str(moved)) for r in read_table(RunPaths(moved).manifest)
               if r["source"] == "synthetic")

    # --force runs an up-to-date stage again from the start
    onnx = RunPaths(moved).onnx
    mtime = onnx.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["export", "--job", str(job), "--no-progress", "--force", "student.epochs=2"]) == 0
    assert onnx.stat().st_mtime_ns != mtime and "--force: removed 1 stamp/checkpoint file(s)" in capsys.readouterr().err


def test_teacher_help_names_every_registered_teacher():
    from distillery.cli import TEACHER_DESCRIPTION
    from distillery.teacher import TEACHERS

    for name in (*TEACHERS, "lora", "synth", "prior", "ensemble"):
        assert f"\n  {name} " in TEACHER_DESCRIPTION, name


def test_bad_job_exits_2_with_message(tmp_path, capsys):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "classes": ["a", "b"], "data": {"unlabeled": "missing"}}))
    assert main(["teacher", "--job", str(p)]) == 2
    err = capsys.readouterr().err
    assert "data.unlabeled" in err and "missing" in err


def test_kill_mid_synthesis_then_rerun_completes(tmp_path, tiny_models, small_unlabeled):
    """SIGKILL right after the 7th synthetic image is committed (a kill point, distillery/killpoints.py: no
    wall-clock sleep); the rerun keeps those 7 and makes the rest."""
    job = write_job(tmp_path, tiny_models, small_unlabeled, images_per_class=6, batch_size=2, steps=4)
    paths = RunPaths(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_KILL_AT"}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    killed = subprocess.run(DISTILLERY + ["teacher", "--job", str(job), "--no-progress"],
                            env=dict(env, DISTILLERY_KILL_AT="synth.image:7"), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL and "kill point synth.image:7: SIGKILL" in killed.stderr, \
        killed.stderr[-2000:]
    n_before = len(list(paths.synthetic_dir.rglob("*.png")))
    assert n_before == 7, f"{n_before} images on disk after the kill at the 7th"
    assert not paths.synthetic.exists()
    done = subprocess.run(DISTILLERY + ["teacher", "--job", str(job), "--no-progress"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Loading pipeline components" not in done.stderr  # --no-progress silences the libraries' bars too
    assert "7 already on disk" in done.stderr, done.stderr[-2000:]
    rows = read_table(paths.synthetic)
    files = sorted(paths.synthetic_dir.rglob("*.png"))
    assert len(rows) == 60 and len(files) == 60 and not list(paths.teacher.rglob("*.tmp*"))
    assert {r["path"] for r in rows} == {str(f.resolve()) for f in files}
    assert paths.manifest.is_file()


def test_unreachable_hub_fails_within_seconds(tmp_path, small_unlabeled):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "classes": ["a", "b"], "data": {"unlabeled": str(small_unlabeled)},
                                 "run_dir": str(tmp_path / "run"),
                                 "models": {"diffusion": "no-such-org/no-such-model", "clip": "no-such-org/clip"}}))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    t0 = time.perf_counter()
    r = subprocess.run(DISTILLERY + ["teacher", "--job", str(p)], env=env, capture_output=True, text=True,
                       timeout=120)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert "models.diffusion" in r.stderr and "no-such-org/no-such-model" in r.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s"
