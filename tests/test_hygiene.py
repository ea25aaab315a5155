"""Input hygiene and file modes (issue: trust): a job file with a key given twice, files that honour the umask."""
from __future__ import annotations

import os
import stat

import pytest


def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path):
    from distillery.job import JobError, load_job

    f = tmp_path / "job.yaml"
    f.write_text("name: t\nclasses: [a, b]\ndata: {unlabeled: .}\nstudent:\n  epochs: 3\nstudent:\n  lr: 0.1\n")
    with pytest.raises(JobError, match=r"the key 'student' is given twice \(lines 4 and 6\)"):
        load_job(f)
    f.write_text("name: t\nclasses: [a, b]\ndata: {unlabeled: ., unlabeled: ..}\n")
    with pytest.raises(JobError, match=r"'unlabeled' is given twice"):
        load_job(f)


def test_atomic_writes_honour_the_umask(tmp_path):
    from distillery.rundir import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("override,words", [
    ("student.lr=.nan", "student.lr: nan is not a finite number"),
    ("student.temperature=.inf", "student.temperature: inf is not a finite number"),
    ("teacher.air.fusion_lambda=.nan", "teacher.air.fusion_lambda"),
    ("student.input_size=-64", "student.input_size: -64 is too small"),
    ("export.min_agreement={fp32: 1.5}", "export.min_agreement.fp32: a top-1 agreement must be in (0, 1], got 1.5"),
    ("export.parity_images=0", "export.parity_images: must be >= 1"),
])
def test_numbers_out_of_range_are_refused_before_any_work(override, words):
    from distillery.job import JobError, load_job

    with pytest.raises(JobError) as e:
        load_job("examples/eurosat-tiny.yaml", [override])
    assert words in str(e.value), str(e.value)


def test_job_argument_that_is_a_folder_or_a_broken_link(tmp_path):
    from distillery.job import JobError, load_job

    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "mine.yaml").write_text("name: t\n")
    with pytest.raises(JobError, match=r"is a folder; pass the job file itself, e.g. --job .*mine.yaml"):
        load_job(tmp_path / "jobs")
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    with pytest.raises(JobError, match=r"symbolic link that loops"):
        load_job(tmp_path / "loop.yaml")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(JobError, match=r"symbolic link to .*gone.yaml.*does not exist"):
        load_job(tmp_path / "dangling.yaml")


@pytest.mark.parametrize("n", ["0", "-3", "two"])
def test_bundle_images_must_be_positive(n, capsys):
    from distillery.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bundle", "--job", "examples/eurosat-tiny.yaml", "--images", n])
    assert e.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err


def test_a_truncated_or_foreign_student_is_a_clear_error(tmp_path):
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    from distillery.student.model import load_student

    m = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "mobilenetv3_small_050", "num_classes": 3}))
    load_student(tmp_path)  # whole: fine
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors' cannot be read as safetensors weights .*truncated"):
        load_student(tmp_path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit the mobilenetv3_small_050"):
        load_student(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json' is not a student config"):
        load_student(tmp_path)


def test_oversized_images_are_refused_by_every_stage_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from distillery.images import check_image, load_rgb

    Image.new("RGB", (300, 200), "red").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 60,000 pixels: over the limit, under twice it
    assert "60,000 pixels, more than the 50,000-pixel limit" in check_image(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"300x200 .*PIL.Image.MAX_IMAGE_PIXELS"):
        load_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert load_rgb(tmp_path / "big.png").size == (300, 200)


def test_an_eval_folder_with_a_non_image_is_refused_before_training(tmp_path):
    import shutil

    from distillery.student.data import list_eval_images
    from tests.conftest import SAMPLE

    for f in ("Forest", "River"):
        (tmp_path / f).mkdir()
        for p in sorted((SAMPLE / "eval" / f).glob("*.jpg"))[:2]:
            shutil.copy(p, tmp_path / f / p.name)
    assert len(list_eval_images(tmp_path, ["Forest", "River"], (".jpg",), check=True)) == 4
    (tmp_path / "River" / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"data.eval: 1 file\(s\) .* cannot be used as images \(.*notes.jpg"):
        list_eval_images(tmp_path, ["Forest", "River"], (".jpg",), check=True)


def test_forget_stage_removes_only_that_stages_stamps_and_checkpoints(tmp_path):
    from distillery.rundir import forget_stage

    files = ["teacher/.synth.stamp.json", "teacher/lora/.lora.stamp.json", "teacher/lora/checkpoint.safetensors",
             "teacher/latte/latte.pt", "teacher/.synthetic.progress.jsonl", "teacher/features/clip/0.npy",
             "teacher/manifest.parquet", "student/.student.stamp.json", "student/checkpoint.pt"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    assert forget_stage(tmp_path, "teacher") == sorted(files[:5])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(files[5:])
    assert forget_stage(tmp_path, "export") == []  # a stage that never ran


def test_tables_store_run_folder_paths_relative_to_themselves(tmp_path):
    import pyarrow.parquet as pq

    from distillery.rundir import read_table, write_table

    run, data = tmp_path / "run", tmp_path / "data"
    rows = [{"path": str(run / "teacher" / "synthetic" / "a.png"), "full_path": None},
            {"path": str(data / "x.jpg"), "full_path": str(run / "teacher" / "full" / "a.png")}]
    write_table(run / "teacher" / "air" / "t.parquet", rows, relative_to=run)
    stored = pq.read_table(run / "teacher" / "air" / "t.parquet").to_pylist()
    assert stored == [{"path": "../synthetic/a.png", "full_path": None},
                      {"path": str(data / "x.jpg"), "full_path": "../full/a.png"}]
    assert read_table(run / "teacher" / "air" / "t.parquet") == rows
    (tmp_path / "moved").mkdir()
    (run).rename(tmp_path / "moved" / "run")  # a moved run reads its own files where they now are
    back = read_table(tmp_path / "moved" / "run" / "teacher" / "air" / "t.parquet")
    assert back[0]["path"] == str(tmp_path / "moved" / "run" / "teacher" / "synthetic" / "a.png")
    assert back[1]["path"] == str(data / "x.jpg")
