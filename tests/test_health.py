"""Label-free health checks (distillery/health.py): each warning sign from a run folder written here by hand, the
CLI's lines at the end of a stage, and the report's first screen."""
from __future__ import annotations

import json

import numpy as np
import pytest

from distillery.health import check_run, format_findings, tiny_roles
from distillery.rundir import RunPaths, mark_done, write_json, write_table


def _codes(findings):
    return {f["code"] for f in findings}


def _job(make_job, **over):
    return make_job({"teacher.synth.enabled": False, "teacher.air.enabled": False, "teacher.vermouth.enabled": False,
                     **over})


def _pseudo(paths, cols: dict, labels):
    n = len(labels)
    rows = {"path": [f"/x/{i}.jpg" for i in range(n)], "sha256": [str(i) for i in range(n)], "label": list(labels),
            "soft_target": [[1.0, 0.0, 0.0]] * n}
    rows.update({f"p_{k}": [list(map(float, r)) for r in v] for k, v in cols.items()})
    write_table(paths.pseudo_labels, rows)


def test_tiny_models_are_named(make_job):
    from distillery.teacher import model_roles

    full = make_job({})
    assert set(tiny_roles(full)) == set(model_roles(full)) >= {"diffusion", "clip"}
    job = _job(make_job)  # synthesis off: the diffusion model is never loaded, so it is not named
    assert "diffusion" not in tiny_roles(job) and "clip" in tiny_roles(job)
    assert set(tiny_roles(job)) == set(model_roles(job))
    f = check_run(job)
    assert "tiny_models" in _codes(f) and "noise" in format_findings(f)


def test_collapsed_column_ensemble_and_class_shares(make_job):
    job = _job(make_job)
    paths = RunPaths(job.run_path)
    eye = np.eye(3)
    good = eye[[0, 1, 2] * 20]
    flat = eye[[1] * 60]
    _pseudo(paths, {"clip": good, "vermouth": flat}, [1] * 52 + [0] * 4 + [2] * 4)
    codes = _codes(check_run(job, ("teacher",)))
    assert {"column_collapsed", "ensemble_collapsed", "class_share"} <= codes
    msgs = format_findings(check_run(job, ("teacher",)))
    assert "'vermouth' puts 60 of 60" in msgs and "class 'annual crop land' receives 4 of 60" in msgs
    _pseudo(paths, {"clip": good}, [0, 1, 2] * 20)  # balanced, nothing collapsed
    assert not ({"column_collapsed", "ensemble_collapsed", "class_share"} & _codes(check_run(job, ("teacher",))))


def test_rising_losses_dropped_teacher_and_prior_fallback(make_job):
    job = _job(make_job)
    paths = RunPaths(job.run_path)
    write_json(paths.lora_loss, {"loss_first_10pct": 0.1, "loss_last_10pct": 0.2})
    _pseudo(paths, {"clip": np.eye(3)[[0, 1, 2] * 4], "flat": np.eye(3)[[0] * 12]}, [0, 1, 2] * 4)
    mark_done(paths.teacher, "ensemble", "k", {"weights": {"clip": 1.0, "flat": 0.0},
                                               "weights_details": {"dropped": {"flat": "collapsed"}}})
    write_json(paths.prior, {"requested": "estimated", "mode": "none", "prior": None, "why": "no synthetic set"})
    paths.student.mkdir(parents=True, exist_ok=True)
    write_json(paths.student_metrics, {"epochs": 2, "history": [{"loss": 1.0}, {"loss": 1.5}],
                                       "eval": {"confusion": [[5, 0, 0], [5, 0, 0], [4, 0, 1]]}})
    codes = _codes(check_run(job))
    assert {"lora_loss_rose", "teacher_dropped", "prior_fallback", "student_loss_rose", "student_collapsed"} <= codes


def test_export_findings(make_job):
    job = _job(make_job)
    paths = RunPaths(job.run_path)
    write_json(paths.export_report, {"parity_images": ["a", "b", "c"], "calibration_overlaps_parity": 2,
                                     "int8_quantization": {"qat": {"used": False, "why": "no unlabeled domain images "
                                                                                         "left after the parity images"}},
                                     "formats": {"int8": {"built": True, "passed": False, "required": False,
                                                          "agreement": 0.9, "min_agreement": 0.98}}})
    f = check_run(job, ("export",))
    assert {"parity_on_calibration", "qat_skipped", "gate_failed"} <= _codes(f)
    assert "QAT" not in format_findings(f) or "no unlabeled domain images left" in format_findings(f)


def test_cli_prints_the_findings_and_the_report_shows_them_first(make_job, capsys):
    from distillery.cli import main
    from distillery.report import build_report

    job = _job(make_job)
    job_file = RunPaths(job.run_path).root.parent / "job.yaml"
    job_file.write_text(json.dumps(job.to_dict()))
    assert main(["teacher", "--job", str(job_file), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "thing(s) to check before trusting this run" in err and "tiny random" in err
    html = build_report(job).read_text()
    summary = html[html.index('id="summary"'):]
    assert summary.index("tiny random") < summary.index('id="teachers"' if 'id="teachers"' in summary else "</main>")
