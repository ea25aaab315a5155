"""Real EuroSAT images for the benchmarks: the staged test split when present, else the committed sample."""
from __future__ import annotations

import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGED_TEST = REPO.parent / "shared" / "data" / "eurosat" / "test"
SAMPLE_EVAL = REPO / "examples" / "data" / "eurosat-sample" / "eval"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def eurosat_root() -> Path:
    """The ImageFolder root used: ``/work/shared/data/eurosat/test`` when staged, else the committed sample."""
    return STAGED_TEST if STAGED_TEST.is_dir() and any(STAGED_TEST.iterdir()) else SAMPLE_EVAL


def eurosat_images(n: int, seed: int = 0, root: Path | None = None) -> list[tuple[Path, str]]:
    """Up to ``n`` (path, class folder) pairs, class-balanced (round-robin over shuffled class folders)."""
    root = root or eurosat_root()
    rng = random.Random(seed)
    queues = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in EXTENSIONS)
        rng.shuffle(files)
        queues.append([(f, d.name) for f in files])
    from distillery.export.images import interleave

    out: list[tuple[Path, str]] = interleave(queues, n)
    if not out:
        raise FileNotFoundError(f"no images under {root}; stage EuroSAT or keep examples/data/eurosat-sample.")
    return out


def env(name: str, default, cast=str):
    """``DISTILLERY_BENCH_<name>`` cast with ``cast``, or ``default`` when unset or empty."""
    import os

    value = os.environ.get(f"DISTILLERY_BENCH_{name}")
    return default if value in (None, "") else cast(value)


def staged_root() -> Path:
    """The staged EuroSAT folder holding labeled_pool/, train_unlabeled/ and test/: ``DISTILLERY_EUROSAT`` when
    set, else ../shared/data/eurosat next to the repository, else ``.benchdata`` in it."""
    import os

    explicit = os.environ.get("DISTILLERY_EUROSAT")
    candidates = [Path(explicit)] if explicit else [REPO.parent / "shared" / "data" / "eurosat", REPO / ".benchdata"]
    for c in candidates:
        if all((c / d).is_dir() for d in ("labeled_pool", "train_unlabeled", "test")):
            return c.resolve()
    raise FileNotFoundError(f"EuroSAT folders not found in {[str(c) for c in candidates]}; set DISTILLERY_EUROSAT to a "
                            "folder holding labeled_pool/, train_unlabeled/ and test/ (see its README.md).")


def labeled_items(folder: Path, classes: list[str], limit: int = 0) -> list[tuple[Path, int]]:
    """``[(path, class index)]`` of an ImageFolder split (class i = sub-folder ``classes[i]``); at most
    ``limit`` per class when ``limit`` > 0."""
    from distillery.student.data import list_eval_images

    items = list_eval_images(folder, classes, EXTENSIONS)
    if limit:
        kept, count = [], [0] * len(classes)
        for p, y in items:
            if count[y] < limit:
                kept.append((p, y))
                count[y] += 1
        items = kept
    return items


def write_manifest(path: Path, rows: list[dict]) -> None:
    """Rows in the teacher stage's manifest format (teacher/ensemble.py's schema); a row without ``temperature``
    (the one its soft target was written at) gets null, which the student reads as 1."""
    import pyarrow as pa

    from distillery.rundir import write_table

    schema = pa.schema([("path", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
                        ("label", pa.int64()), ("soft_target", pa.list_(pa.float32())), ("weight", pa.float32()),
                        ("temperature", pa.float32()), ("provenance", pa.string())])
    write_table(path, rows, schema=schema)


def labeled_rows(items: list[tuple[Path, int]], num_classes: int, provenance: str) -> list[dict]:
    """Ground-truth ``[(path, class index)]`` as manifest rows with one-hot soft targets."""
    from distillery.rundir import sha256_file

    return [{"path": str(p), "source": "real", "sha256": sha256_file(p), "label": int(y),
             "soft_target": [float(j == y) for j in range(num_classes)], "weight": 1.0, "provenance": provenance}
            for p, y in items]
