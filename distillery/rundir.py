"""The run folder contract and the small pieces every stage uses to honour it.

```
runs/<job>/teacher/lora/                     domain LoRA (pytorch_lora_weights.safetensors, loss.json)
runs/<job>/teacher/synthetic/…               generated images
runs/<job>/teacher/synthetic.parquet         one row per synthetic image
runs/<job>/teacher/grids/<trick>.png         classes x samples per synthesis trick
runs/<job>/teacher/images.parquet            the unlabeled images: sha256, readable or why not (one listing per run)
runs/<job>/teacher/features/<encoder>/       image features by (encoder, preprocessing, image sha256)
runs/<job>/teacher/probs/<column>.parquet    each teacher column's class probabilities per real image
runs/<job>/teacher/eval/<column>.parquet     the same columns on the evaluation images (data.eval only)
runs/<job>/teacher/eval.json                 each column's top-1 on data.eval (evaluation only)
runs/<job>/teacher/synthetic_probs/<column>.parquet  the columns on the synthetic images (ensemble's filter)
runs/<job>/teacher/<teacher>/…               a teacher's own side tables and weights
runs/<job>/teacher/pseudo_labels.parquet     one row per real image, one probability column per teacher
runs/<job>/teacher/manifest.parquet          the training set
runs/<job>/teacher/report.md                 what the teacher stages made
runs/<job>/student/model.safetensors, config.json, metrics.json, report.md, confusion.png
runs/<job>/export/model.onnx (+ model.fp16.onnx, model.int8.onnx), report.json
runs/<job>/report.html                       the run report: every stage that ran, one self-contained page
runs/<job>/.lock                             while a stage command runs: its pid, host, start time, command
```

Stages talk only through these files; :class:`RunPaths` names every one of them, so no stage writes a
path literal of its own. Each stage writes atomically (temporary name, then rename) and records a
*stamp*: the hash of its settings and of the files it read. A stage whose stamp matches and whose
outputs exist is skipped (:func:`cached_stage` does list -> stamp -> skip -> write once for all).
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
from typing import Any, Callable, Iterator

from . import killpoints

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default, read by pipe.load_lora_weights(folder)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def lora(self) -> Path:
        return self.teacher / "lora"

    @property
    def lora_weights(self) -> Path:
        return self.lora / LORA_WEIGHT_NAME

    @property
    def lora_loss(self) -> Path:
        return self.lora / "loss.json"

    @property
    def synthetic_dir(self) -> Path:
        return self.teacher / "synthetic"

    @property
    def synthetic(self) -> Path:
        return self.teacher / "synthetic.parquet"

    @property
    def grids(self) -> Path:
        return self.teacher / "grids"

    def grid(self, trick: str) -> Path:
        return self.grids / f"{trick}.png"

    @property
    def images_index(self) -> Path:
        return self.teacher / "images.parquet"

    @property
    def features(self) -> Path:
        return self.teacher / "features"

    @property
    def probs_dir(self) -> Path:
        return self.teacher / "probs"

    def probs(self, column: str) -> Path:
        return self.probs_dir / f"{column}.parquet"

    @property
    def eval_probs_dir(self) -> Path:
        return self.teacher / "eval"

    def eval_probs(self, column: str) -> Path:
        return self.eval_probs_dir / f"{column}.parquet"

    def eval_probs_uncorrected(self, column: str) -> Path:
        """A column on the evaluation images before the class-prior correction (teacher/prior.py)."""
        return self.eval_probs_dir / "uncorrected" / f"{column}.parquet"

    @property
    def prior(self) -> Path:
        """The run's class prior (teacher/prior.py): mode, shares, evidence."""
        return self.teacher / "prior.json"

    def synthetic_probs(self, column: str) -> Path:
        """A column's probabilities on the synthetic images (for the ensemble's synthetic filter)."""
        return self.teacher / "synthetic_probs" / f"{column}.parquet"

    @property
    def teacher_eval(self) -> Path:
        return self.teacher / "eval.json"

    def teacher_dir(self, name: str) -> Path:
        """A teacher's own folder for side tables and weights (``teacher/<name>/``)."""
        return self.teacher / name

    @property
    def teacher_report(self) -> Path:
        return self.teacher / "report.md"

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

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def report_html(self) -> Path:
        """The run report: every stage that ran, one self-contained page (``distillery report``)."""
        return self.root / "report.html"


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


