"""The Ray executor: the same stages on a local Ray (2 CPUs) write what the local executor writes."""
from __future__ import annotations

import numpy as np
import pytest

from distillery.rundir import RunPaths, read_table


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_run_equals_local_run(make_job, tmp_path, ray_local):
    from distillery.teacher import run_teacher

    over = {"teacher.synth.images_per_class": 3, "teacher.synth.batch_size": 2, "teacher.clip.batch_size": 6,
            "teacher.air.enabled": False, "teacher.latte.enabled": False}
    local = make_job({**over, "run_dir": str(tmp_path / "local")})
    remote = make_job({**over, "run_dir": str(tmp_path / "ray"), "executor": "ray", "ray.workers": 2})
    from distillery.executor import RayExecutor, get_executor

    assert isinstance(get_executor(remote), RayExecutor) and get_executor(remote).pool_size(ray_local) == 2
    run_teacher(local, progress=False)
    run_teacher(remote, progress=False)
    a, b = (RunPaths(j.run_path) for j in (local, remote))
    sa, sb = read_table(a.synthetic), read_table(b.synthetic)
    assert [(r["relpath"], r["seed"], r["sha256"]) for r in sa] == [(r["relpath"], r["seed"], r["sha256"]) for r in sb]
    pa, pb = read_table(a.pseudo_labels), read_table(b.pseudo_labels)
    assert [r["sha256"] for r in pa] == [r["sha256"] for r in pb]
    for col in ("p_clip", "p_vermouth", "soft_target"):
        x, y = np.asarray([r[col] for r in pa]), np.asarray([r[col] for r in pb])
        assert np.abs(x - y).max() < 1e-5, (col, np.abs(x - y).max())


def test_ray_settings_are_checked(make_job):
    from distillery.job import JobError

    with pytest.raises(JobError, match="ray: workers must be >= 1"):
        make_job({"executor": "ray", "ray.workers": 0})
