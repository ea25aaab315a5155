"""Job files: validation names the key, the value and the fix; overrides; path resolution."""
from __future__ import annotations

import json

import pytest
import yaml

from distillery.job import JobError, apply_overrides, load_job, resolve_model_ref, settings_hash
from tests.conftest import REPO


def write_job(tmp_path, raw):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.fixture()
def raw(tmp_path):
    (tmp_path / "imgs").mkdir()
    return {"name": "j", "classes": ["cat", {"name": "dog", "folder": "Dog"}], "data": {"unlabeled": "imgs"}}


def test_example_jobs_load():
    job = load_job(REPO / "examples" / "eurosat-tiny.yaml")
    assert job.name == "eurosat-tiny" and len(job.classes) == 10
    assert job.classes[0].name == "annual crop land" and job.classes[0].folder == "AnnualCrop"
    assert job.models.clip.endswith("models/tiny/clip")  # relative to the job file, made absolute
    real = load_job(REPO / "examples" / "eurosat.yaml")
    assert real.models.clip == "ViT-B-32/laion2b_s34b_b79k"  # a hub reference stays as it is
    assert real.models.diffusion == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_paths_resolve_against_job_folder(tmp_path, raw):
    job = load_job(write_job(tmp_path, raw))
    assert job.data.unlabeled == str((tmp_path / "imgs").resolve())
    assert job.classes[1].folder == "Dog" and job.class_names == ["cat", "dog"]


def test_overrides_parse_yaml_values(tmp_path, raw):
    job = load_job(write_job(tmp_path, raw), ["student.epochs=3", "teacher.synth.tricks=[base,multi_domain]",
                                              "teacher.ensemble.weights.clip=0.5", "domain=satellite photo"])
    assert job.student.epochs == 3
    assert job.teacher.synth.tricks == ["base", "multi_domain"]
    assert job.teacher.ensemble.weights == {"clip": 0.5}
    assert job.domain == "satellite photo"


@pytest.mark.parametrize("override, words", [
    ("student.epochs=zero", ["student.epochs", "'zero'", "integer"]),
    ("student.epoch=3", ["student.epoch", "unknown key", "epochs"]),
    ("teacher.synth.tricks=[base,sparkle]", ["teacher.synth.tricks", "sparkle", "multi_domain"]),
    ("teacher.synth.resolution=60", ["teacher.synth.resolution", "60", "multiple of 8"]),
    ("export.required=[int8]", ["export.required", "int8", "export.formats"]),
    ("data.unlabeled=nowhere", ["data.unlabeled", "nowhere", "does not exist"]),
    ("teacher.synth.antialias=maybe", ["teacher.synth.antialias", "maybe", "true or false"]),
    ("student.lr=-1", ["student.lr", "-1"]),
    ("export.int8_qat_epochs=-2", ["export.int8_qat_epochs", "-2", "0 turns"]),
    ("nokey", ["nokey", "key=value"]),
])
def test_bad_values_name_key_value_and_fix(tmp_path, raw, override, words):
    with pytest.raises(JobError) as e:
        load_job(write_job(tmp_path, raw), [override])
    for w in words:
        assert w in str(e.value), f"{w!r} not in error: {e.value}"


def test_bad_classes(tmp_path, raw):
    for classes, word in [([], "classes"), (["a"], "at least 2"), (["a", "a"], "twice"), ([1.5, "b"], "classes[0]")]:
        raw["classes"] = classes
        with pytest.raises(JobError, match=word.replace("[", r"\[").replace("]", r"\]")):
            load_job(write_job(tmp_path, raw))


def test_missing_job_file_says_what_to_do(tmp_path):
    with pytest.raises(JobError, match="--job"):
        load_job(tmp_path / "nope.yaml")


def test_model_refs(tmp_path):
    assert resolve_model_ref("org/name", tmp_path) == "org/name"
    assert resolve_model_ref("ViT-B-32/laion2b_s34b_b79k", tmp_path) == "ViT-B-32/laion2b_s34b_b79k"
    assert resolve_model_ref("./m", tmp_path) == str((tmp_path / "m").resolve())
    assert resolve_model_ref("a/b/c", tmp_path) == str((tmp_path / "a/b/c").resolve())
    (tmp_path / "localmodel").mkdir()
    assert resolve_model_ref("localmodel", tmp_path) == str((tmp_path / "localmodel").resolve())


def test_apply_overrides_and_settings_hash():
    raw = apply_overrides({"a": {"b": 1}}, ["a.c=2", "d.e=[1, 2]"])
    assert raw == {"a": {"b": 1, "c": 2}, "d": {"e": [1, 2]}}
    assert settings_hash({"x": 1, "y": 2}) == settings_hash({"y": 2, "x": 1})
    assert settings_hash({"x": 1}) != settings_hash({"x": 2})
    json.dumps(raw)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads 1e-4 as the string '1e-4'; a float setting takes it (and a real string is still refused)."""
    from distillery.job import JobError, load_job

    p = tmp_path / "job.yaml"
    p.write_text("name: x\nclasses: [a, b]\ndata: {unlabeled: .}\nteacher: {lora: {lr: 1e-4}}\n")
    job = load_job(p, ["student.lr=1e-3"])
    assert job.teacher.lora.lr == 1e-4 and job.student.lr == 1e-3
    with pytest.raises(JobError, match="student.lr: expected a number, got 'fast'"):
        load_job(p, ["student.lr=fast"])


def test_relative_run_dir_is_from_the_job_files_folder_and_the_default_from_the_current_one(tmp_path, raw,
                                                                                            monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_job(write_job(tmp_path, {**raw, "run_dir": "out/run1"}))
    assert job.run_dir == str((tmp_path / "out" / "run1").resolve())
    assert job.run_path == (tmp_path / "out" / "run1").resolve()
    job = load_job(write_job(tmp_path, raw))  # no run_dir: runs/<name> under the current folder, as documented
    assert job.run_dir == str((elsewhere / "runs" / "j").resolve())
