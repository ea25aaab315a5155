"""The teacher room's seams: a teacher is one registered module, one image set, one feature store, one executor."""
from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
import pytest

from distillery.executor import LocalExecutor
from distillery.images import unlabeled_set
from distillery.job import JobError
from distillery.rundir import RunPaths, read_json, read_table
from distillery.teacher import TEACHERS, TeacherResult, TeacherSettings, register_teacher, run_teacher, teachers_to_run
from tests.conftest import SAMPLE


@dataclass
class ToyCfg(TeacherSettings):
    enabled: bool = True
    sharpness: float = 2.0  # power applied to clip's column

    def check(self, key):
        if self.sharpness <= 0:
            raise ValueError(f"{key}.sharpness: must be > 0, got {self.sharpness}.")


@pytest.fixture()
def toy_teacher():
    """A teacher registered from this test module only: clip's column sharpened (p^s renormalised)."""
    calls = []

    @register_teacher("toy", settings=ToyCfg, needs=("teacher:clip",), columns=("toy", "toy_flat"))
    def run_toy(ctx):
        """Sharpened CLIP."""
        calls.append(ctx)
        p = ctx.columns["clip"] ** ctx.cfg.sharpness
        p = p / p.sum(1, keepdims=True)
        flat = np.full_like(p, 1.0 / p.shape[1])
        ev = {}
        if ctx.eval_images is not None:
            q = ctx.eval_columns["clip"] ** ctx.cfg.sharpness
            ev = {"toy": q / q.sum(1, keepdims=True), "toy_flat": np.full_like(q, 1.0 / q.shape[1])}
        return TeacherResult(probs={"toy": p, "toy_flat": flat}, eval_probs=ev,
                             tables={"notes": {"sha256": list(ctx.images.sha256)}}, info={"sharpness": ctx.cfg.sharpness})

    yield calls
    TEACHERS.pop("toy")


def test_a_registered_teacher_gets_its_columns_without_touching_other_files(make_job, toy_teacher):
    from tests.conftest import SAMPLE as S

    job = make_job({"teacher.synth.enabled": False, "teacher.air.enabled": False, "teacher.vermouth.enabled": False,
                    "teacher.transduct.enabled": False,
                    "data.eval": str(S / "eval"), "teacher.ensemble.weights": {"clip": 1.0, "toy": 1.0},
                    "teacher.toy.sharpness": 3.0})
    assert teachers_to_run(job) == ["clip", "toy"]
    run_teacher(job, progress=False)
    paths = RunPaths(job.run_path)
    pl = read_table(paths.pseudo_labels)
    clip = np.asarray([r["p_clip"] for r in pl])
    toy = np.asarray([r["p_toy"] for r in pl])
    want = clip ** 3 / (clip ** 3).sum(1, keepdims=True)
    assert np.allclose(toy, want, atol=1e-5)
    assert np.allclose([r["soft_target"] for r in pl], (clip + want) / 2, atol=1e-5)  # toy_flat has no weight
    assert np.allclose([r["p_toy_flat"] for r in pl], 1 / 3)
    assert read_table(paths.teacher_dir("toy") / "notes.parquet")[0]["sha256"] == pl[0]["sha256"]
    assert job.to_dict()["teacher"]["toy"]["sharpness"] == 3.0  # the resolved job names it teacher.toy
    ev = read_json(paths.teacher_eval)
    assert set(ev["columns"]) == {"clip", "toy", "toy_flat", "ensemble"} and ev["images"] == 30  # 3 classes
    # a rerun computes nothing; a changed setting reruns the toy only
    run_teacher(job, progress=False)
    assert len(toy_teacher) == 1
    run_teacher(make_job({"teacher.synth.enabled": False, "teacher.air.enabled": False,
                          "teacher.vermouth.enabled": False, "teacher.transduct.enabled": False, "data.eval": str(S / "eval"),
                          "teacher.ensemble.weights": {"clip": 1.0, "toy": 1.0}, "teacher.toy.sharpness": 2.0}),
                progress=False)
    assert len(toy_teacher) == 2


