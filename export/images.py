"""Which real domain images the export uses: parity, INT8 calibration, QAT and INT8-choice images.

All of them are drawn class-balanced (round robin over the pseudo-labels) from the job's real domain
images; the parity images, which gate the export, are never among the QAT or choice images, and the
calibration images avoid them when there are enough.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from distillery.rundir import RunPaths, log, read_table

from .formats import STAGE

__all__ = ["balanced_sample", "interleave", "ImageSets", "select_images", "INT8_CHOICE_IMAGES"]

INT8_CHOICE_IMAGES = 512  # held-out pseudo-labelled images on which post-training and QAT INT8 compete


def balanced_sample(rows: list[dict], n: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[str]:
    """Up to ``n`` paths drawn round-robin over ``label`` (classes in index order, each shuffled with ``seed``).

    Classes with fewer images run out and the others fill the remaining slots, so the sample is as
    balanced as the data allows. Rows whose path is in ``exclude`` are skipped.
    """
    by_label: dict[int, list[str]] = {}
    for r in rows:
        if r["path"] not in exclude:
            by_label.setdefault(int(r["label"]), []).append(r["path"])
    rng = random.Random(seed)
    queues = []
    for label in sorted(by_label):
        paths = sorted(set(by_label[label]))
        rng.shuffle(paths)
        queues.append(paths)
    return interleave(queues, n)


def interleave(queues: list[list], n: int) -> list:
    """Take one item from each queue in turn (round robin) until ``n`` items or all queues are used up."""
    out: list = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < n:
                out.append(q[depth])
        depth += 1
    return out


def _domain_images(job, paths: RunPaths) -> tuple[list[dict], str]:
    """Rows {path, label} of real domain images: pseudo-labeled when the teacher ran, else the folder unlabeled."""
    if paths.pseudo_labels.is_file():
        from distillery.images import check_table_paths

        rows = [{"path": r["path"], "label": r["label"]} for r in read_table(paths.pseudo_labels, "pseudo labels")]
        check_table_paths(job, rows, paths.pseudo_labels)
        rows = [r for r in rows if Path(r["path"]).is_file()]
        if rows:
            return rows, "pseudo_labels"
        log(f"{STAGE}: no image listed in {paths.pseudo_labels} exists any more; using {job.data.unlabeled}")
    from distillery.images import unlabeled_set

    try:
        images = unlabeled_set(job, record=False)  # the same listing, hashing and decode check as the teachers
    except FileNotFoundError:
        return [], "unlabeled"
    return [{"path": str(p), "label": 0} for p in images.paths], "unlabeled"


@dataclass
class ImageSets:
    """The export's image paths, by use; ``source`` says where they come from (``pseudo_labels`` | ``unlabeled``)."""

    source: str
    parity: list[str]
    calibration: list[str] = field(default_factory=list)  # INT8 calibration (when int8 is exported)
    qat: list[str] = field(default_factory=list)  # INT8 quantisation-aware fine-tuning
    choice: list[str] = field(default_factory=list)  # held out: post-training vs QAT INT8 compete on them


def select_images(job, paths: RunPaths, formats: list[str]) -> ImageSets:
    """Draw the parity images and, when ``formats`` has int8, the calibration (and with ``export.int8_qat_epochs``
    the QAT and choice) images; FileNotFoundError when there are no real domain images at all."""
    cfg = job.export
    rows, source = _domain_images(job, paths)
    if not rows:
        raise FileNotFoundError(f"{STAGE}: no real domain images for the parity check: {paths.pseudo_labels} is "
                                f"missing and data.unlabeled {job.data.unlabeled!r} holds no images "
                                f"({', '.join(job.data.extensions)}). Parity is measured on real images; add some.")
    sets = ImageSets(source, balanced_sample(rows, cfg.parity_images, seed=job.seed))
    if "int8" in formats or "int8_qdq" in formats:
        sets.calibration = balanced_sample(rows, cfg.calibration_images, seed=job.seed + 1, exclude=set(sets.parity))
        sets.calibration = sets.calibration or balanced_sample(rows, cfg.calibration_images, seed=job.seed + 1)
    if "int8" in formats and cfg.int8_qat_epochs > 0:
        sets.qat = balanced_sample(rows, cfg.int8_qat_images, seed=job.seed + 2, exclude=set(sets.parity))
        sets.choice = balanced_sample(rows, INT8_CHOICE_IMAGES, seed=job.seed + 3,
                                      exclude=set(sets.parity) | set(sets.qat))
    # modelopt_formats.py fine-tunes int8_qdq and sparse24 on the same unlabeled images as the INT8 QAT
    if not sets.qat and (("int8_qdq" in formats and cfg.qdq_qat_epochs > 0)
                         or ("sparse24" in formats and cfg.sparse24_epochs > 0)):
        sets.qat = balanced_sample(rows, cfg.int8_qat_images, seed=job.seed + 2, exclude=set(sets.parity))
    return sets
