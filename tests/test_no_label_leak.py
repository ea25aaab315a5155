"""Evaluation labels never reach a teacher or student: the labeled EuroSAT folders are never opened by the
stages, and permuting the evaluation folder's labels changes no training artefact."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from distillery.rundir import RunPaths, read_json, read_table
from tests.conftest import SAMPLE

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "eurosat"


def test_permuted_eval_labels_change_no_training_artefact(make_job, tmp_path):
    """Swap two class folders of data.eval: pseudo-labels, manifest and student weights stay bit-identical;
    only the evaluation figures move."""
    from distillery.student import train_student
    from distillery.teacher import run_teacher

    def eval_copy(name: str, swap: bool) -> Path:
        root = tmp_path / name
        for src, dst in (("AnnualCrop", "Forest" if swap else "AnnualCrop"),
                         ("Forest", "AnnualCrop" if swap else "Forest"), ("HerbaceousVegetation",) * 2):
            shutil.copytree(SAMPLE / "eval" / src, root / dst)
        return root

    outs = []
    for i, swap in enumerate((False, True)):
        job = make_job({"data.eval": str(eval_copy(f"eval{i}", swap)), "run_dir": str(tmp_path / f"run{i}"),
                        "teacher.synth.images_per_class": 1})
        run_teacher(job, progress=False)
        train_student(job, progress=False)
        paths = RunPaths(job.run_path)
        outs.append({"pl": read_table(paths.pseudo_labels), "man": read_table(paths.manifest),
                     "w": paths.student_weights.read_bytes(), "eval": read_json(paths.teacher_eval)})
    a, b = outs
    strip = lambda rows: [{k: v for k, v in r.items() if k != "path"} for r in rows]  # noqa: E731 (run folders differ)
    assert strip(a["pl"]) == strip(b["pl"])
    assert [(r["sha256"], r["label"], r["soft_target"]) for r in a["man"]] == \
        [(r["sha256"], r["label"], r["soft_target"]) for r in b["man"]]
    assert a["w"] == b["w"]
    per_a, per_b = a["eval"]["columns"]["clip"]["per_class"], b["eval"]["columns"]["clip"]["per_class"]
    assert set(per_a) == set(per_b) == {"annual crop land", "forest", "herbaceous vegetation land"}


def test_stages_never_open_the_labeled_eurosat_folders(make_job, tmp_path):
    """An audit hook records every file opened while the teacher and student stages run (no data.eval)."""
    from distillery.student import train_student
    from distillery.teacher import run_teacher

    opened: list[str] = []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed; the list is only read here
    job = make_job({"teacher.synth.images_per_class": 1})
    start = len(opened)
    run_teacher(job, progress=False)
    train_student(job, progress=False)
    seen = opened[start:]
    opened.clear()
    assert any(job.data.unlabeled in p for p in seen)  # the hook does see the stages' reads
    for forbidden in (SHARED / "labeled_pool", SHARED / "test", SAMPLE / "eval"):
        hits = [p for p in seen if str(forbidden) in str(Path(p).resolve())]
        assert not hits, f"a stage opened {hits[:3]} under {forbidden}"
