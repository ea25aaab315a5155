"""Crash safety: real ``distillery`` processes SIGKILLed at chosen points of progress, then rerun.

Kill points come from ``distillery/killpoints.py`` (``DISTILLERY_KILL_AT=name:k``): the process kills itself
with SIGKILL right after the k-th step / image / shard / write, or between a temporary file's write and its
rename (``write.<file>``). No wall-clock sleeps.

One uninterrupted reference run (teacher, student, export) is shared by the module. The crash run uses the same
job and the same run folder path (the reference folder is moved aside first, so the absolute paths in the
tables are the same): for each stage it is killed at every point of that stage's chain in turn -- each rerun
resumes from what the previous kill left and dies at the next point -- then run once more without a kill point.
Every kill is asserted to have happened (exit by SIGKILL, the kill point's own line on stderr); then the crash
run's folder must hold the reference's files: the same file set, tables and images byte for byte, weights within
float noise, no temporary or partial files, no duplicate rows.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import EUROSAT_CLASSES, SAMPLE

DISTILLERY = [sys.executable, "-m", "distillery.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONHASHSEED": "random"}
ENV.pop("DISTILLERY_KILL_AT", None)

# Each stage's kill points, in the order the stage reaches them (every rerun resumes and dies at the next one).
CHAINS = {
    "teacher": [
        "lora.step:1",                     # before the first LoRA checkpoint: starts over
        "lora.step:3",                     # checkpoint at step 2: resumes there, redoes step 3
        "write.checkpoint.safetensors:1",  # the step-4 checkpoint's temporary file, never renamed
        "lora.saved",                      # adapter written, not stamped: resumes from the step-4 checkpoint
        "synth.image:3",                   # 3 synthetic images committed
        "write.00001.png:1",               # an image's temporary file, never renamed
        "write.synthetic.parquet:1",       # every image done, the table's temporary file
        "synth.table",                     # table written, progress log and stamp not yet
        "features.shard:2",                # CLIP features: one image set's shard committed, the next not
        "teacher.clip.written",            # every CLIP output written, not stamped
        "air.epoch:1",                     # AiR prompt learning mid-way
        "teacher.air.column:2",            # two of AiR's three columns written
        "latte.descriptions:1",            # captions cached, fine-tuning not started
        "latte.epoch:1",                   # LaTTe epoch-1 checkpoint: resumes from it
        "write.latte.pt:1",                # the epoch-2 checkpoint's temporary file
        "vermouth.epoch:1",                # features cached, head half trained
        "write.head.safetensors:1",        # the head's temporary file
        "ensemble.pseudo_labels",          # pseudo-labels written, manifest not yet
        "write.manifest.parquet:1",        # the manifest's temporary file
    ],
    "student": [
        "student.cache",                   # decode cache filled, no training yet
        "student.step:3",                  # checkpoint at step 2: resumes mid-epoch
        "write.checkpoint.pt:1",           # the epoch-end checkpoint's temporary file
        "student.epoch:1",                 # epoch 1 checkpointed
        "student.weights",                 # weights written, metrics and stamp not yet
    ],
    "export": [
        "export.fp32",                     # model.onnx written
        "write.model.int8.onnx:1",         # the INT8 model's temporary file
        "export.report",                   # report written, not stamped
    ],
}
POINTS = [(stage, p) for stage, chain in CHAINS.items() for p in chain]

# Files whose bytes legitimately differ between two runs, and what is compared instead.
# Keys that legitimately differ: timings, where a run resumed, and how much work this process did itself rather
# than found done (a stamp's "generated" / "features_computed" counts).
TIMING_KEYS = re.compile(r"(seconds|_s$|per_s|time|latency|latencies|timing|resumed|computed$|^generated$)", re.I)
NOT_BYTES = {
    "teacher/lora/loss.json": "train/total seconds (the JSON is compared without timing keys)",
    "student/metrics.json": "wall time, images/s, where it resumed (compared without those keys)",
    "export/report.json": "latencies; the deploy choice is made by timing (compared without timings and deploy)",
    "student/report.md": "training time and images/s (not compared)",
    "teacher/report.md": "seconds per teacher (not compared)",
    "student/checkpoint.pt": "train time (tensors compared within float noise, other values without timings)",
    "teacher/latte/latte.pt": "seconds per epoch (tensors compared within float noise, other values without timings)",
    "teacher/features/*/shard-*.npz": "file names carry the writing pid and how rows fell into shards; compared "
                                      "as one table per store: the same image hashes, each once, the same features",
    "cache/*/pixels.u8": "a killed append leaves unreferenced bytes at the end; compared per indexed image",
    "cache/*/index.json": "slot numbers shift after such a tail; compared as the set of image hashes",
}


def _write_job(root: Path) -> Path:
    unl, ev = root / "unlabeled", root / "eval"
    unl.mkdir(parents=True)
    for p in sorted((SAMPLE / "unlabeled").glob("*.jpg"))[:20]:
        shutil.copy(p, unl / p.name)
    for _, folder in EUROSAT_CLASSES[:3]:
        (ev / folder).mkdir(parents=True)
        for p in sorted((SAMPLE / "eval" / folder).glob("*.jpg"))[:2]:
            shutil.copy(p, ev / folder / p.name)
    return root


def _job(root: Path, tiny_models) -> Path:
    raw = {"name": "crash", "seed": 0, "domain": "satellite photo",
           "classes": [{"name": n, "folder": f} for n, f in EUROSAT_CLASSES[:3]],
           "data": {"unlabeled": str(root / "unlabeled"), "eval": str(root / "eval")}, "run_dir": str(root / "run"),
           "models": {k: str(v) for k, v in tiny_models.items()},
           "teacher": {"lora": {"steps": 6, "batch_size": 2, "checkpoint_steps": 2},
                       "synth": {"tricks": ["base", "random_guidance"], "images_per_class": 2, "steps": 2,
                                 "resolution": 64, "output_size": 32, "batch_size": 2},
                       "clip": {"batch_size": 8}, "air": {"k": 2, "epochs": 2},
                       "latte": {"enabled": True, "epochs": 2, "batch_size": 8, "max_new_tokens": 4,
                                 "use_group_descriptions": False},
                       "vermouth": {"resolution": 64, "head_width": 16, "epochs": 2, "batch_size": 8}},
           "student": {"model": "mobilenetv3_small_050", "input_size": 32, "epochs": 2, "batch_size": 8,
                       "checkpoint_steps": 2},
           "export": {"formats": ["fp32", "fp16", "int8"], "required": ["fp32"], "parity_images": 8,
                      "int8_qat_epochs": 1, "int8_qat_images": 8, "deploy_timing_s": 0.05}}
    p = root / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _run(stage: str, job: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV, DISTILLERY_KILL_AT=_point(kill)) if kill else ENV
    return subprocess.run(DISTILLERY + [stage, "--job", str(job), "--no-progress", "--no-report"], env=env,
                          capture_output=True, text=True, timeout=600)


def _point(p: str) -> str:
    return p if ":" in p else p + ":1"


def _broken_final_files(run: Path) -> list[str]:
    """Files under their final name that do not read back whole (a torn write would show here)."""
    import pyarrow.parquet as pq
    from PIL import Image
    from safetensors import safe_open

    bad = []
    for f in run.rglob("*"):
        if not f.is_file() or f.name.startswith("."):
            continue
        try:
            if f.suffix == ".parquet":
                pq.read_table(f)
            elif f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as s:
                    [s.get_tensor(k) for k in s.keys()]
            elif f.suffix == ".png":
                with Image.open(f) as im:
                    im.load()
            elif f.suffix == ".npz":
                with np.load(f) as z:
                    [z[k] for k in z.files]
        except Exception as e:  # noqa: BLE001
            bad.append(f"{f.relative_to(run)}: {type(e).__name__}: {e}")
    return bad


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """(reference run folder, crash run folder, per kill point: returncode, whether its line was printed,
    broken final files after the kill)."""
    root = _write_job(tmp_path_factory.mktemp("crash"))
    job = _job(root, tiny_models)
    for stage in CHAINS:
        r = _run(stage, job)
        assert r.returncode == 0, f"reference {stage} failed:\n{r.stderr[-3000:]}"
    ref = root / "reference"
    (root / "run").rename(ref)
    records = {}
    for stage, chain in CHAINS.items():
        for point in chain:
            r = _run(stage, job, point)
            records[(stage, point)] = {"rc": r.returncode, "fired": f"kill point {_point(point)}: SIGKILL" in r.stderr,
                                       "broken": _broken_final_files(root / "run"), "stderr": r.stderr[-3000:]}
        r = _run(stage, job)
        assert r.returncode == 0, f"final {stage} rerun failed:\n{r.stderr[-3000:]}"
    return ref, root / "run", records


@pytest.mark.parametrize("stage,point", POINTS, ids=[p for _, p in POINTS])
def test_kill_point_fired_and_left_no_torn_file(runs, stage, point):
    rec = runs[2][(stage, point)]
    assert rec["rc"] == -9 and rec["fired"], (f"`distillery {stage}` with DISTILLERY_KILL_AT={point}: exit "
                                              f"{rec['rc']}, kill line printed: {rec['fired']}\n{rec['stderr']}")
    assert not rec["broken"], f"after the kill at {point}, files under their final name are torn: {rec['broken']}"


def _files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}


def _strip(obj, drop=()):
    if isinstance(obj, dict):
        return {k: _strip(v, drop) for k, v in obj.items() if not TIMING_KEYS.search(str(k)) and k not in drop}
    if isinstance(obj, (list, tuple)):
        return [_strip(v, drop) for v in obj]
    return obj


def _close(a, b, where: str, errors: list, atol: float = 1e-6) -> None:
    """Recursive comparison: tensors/arrays within ``atol`` (max difference in the message), the rest equal
    after dropping timing keys."""
    import torch

    if isinstance(a, (torch.Tensor, np.ndarray)):
        a, b = (x.detach().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a, b))
        if a.dtype.kind not in "fiub" or b.dtype.kind not in "fiub":
            if not np.array_equal(a, b):
                errors.append(f"{where}: values differ")
            return
        a, b = a.astype(np.float64), b.astype(np.float64)
        if a.shape != b.shape:
            errors.append(f"{where}: shape {a.shape} vs {b.shape}")
        elif a.size and np.abs(a - b).max() > atol:
            errors.append(f"{where}: max |diff| {np.abs(a - b).max():.3g}, mean {np.abs(a - b).mean():.3g}")
    elif isinstance(a, dict) and isinstance(b, dict):
        ka = {k for k in a if not TIMING_KEYS.search(str(k))}
        kb = {k for k in b if not TIMING_KEYS.search(str(k))}
        if ka != kb:
            errors.append(f"{where}: keys {sorted(map(str, ka ^ kb))} differ")
        for k in ka & kb:
            _close(a[k], b[k], f"{where}.{k}", errors, atol)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            errors.append(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]", errors, atol)
    elif _strip(a) != _strip(b):
        errors.append(f"{where}: {str(a)[:80]} vs {str(b)[:80]}")


def _safetensors(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {"meta": f.metadata() or {}, **{k: f.get_tensor(k) for k in f.keys()}}


def _onnx(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {"nodes": [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node],
            "meta": {p.key: p.value for p in m.metadata_props},
            **{f"init.{t.name}": numpy_helper.to_array(t) for t in m.graph.initializer}}


def _feature_rows(folder: Path) -> tuple[dict, list[str]]:
    rows, dups = {}, []
    for f in sorted(folder.glob("shard-*.npz")):
        with np.load(f) as z:
            for s, v in zip(z["sha256"].tolist(), z["features"]):
                if s in rows:
                    dups.append(s)
                rows[s] = v
    return rows, dups


def test_rerun_after_every_kill_matches_the_uninterrupted_run(runs):
    import hashlib

    import pyarrow.parquet as pq
    import torch

    ref, got, _ = runs
    rf, gf = _files(ref), _files(got)
    pattern = re.compile(r"(^|/)\.[^/]+\.[A-Za-z0-9_]{8}\.tmp(\.[^./]+)?$")
    leftovers = sorted(f for f in gf if pattern.search(f) or "/.save-" in f or f.endswith(".lock"))
    assert not leftovers, f"temporary or lock files left behind: {leftovers}"
    shard = re.compile(r"^teacher/features/[^/]+/shard-\d+-\d+\.npz$")
    assert {f for f in rf if not shard.match(f)} == {f for f in gf if not shard.match(f)}, \
        f"file sets differ: only in the reference {sorted((rf - gf))}, only after the kills {sorted(gf - rf)}"
    errors: list[str] = []
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for f in sorted(rf & gf):
        a, b = ref / f, got / f
        if f.endswith(".md") or f.endswith("pixels.u8"):
            continue  # NOT_BYTES: timings / compared per indexed image below
        if f.endswith((".parquet", ".png", ".jpg")):
            if sha(a) != sha(b):
                errors.append(f"{f}: sha256 differs")
            if f.endswith(".parquet"):
                t = pq.read_table(b).to_pydict()
                for col in ("path", "sha256", "relpath", "key"):
                    if col in t and f.split("/")[-2:-1] != ["eval"] and len(set(t[col])) != len(t[col]) \
                            and not f.endswith("prototypes.parquet"):
                        errors.append(f"{f}: duplicate values in column {col}")
        elif f.endswith(".safetensors"):
            _close(_safetensors(a), _safetensors(b), f, errors)
        elif f.endswith(".onnx"):
            _close(_onnx(a), _onnx(b), f, errors, atol=1e-5)
        elif f.endswith(".pt"):
            _close(torch.load(a, weights_only=True), torch.load(b, weights_only=True), f, errors)
        elif f.endswith("index.json") and f.startswith("cache/"):
            ia, ib = json.loads(a.read_text()), json.loads(b.read_text())
            if set(ia) != set(ib):
                errors.append(f"{f}: other images cached")
            from distillery.student.cache import DecodeCache

            size = int(re.search(r"decode-(\d+)px", f).group(1))
            ca, cb = DecodeCache(ref / "cache", size), DecodeCache(got / "cache", size)
            diff = [k for k in ia if k in ib and not np.array_equal(ca.get(k), cb.get(k))]
            if diff:
                errors.append(f"{f}: {len(diff)} cached images have other pixels")
        elif f.endswith(".json"):
            drop = ("deploy",) if f == "export/report.json" else ()
            if _strip(json.loads(a.read_text()), drop) != _strip(json.loads(b.read_text()), drop):
                errors.append(f"{f}: differs (timing keys dropped)")
        elif sha(a) != sha(b):
            errors.append(f"{f}: bytes differ")
    for store in sorted({Path(f).parent for f in rf if shard.match(f)}):
        ra, _ = _feature_rows(ref / store)
        rb, dups = _feature_rows(got / store)
        if dups:
            errors.append(f"{store}: {len(dups)} image(s) stored twice")
        if set(ra) != set(rb):
            errors.append(f"{store}: other images ({len(set(ra) ^ set(rb))} differ)")
        else:
            _close({k: ra[k] for k in ra}, {k: rb[k] for k in ra}, str(store), errors)
    assert not errors, "after the kills the run differs from the uninterrupted one:\n" + "\n".join(errors)
