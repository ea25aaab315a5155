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
    from distillery.export.onnx import interleave

    out: list[tuple[Path, str]] = interleave(queues, n)
    if not out:
        raise FileNotFoundError(f"no images under {root}; stage EuroSAT or keep examples/data/eurosat-sample.")
    return out


def staged_root() -> Path:
    """The staged EuroSAT folder holding labeled_pool/, train_unlabeled/ and test/: ``DISTILLERY_EUROSAT`` when
    set, else ../shared/data/eurosat next to the repository."""
    import os

    explicit = os.environ.get("DISTILLERY_EUROSAT")
    root = Path(explicit) if explicit else REPO.parent / "shared" / "data" / "eurosat"
    if not all((root / d).is_dir() for d in ("labeled_pool", "train_unlabeled", "test")):
        raise FileNotFoundError(f"EuroSAT folders not found in {str(root)!r}; set DISTILLERY_EUROSAT to a folder "
                                "holding labeled_pool/, train_unlabeled/ and test/.")
    return root.resolve()
