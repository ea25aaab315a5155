"""Shared fixtures: tiny models built once per session, the committed EuroSAT sample, job factories."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying for minutes
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "eurosat-sample"
EUROSAT_CLASSES = [
    ("annual crop land", "AnnualCrop"), ("forest", "Forest"), ("herbaceous vegetation land", "HerbaceousVegetation"),
    ("highway or road", "Highway"), ("industrial buildings", "Industrial"), ("pasture land", "Pasture"),
    ("permanent crop land", "PermanentCrop"), ("residential buildings", "Residential"), ("river", "River"),
    ("sea or lake", "SeaLake"),
]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tiny models gain nothing from a second thread, and on a busy 2-core machine spinning OpenMP
    threads make them up to 10x slower; restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from distillery.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture()
def small_unlabeled(tmp_path) -> Path:
    """20 real EuroSAT images from the committed sample, in a folder of their own."""
    d = tmp_path / "unlabeled"
    d.mkdir()
    for p in sorted((SAMPLE / "unlabeled").glob("*.jpg"))[:20]:
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture()
def make_job(tmp_path, tiny_models, small_unlabeled):
    """Factory: a tiny job dict -> Job, with overrides as nested dict updates."""
    from distillery.job import job_from_dict

    def _make(overrides: dict | None = None, classes=None):
        raw = {
            "name": "t",
            "seed": 0,
            "domain": "satellite photo",
            "classes": classes or [{"name": n, "folder": f} for n, f in EUROSAT_CLASSES[:3]],
            "data": {"unlabeled": str(small_unlabeled)},
            "run_dir": str(tmp_path / "run"),
            "models": {k: str(v) for k, v in tiny_models.items()},
            "teacher": {"synth": {"images_per_class": 2, "steps": 3, "resolution": 64, "output_size": 32,
                                  "batch_size": 4},
                        "lora": {"steps": 2, "batch_size": 2},
                        "vermouth": {"resolution": 64, "head_width": 16, "epochs": 1, "batch_size": 8}},
            "student": {"model": "mobilenetv3_small_050", "input_size": 32, "epochs": 1, "batch_size": 8},
        }
        for k, v in (overrides or {}).items():
            node = raw
            parts = k.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = v
        return job_from_dict(raw, base=tmp_path)

    return _make