def _umask() -> int:
    """The process umask (read by setting and restoring it: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        if killpoints.armed():  # testing hook: die with the temporary file complete but not renamed
            killpoints.progress(f"write.{path.name}")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode a plain open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clean_temp_files(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Remove the temporary files :func:`atomic_path` leaves in ``folder`` when a process is killed mid-write
    (``.<name>.<random>.tmp<suffix>``); with ``recursive`` in every folder below it too (symlinks not followed).
    Call it only while holding the folder (a stage's start, under the run lock). Returns the names removed
    (relative to ``folder``)."""
    import re

    pattern = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^.]+)?$")
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    if recursive:
        dirs = [Path(d) for d, _, _ in os.walk(folder, followlinks=False)]
    else:
        dirs = [folder]
    for d in sorted(dirs):
        for p in sorted(d.iterdir()):
            if pattern.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p.relative_to(folder).as_posix())
    if removed:
        log(f"removed {len(removed)} temporary file(s) left by an interrupted write in {str(folder)!r}: "
            f"{', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")
    return removed


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically; a file that already holds exactly this text is left untouched."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    path = Path(path)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically; a file that already holds exactly these bytes is left untouched."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def canonical_safetensors(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's JSON header in one fixed order (metadata keys sorted, tensors by offset).

    safetensors keeps the metadata in a Rust HashMap, whose order is seeded per process: the same adapter got
    other bytes (and another sha256, which e.g. the synthetic images are keyed on) in every process. Offsets are
    relative to the end of the header, so only the header changes; loaders read the same tensors and metadata.
    """
    import struct

    path = Path(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    out = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    out.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


#: columns of a table that hold image paths: a relative value is relative to the table's own folder
PATH_COLUMNS = ("path", "full_path", "synthetic_path")


def _relative_paths(path: Path, rows: list[dict] | dict[str, list], root: Path) -> list[dict] | dict[str, list]:
    """``rows`` with every path-column value that lies inside ``root`` made relative to ``path``'s folder."""
    root, here = root.resolve(), path.parent.resolve()

    def rel(v):
        if not isinstance(v, str) or not v or not os.path.isabs(v):
            return v
        real = Path(os.path.normpath(v))
        return os.path.relpath(real, here).replace(os.sep, "/") if real.is_relative_to(root) else v

    if isinstance(rows, dict):
        return {k: ([rel(v) for v in col] if k in PATH_COLUMNS else col) for k, col in rows.items()}
    return [{k: (rel(v) if k in PATH_COLUMNS else v) for k, v in r.items()} for r in rows]


def portable_paths(paths, root: str | os.PathLike) -> list[str]:
    """``paths`` as they go into a stage key: relative (posix) when inside the run folder ``root``, so a moved or
    copied run folder keeps its keys; absolute otherwise."""
    root = Path(root).resolve()
    out = []
    for p in paths:
        real = Path(os.path.normpath(Path(p).resolve()))
        out.append(real.relative_to(root).as_posix() if real.is_relative_to(root) else str(p))
    return out


def write_table(path: str | os.PathLike, rows: list[dict] | dict[str, list], schema=None,
                relative_to: str | os.PathLike | None = None) -> None:
    """Write a Parquet table atomically from row dicts or a column dict.

    With ``relative_to`` (a run folder), image paths inside it (:data:`PATH_COLUMNS`) are stored relative to the
    table's own folder, so a run folder can be moved or copied; :func:`read_table` gives them back absolute.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if relative_to is not None:
        rows = _relative_paths(path, rows, Path(relative_to))
    if isinstance(rows, dict):
        table = pa.table(rows, schema=schema)
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: str | os.PathLike, what: str = "table") -> list[dict]:
    """A Parquet table's rows; a relative image path (:data:`PATH_COLUMNS`) is returned absolute, joined to the
    table's own folder."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is missing; run the stage that writes it first.")
    rows = pq.read_table(path).to_pylist()
    here = None
    for r in rows:
        for k in PATH_COLUMNS:
            v = r.get(k)
            if isinstance(v, str) and v and not os.path.isabs(v):
                here = here or path.parent.resolve()
                r[k] = os.path.normpath(here / v)
    return rows


def list_images(folder: str | os.PathLike, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path: :func:`distillery.images.list_images`
    without the list of unreadable entries."""
    from .images import list_images as _list

    return _list(folder, extensions)[0]


# ----------------------------------------------------------------------------------------------
# Stage stamps: skip work whose inputs and settings are unchanged.


def stamp_path(stage_dir: Path, stage: str) -> Path:
    return stage_dir / f".{stage}.stamp.json"


def settings_hash(*parts: Any) -> str:
    """Stable sha256 of JSON-able settings (dataclasses and paths allowed)."""
    import dataclasses

    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not hashable as settings: {type(o).__name__}")

    text = json.dumps(parts, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(settings: Any, input_files: list[str | os.PathLike] = (), extra: Any = None) -> str:
    """Hash of a stage's settings plus the content of every input file."""
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


def read_stamp(stage_dir: Path, stage: str) -> dict:
    try:
        return read_json(stamp_path(stage_dir, stage))
    except (OSError, ValueError):
        return {}


def cached_stage(job, stage_dir: Path, stage: str, key: str, outputs: list[str | os.PathLike],
                 compute: Callable[[], dict | None], fresh: Callable[[], bool] | None = None,
                 up_to_date: str = "") -> dict:
    """The skeleton every stage shares: skip when the stamp matches, else compute, save the job, stamp.

    ``compute()`` writes the outputs (atomically) and returns the info recorded in the stamp. ``fresh()``
    is an extra check a stage may add (e.g. synthesis: every image file still on disk as recorded).
    Returns the stamp's info with ``up_to_date`` true/false.
    """
    if is_done(stage_dir, stage, key, outputs) and (fresh is None or fresh()):
        log(f"{stage}: up to date" + (f" ({up_to_date})" if up_to_date else ""))
        info = {k: v for k, v in read_stamp(stage_dir, stage).items() if k != "key"}
        return {**info, "up_to_date": True}
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_job(job, stage_dir)
    info = compute() or {}
    mark_done(stage_dir, stage, key, info)
    return {**info, "up_to_date": False}


#: what ``--force`` removes in a stage's folder: the stamps that say it is done and the checkpoints it resumes from
FORGET_PATTERNS = (".*.stamp.json", "checkpoint.pt", "checkpoint.safetensors", "latte.pt", ".synthetic.progress.jsonl")


def forget_stage(root: str | os.PathLike, stage: str) -> list[str]:
    """Make ``stage`` (teacher, student or export) of the run folder ``root`` run again from the start: remove its
    stamps and resumable checkpoints (:data:`FORGET_PATTERNS`, in its folder and below). Content-keyed caches (image
    decodes, image features, descriptions) stay: they are valid for any run that asks for the same content.
    Returns the removed files, relative to ``root``."""
    root = Path(root)
    folder = root / stage
    if not folder.is_dir():
        return []
    removed = []
    for pattern in FORGET_PATTERNS:
        for p in sorted(folder.rglob(pattern)):
            if p.is_file():
                p.unlink()
                removed.append(p.relative_to(root).as_posix())
    return sorted(removed)


def save_resolved_job(job, folder: Path) -> None:
    """Every stage leaves the resolved job beside its artifacts."""
    write_json(folder / "job.resolved.json", job.to_dict())


def log(msg: str) -> None:
    print(f"[distillery] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# One run at a time per run folder.

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """Another live run holds the run folder; the message names the holder."""


_HELD: dict[str, int] = {}  # lock file -> how many times this process holds it (re-entrant)


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux /proc), to tell a live holder from a reused pid; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _proc_start(pid)
    return not (start and now and now != start)  # same pid, other process: the holder is gone


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}, "
            f"command {info.get('command')!r}")


