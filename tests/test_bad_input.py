"""Bad input, one real file per case: each ends in a clear message (exit code 2, no traceback) or a counted skip
listed in the teacher report and ``teacher/images.parquet``; no input file is ever modified or deleted."""
from __future__ import annotations

import hashlib
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from distillery.cli import main
from distillery.images import unlabeled_set
from distillery.rundir import RunPaths, read_table
from tests.conftest import SAMPLE

GOOD = sorted((SAMPLE / "unlabeled").glob("*.jpg"))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 30000) -> None:
    """A 70-byte PNG whose header claims side x side RGB pixels: Image.MAX_IMAGE_PIXELS must stop it at open."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))


def make_bad_folder(d: Path) -> dict[str, bool]:
    """Every bad image case in one folder; name -> kept (True) or skipped (False)."""
    d.mkdir()
    rgb = Image.open(GOOD[0]).convert("RGB")
    for i, p in enumerate(GOOD[:6]):
        shutil.copy(p, d / f"good{i}.jpg")
    good = GOOD[7].read_bytes()
    (d / "corrupt.jpg").write_bytes(good[:200] + bytes(range(256)) * 4)  # header, then garbage, no end marker
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    rgb.convert("RGBA").save(d / "alpha.png")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(d / "g16.png")
    rgb.convert("L").save(d / "gray.jpg")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    bomb_png(d / "bomb.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(d / "one.png")
    (d / "loop_a.jpg").symlink_to(d / "loop_b.jpg")
    (d / "loop_b.jpg").symlink_to(d / "loop_a.jpg")
    (d / "dangling.png").symlink_to(d / "nowhere.png")
    shutil.copy(GOOD[8], d / "UPPER.JPG")
    rgb.save(d / "upper2.PNG")
    (d / "notes.txt").write_text("not listed: not an image extension")
    kept = {f"good{i}.jpg" for i in range(6)} | {"alpha.png", "g16.png", "gray.jpg", "cmyk.jpg", "one.png",
                                                 "UPPER.JPG", "upper2.PNG"}
    skipped = {"corrupt.jpg", "truncated.jpg", "zero.jpg", "text.jpg", "bomb.png", "loop_a.jpg", "loop_b.jpg",
               "dangling.png"}
    return {**{k: True for k in kept}, **{k: False for k in skipped}}


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file under the roots (links recorded by their target text, never followed)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_symlink():
                out[str(p)] = "link:" + str(p.readlink())
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_job(tmp_path: Path, tiny_models, unlabeled: Path, classes=None, name="bad", **extra) -> Path:
    raw = {
        "name": name,
        "domain": "satellite photo",
        "classes": classes or ["forest", "river", "sea or lake"],
        "data": {"unlabeled": str(unlabeled)},
        "run_dir": str(tmp_path / "run"),
        "models": {k: str(v) for k, v in tiny_models.items()},
        "teacher": {"synth": {"images_per_class": 1, "steps": 2, "resolution": 64, "output_size": 32, "batch_size": 4},
                    "lora": {"steps": 2, "batch_size": 2}, "latte": {"enabled": False},
                    "vermouth": {"resolution": 64, "head_width": 16, "epochs": 1, "batch_size": 8}},
        "student": {"model": "mobilenetv3_small_050", "input_size": 32, "epochs": 1, "batch_size": 8},
    }
    for k, v in extra.items():
        node = raw
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return p


def clear_error(capfd, argv: list[str], *needles: str) -> str:
    capfd.readouterr()
    rc = main(argv)
    err = capfd.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") <= 6, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_bad_images_are_kept_or_counted_and_listed_in_a_full_teacher_run(tmp_path, tiny_models, capfd):
    """One teacher run (unicode and shell characters in the class names) over every bad image case."""
    folder = tmp_path / "unlabeled"
    expect = make_bad_folder(folder)
    classes = ["café ünïcode 森林", "river; rm -rf ~ $(touch pwned) `id` 'q' \"d\" | & > *", "sea/lake"]
    job = write_job(tmp_path, tiny_models, folder, classes=classes)
    before = hashes(folder, job)
    assert main(["teacher", "--job", str(job), "--no-progress"]) == 0, capfd.readouterr().err
    assert hashes(folder, job) == before
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    paths = RunPaths(tmp_path / "run")
    index = {Path(r["path"]).name: r for r in read_table(paths.images_index)}
    for name, kept in expect.items():
        assert name in index, name
        assert (index[name]["skipped"] is None) == kept, (name, index[name])
    report = paths.teacher_report.read_text(encoding="utf-8")
    n_skipped = sum(not k for k in expect.values())
    assert f"{n_skipped} skipped" in report
    for name, kept in expect.items():
        if not kept:
            assert name in report, name
    pl = read_table(paths.pseudo_labels)
    assert sorted(Path(r["path"]).name for r in pl) == sorted(k for k, v in expect.items() if v)
    syn = read_table(paths.synthetic)
    assert sorted({r["class_name"] for r in syn}) == sorted(classes)
    assert all(Path(r["path"]).resolve().is_relative_to(paths.root.resolve()) for r in syn)


def test_decompression_bomb_is_stopped_by_pillows_limit(tmp_path):
    from distillery.images import check_image

    assert Image.MAX_IMAGE_PIXELS and 30000 * 30000 > 2 * Image.MAX_IMAGE_PIXELS
    bomb_png(tmp_path / "bomb.png")
    why = check_image(tmp_path / "bomb.png")
    assert why and "decompression bomb" in why.lower(), why


def test_unlabeled_set_alone_counts_every_case(make_job, tmp_path):
    folder = tmp_path / "bad"
    expect = make_bad_folder(folder)
    before = hashes(folder)
    images = unlabeled_set(make_job({"data.unlabeled": str(folder)}))
    assert sorted(p.name for p in images.paths) == sorted(k for k, v in expect.items() if v)
    assert sorted(Path(p).name for p, _ in images.skipped) == sorted(k for k, v in expect.items() if not v)
    assert hashes(folder) == before


def test_empty_folder_is_a_clear_error(tmp_path, tiny_models, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    job = write_job(tmp_path, tiny_models, empty)
    clear_error(capfd, ["teacher", "--job", str(job), "--no-progress"], "data.unlabeled: no readable images")


@pytest.mark.parametrize("classes,needle", [
    (["forest", "river", "forest"], "appears twice"),
    (["forest"], "need at least 2 classes"),
    ([], "classes: expected a non-empty list"),
])
def test_bad_class_lists_are_clear_errors(tmp_path, tiny_models, small_unlabeled, capfd, classes, needle):
    job = write_job(tmp_path, tiny_models, small_unlabeled)
    raw = yaml.safe_load(job.read_text())
    raw["classes"] = classes
    job.write_text(yaml.safe_dump(raw))
    clear_error(capfd, ["teacher", "--job", str(job)], needle)
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_the_job_file(tmp_path, tiny_models, small_unlabeled, capfd):
    job = write_job(tmp_path, tiny_models, small_unlabeled, **{"student.epoch": 3})
    clear_error(capfd, ["student", "--job", str(job)], "student.epoch: unknown key", "Did you mean 'epochs'")


def test_model_that_does_not_exist(tmp_path, tiny_models, small_unlabeled, capfd):
    # a local folder that is not there: reported before any work (no LoRA, no synthesis), in a short message
    job = write_job(tmp_path, tiny_models, small_unlabeled, **{"models.clip": str(tmp_path / "no-such-clip")})
    err = clear_error(capfd, ["teacher", "--job", str(job), "--no-progress"], "models.clip", "no-such-clip",
                      "does not exist")
    assert len(err) < 600 and not (tmp_path / "run" / "teacher" / "lora").exists()
    # a hub id that is in no cache (offline): the loader's error, naming the role
    job = write_job(tmp_path, tiny_models, small_unlabeled, **{
        "models.clip": "no-such-arch/no-such-tag", "teacher.synth.enabled": False, "teacher.air.enabled": False,
        "teacher.vermouth.enabled": False})
    err = clear_error(capfd, ["teacher", "--job", str(job), "--no-progress"], "models.clip", "no-such-arch")
    assert len(err) < 1500, len(err)


def test_student_model_and_model_args_that_timm_does_not_take(tmp_path, tiny_models, small_unlabeled, capfd):
    """student.model=not_a_timm_model fails in job validation; student.model_args={a: 1} in the student's setup,
    before the decode cache or any training step."""
    from distillery.rundir import write_table
    from tests.test_student import SCHEMA, _rows

    job = write_job(tmp_path, tiny_models, small_unlabeled, **{"student.model": "not_a_timm_model"})
    clear_error(capfd, ["student", "--job", str(job)], "student.model: timm has no model 'not_a_timm_model'")
    job = write_job(tmp_path, tiny_models, small_unlabeled, classes=["red", "green", "blue"],
                    **{"student.model_args": {"a": 1}})
    write_table(RunPaths(tmp_path / "run").manifest, _rows(small_unlabeled), schema=SCHEMA)
    clear_error(capfd, ["student", "--job", str(job), "--no-progress"], "student.model_args",
                "unexpected keyword argument 'a'")
    assert not (tmp_path / "run" / "cache").exists() and not (tmp_path / "run" / "student" / "checkpoint.pt").exists()


def test_eval_folder_with_a_class_not_in_the_job(make_job, tmp_path):
    from distillery.images import eval_set
    from distillery.student.data import list_eval_images

    ev = tmp_path / "eval"
    for folder in ("Forest", "River", "Volcano"):
        (ev / folder).mkdir(parents=True)
        shutil.copy(GOOD[0], ev / folder / "a.jpg")
    job = make_job({"data.eval": str(ev)}, classes=[{"name": "forest", "folder": "Forest"},
                                                     {"name": "river", "folder": "River"}])
    s = eval_set(job)  # teachers: counted and left out
    assert len(s) == 2 and [Path(p).name for p, why in s.skipped if "not a class" in why] == ["Volcano"]
    with pytest.raises(ValueError, match=r"data.eval: sub-folder\(s\) \['Volcano'\]"):  # student: refused
        list_eval_images(ev, ["Forest", "River"], job.data.extensions)


def test_manifest_or_pseudo_label_row_pointing_outside_the_run_and_data_folders(tmp_path, tiny_models,
                                                                                small_unlabeled, capfd):
    """A row edited to point at a file elsewhere (a real, readable image) is refused naming the row, not trained
    on; a link inside data.unlabeled to an image elsewhere stays allowed."""
    from distillery.images import check_table_paths
    from distillery.job import load_job
    from distillery.rundir import write_table
    from tests.test_student import SCHEMA, _rows

    job_file = write_job(tmp_path, tiny_models, small_unlabeled, classes=["red", "green", "blue"])
    rows = _rows(small_unlabeled)
    outside = tmp_path / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    shutil.copy(rows[5]["path"], outside)
    shutil.copy(rows[6]["path"], tmp_path / "elsewhere" / "linked.png")
    (small_unlabeled / "link.png").symlink_to(tmp_path / "elsewhere" / "linked.png")
    job = load_job(job_file)
    for ok in (small_unlabeled / "link.png", (small_unlabeled / "link.png").resolve()):  # via data.unlabeled
        check_table_paths(job, [{"path": str(ok)}], "t")
    sneaky = str(small_unlabeled / ".." / "elsewhere" / "secret.png")  # starts inside, ends outside
    for bad in (str(outside), sneaky):
        rows[5]["path"] = bad
        write_table(RunPaths(tmp_path / "run").manifest, rows, schema=SCHEMA)
        before = hashes(outside.parent, small_unlabeled)
        clear_error(capfd, ["student", "--job", str(job_file), "--no-progress"], "manifest.parquet' row 5",
                    bad, "outside the run folder")
        assert hashes(outside.parent, small_unlabeled) == before
        assert not (tmp_path / "run" / "student" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="pseudo_labels.parquet' row 0"):
        check_table_paths(job, [{"path": str(outside)}], RunPaths(job.run_path).pseudo_labels)