def test_needs_order_and_run_even_when_the_needed_teacher_is_disabled(make_job, toy_teacher, capfd):
    job = make_job({"teacher.synth.enabled": False, "teacher.air.enabled": False, "teacher.vermouth.enabled": False,
                    "teacher.transduct.enabled": False,
                    "teacher.clip.enabled": False, "teacher.ensemble.weights": {"clip": 0.0, "toy": 1.0}})
    assert teachers_to_run(job) == ["clip", "toy"]  # clip runs first, because toy needs it
    run_teacher(job, progress=False)
    assert "clip: runs because toy needs it" in capfd.readouterr().err
    pl = read_table(RunPaths(job.run_path).pseudo_labels)
    assert np.allclose([r["soft_target"] for r in pl], [r["p_toy"] for r in pl], atol=1e-6)


def test_teacher_settings_and_weights_are_checked_before_any_work(make_job, toy_teacher):
    with pytest.raises(JobError, match=r"teacher.toy.sharpness: must be > 0, got -1.0"):
        make_job({"teacher.toy.sharpness": -1.0})
    with pytest.raises(JobError, match=r"teacher.toy.sharpnes: unknown key"):
        make_job({"teacher.toy.sharpnes": 1.0})
    with pytest.raises(JobError, match=r"teacher.ensemble.weights.toy: weight 1.0, but the 'toy' teacher is disabled"):
        make_job({"teacher.toy.enabled": False, "teacher.ensemble.weights": {"clip": 1.0, "toy": 1.0}})
    with pytest.raises(JobError, match=r"no teacher writes a column 'nope'"):
        make_job({"teacher.ensemble.weights": {"nope": 1.0}})
    with pytest.raises(JobError, match=r"teacher.clip.templates: 'a \{x\}' is not a usable template"):
        make_job({"teacher.clip.templates": ["a {x}"]})


def test_a_teacher_needing_synthetic_images_without_synthesis_fails_before_work(make_job):
    with pytest.raises(JobError, match="teacher.air: needs the synthetic images, but teacher.synth.enabled is false"):
        make_job({"teacher.synth.enabled": False})


def test_register_rejects_bad_names_and_needs():
    with pytest.raises(ValueError, match="not a valid teacher name"):
        register_teacher("no-dash")
    with pytest.raises(ValueError, match="unknown need"):
        register_teacher("x", needs=("model:clip",))