def _read_lock(path: Path) -> dict | None:
    """The holder recorded in a lock file; None when it cannot be parsed (retried briefly: a holder that has just
    created the file may not have written it yet)."""
    import time

    for _ in range(10):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(info, dict) and "pid" in info:
                return info
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return None


@contextlib.contextmanager
def run_lock(run_path: str | os.PathLike, command: str = "") -> Iterator[Path]:
    """Hold ``<run>/.lock`` for the duration of the block: one stage command at a time per run folder.

    The lock file is created atomically (``O_CREAT | O_EXCL``) and records the holder (pid, host, start time,
    command). A second run stops at once with :class:`RunLockError` naming the holder. A lock left by a dead
    process on this host (pid not alive, or alive with another start time) is taken over, with a log line.
    Re-entrant within one process; torchrun workers other than rank 0 do not take it. A run folder the lock
    created and left empty is removed again.
    """
    import datetime
    import socket

    if os.environ.get("RANK", "0") != "0":  # a torchrun worker: its rank 0 holds the folder for the launch
        yield Path(run_path) / LOCK_NAME
        return
    root = Path(run_path)
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    key = str(path.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "proc_start": _proc_start(os.getpid()),
          "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
          "command": command or " ".join(sys.argv)}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = _read_lock(path)
            except FileNotFoundError:  # released meanwhile: try again
                continue
            if info is None:
                raise RunLockError(f"run folder {str(root)!r} is locked by {str(path)!r}, which does not say who holds "
                                   "it. If no distillery run is using this folder, delete that file.") from None
            if info.get("host") != host or _pid_alive(int(info["pid"]), info.get("proc_start")):
                where = "" if info.get("host") == host else f" on host {info.get('host')}"
                raise RunLockError(f"run folder {str(root)!r} is in use by another distillery run: {_describe(info)}. "
                                   f"Wait for it to finish or stop it; if no such process is running{where}, delete "
                                   f"{str(path)!r}.") from None
            # stale: the holder on this host is gone. Remove it only if it is still the same lock we read.
            try:
                if _read_lock(path) == info:
                    path.unlink()
            except FileNotFoundError:
                pass
            log(f"taking over the stale lock of {str(root)!r} left by a process that is gone ({_describe(info)})")
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise RunLockError(f"could not take the lock {str(path)!r} (it kept changing); is another run starting?")
    _HELD[key] = 1
    try:
        yield path
    finally:
        _HELD.pop(key, None)
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass
        if created_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only when empty: a stage that failed before writing anything leaves no folder
