"""The run folder contract and the small pieces every stage uses to honour it.

```
runs/<job>/teacher/synthetic/…            generated images
runs/<job>/teacher/synthetic.parquet      one row per synthetic image
runs/<job>/teacher/pseudo_labels.parquet  one row per real image, one probability column per teacher
runs/<job>/teacher/manifest.parquet       the training set
runs/<job>/student/model.safetensors, config.json, metrics.json, report.md, confusion.png
runs/<job>/export/model.onnx (+ model.fp16.onnx, model.int8.onnx), report.json
```

Stages talk only through these files. Each stage writes atomically (temporary name, then rename)
and records a *stamp*: the hash of its settings and of the files it read. A stage whose stamp
matches and whose outputs exist is skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def synthetic_dir(self) -> Path:
        return self.teacher / "synthetic"

    @property
    def synthetic(self) -> Path:
        return self.teacher / "synthetic.parquet"

    @property
    def pseudo_labels(self) -> Path:
        return self.teacher / "pseudo_labels.parquet"

    @property
    def manifest(self) -> Path:
        return self.teacher / "manifest.parquet"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def student_weights(self) -> Path:
        return self.student / "model.safetensors"

    @property
    def student_config(self) -> Path:
        return self.student / "config.json"

    @property
    def student_metrics(self) -> Path:
        return self.student / "metrics.json"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def onnx(self) -> Path:
        return self.export / "model.onnx"

    @property
    def export_report(self) -> Path:
        return self.export / "report.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_table(path: str | os.PathLike, rows: list[dict] | dict[str, list], schema=None) -> None:
    """Write a Parquet table atomically from row dicts or a column dict."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(rows, dict):
        table = pa.table(rows, schema=schema)
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: str | os.PathLike, what: str = "table") -> list[dict]:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is missing; run the stage that writes it first.")
    return pq.read_table(path).to_pylist()


def list_images(folder: str | os.PathLike, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted by relative path for a stable order."""
    folder = Path(folder)
    exts = {e.lower() for e in extensions}
    out = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


# ----------------------------------------------------------------------------------------------
# Stage stamps: skip work whose inputs and settings are unchanged.


def stamp_path(stage_dir: Path, stage: str) -> Path:
    return stage_dir / f".{stage}.stamp.json"


def stage_key(settings: Any, input_files: list[str | os.PathLike] = (), extra: Any = None) -> str:
    """Hash of a stage's settings plus the content of every input file."""
    from .job import settings_hash

    files = [(str(Path(p).name), sha256_file(p)) for p in input_files]
    return settings_hash(settings, files, extra)


def is_done(stage_dir: Path, stage: str, key: str, outputs: list[str | os.PathLike]) -> bool:
    sp = stamp_path(stage_dir, stage)
    if not sp.is_file() or not all(Path(o).exists() for o in outputs):
        return False
    try:
        return read_json(sp).get("key") == key
    except (OSError, ValueError):
        return False


def mark_done(stage_dir: Path, stage: str, key: str, info: dict | None = None) -> None:
    write_json(stamp_path(stage_dir, stage), {"key": key, **(info or {})})


def save_resolved_job(job, folder: Path) -> None:
    """Every stage leaves the resolved job beside its artifacts."""
    write_json(folder / "job.resolved.json", job.to_dict())


def log(msg: str) -> None:
    print(f"[distillery] {msg}", file=sys.stderr, flush=True)