def test_unlabeled_set_skips_counts_and_lists_unreadable_files(make_job, small_unlabeled):
    (small_unlabeled / "zero.jpg").write_bytes(b"")
    (small_unlabeled / "text.JPG").write_text("not an image")
    good = sorted(small_unlabeled.glob("*.jpg"))[0].read_bytes()
    (small_unlabeled / "cut.jpg").write_bytes(good[: len(good) // 2])
    (small_unlabeled / "dangling.png").symlink_to(small_unlabeled / "missing.png")
    job = make_job({"teacher.synth.enabled": False, "teacher.air.enabled": False, "teacher.vermouth.enabled": False})
    images = unlabeled_set(job)
    assert len(images) == 20 and len(images.skipped) == 4
    assert {p.rsplit("/", 1)[1] for p, _ in images.skipped} == {"zero.jpg", "text.JPG", "cut.jpg", "dangling.png"}
    index = read_table(RunPaths(job.run_path).images_index)
    assert sum(r["skipped"] is None for r in index) == 20 and sum(r["skipped"] is not None for r in index) == 4
    run_teacher(job, progress=False)
    report = RunPaths(job.run_path).teacher_report.read_text()
    assert "4 skipped" in report and "zero.jpg" in report
    assert len(read_table(RunPaths(job.run_path).pseudo_labels)) == 20


def test_empty_folder_is_one_clear_error(make_job, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"\x89PNG nope")
    job = make_job({"data.unlabeled": str(empty)})
    with pytest.raises(FileNotFoundError, match=r"data.unlabeled: no readable images .* 1 file\(s\) could not be read"):
        unlabeled_set(job)


def test_feature_store_rows_by_sha_computed_once(make_job, small_unlabeled, tiny_models):
    from distillery.models import load_clip
    from distillery.teacher.features import clip_feature_store, clip_image_encoder

    job = make_job()
    images = unlabeled_set(job)
    _, preprocess, _ = load_clip(job.models.clip)
    store = clip_feature_store(job, preprocess)
    calls = []

    def counting(make):
        def factory():
            fn = make()
            return lambda batch: (calls.append(len(batch)), fn(batch))[1]
        return factory

    enc = counting(clip_image_encoder(job.models.clip, "cpu"))
    assert store.ensure(images.paths, images.sha256, enc, LocalExecutor(), 8, desc="f", progress=False) == 20
    assert sum(calls) == 20
    first = store.get(images.sha256)
    # a fresh store object over the same folder computes nothing; a copied image (same bytes) reuses its row
    store2 = clip_feature_store(job, preprocess)
    shutil.copy(images.paths[0], small_unlabeled / "copy.jpg")
    again = unlabeled_set(job)
    assert store2.ensure(again.paths, again.sha256, enc, LocalExecutor(), 8, desc="f", progress=False) == 0
    assert np.array_equal(store2.get(images.sha256), first)
    # one new image costs one forward pass, and its features equal the model's own output
    from PIL import Image

    Image.open(SAMPLE / "eval" / "Forest" / sorted((SAMPLE / "eval" / "Forest").iterdir())[0].name).save(
        small_unlabeled / "new.png")
    newer = unlabeled_set(job)
    calls.clear()
    assert store2.ensure(newer.paths, newer.sha256, enc, LocalExecutor(), 8, desc="f", progress=False) == 1
    assert calls == [1]
    model, _, _ = load_clip(job.models.clip)
    import torch

    from distillery.images import load_rgb

    i = [p.name for p in newer.paths].index("new.png")
    with torch.no_grad():
        ref = model.encode_image(preprocess(load_rgb(newer.paths[i]))[None]).numpy()[0]
    assert np.allclose(store2.get([newer.sha256[i]])[0], ref, atol=1e-5)
    # another preprocessing is another store
    assert clip_feature_store(job, "other transform").folder != store.folder


def test_local_executor_runs_batches_in_order_and_checks_lengths():
    ex = LocalExecutor()
    out = list(ex.map_batches(lambda: (lambda b: [x * 10 for x in b]), range(7), 3, progress=False))
    assert out == [([0, 1, 2], [0, 10, 20]), ([3, 4, 5], [30, 40, 50]), ([6], [60])]
    with pytest.raises(RuntimeError, match="returned 1 results for 3 items"):
        list(ex.map_batches(lambda: (lambda b: [0]), range(3), 3, progress=False))


def test_eval_top1_recomputed_by_hand(make_job):
    from distillery.images import eval_set
    from distillery.teacher.ensemble import evaluate_columns

    job = make_job({"data.eval": str(SAMPLE / "eval")})
    ev = eval_set(job)
    folders = [p.parent.name for p in ev.paths]
    truth = np.array([{"AnnualCrop": 0, "Forest": 1, "HerbaceousVegetation": 2}.get(f, -1) for f in folders])
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=len(ev))
    out = evaluate_columns(job, ev, {"clip": p})
    known = truth >= 0
    assert known.all() and out["images"] == 30 and out["unmatched_images"] == 0  # only the 3 class folders
    assert len([x for x in ev.skipped if "not a class" in x[1]]) == 7
    assert out["columns"]["clip"]["top1"] == round(float((p.argmax(1)[known] == truth[known]).mean()), 4)


def test_grayscale_rgba_cmyk_and_16bit_images_are_converted_like_the_runtime(make_job, tmp_path):
    """Every such file is kept (not skipped) and CLIP sees the pixels the runtime's decoder gives (a 16-bit PNG
    keeps its high byte instead of turning white)."""
    from PIL import Image

    from distillery.images import load_rgb
    from distillery.runtime.preprocess import load_image

    src = sorted((SAMPLE / "unlabeled").glob("*.jpg"))[0]
    rgb = Image.open(src).convert("RGB")
    folder = tmp_path / "modes"
    folder.mkdir()
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    g16 = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    Image.fromarray(g16).save(folder / "g16.png")  # uint16 -> a 16-bit grayscale PNG
    assert Image.open(folder / "g16.png").mode in ("I;16", "I")
    job = make_job({"data.unlabeled": str(folder)})
    images = unlabeled_set(job)
    assert len(images) == 4 and not images.skipped
    for p in images.paths:
        a = np.asarray(load_rgb(p))
        assert a.shape[2] == 3 and np.array_equal(a, np.asarray(load_image(str(p))))
    g = np.asarray(load_rgb(folder / "g16.png"))
    assert np.array_equal(g[..., 0], np.asarray(rgb.convert("L")))  # the high byte, not clipped to 255
