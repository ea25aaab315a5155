"""Parity: the exported files' logits (onnxruntime, CPU, through the runtime's ``Classifier``) against
PyTorch's on the same preprocessed images, and their model time on this machine's CPU."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from distillery.runtime.classifier import Classifier

__all__ = ["parity", "time_formats"]


def parity(model_path: Path, reference: np.ndarray, batch: np.ndarray) -> dict[str, Any]:
    """Runtime (onnxruntime, CPU) logits on ``batch`` vs PyTorch ``reference`` logits: agreement and |Δlogit|."""
    clf = Classifier.load(model_path, providers=["CPUExecutionProvider"])
    got = np.concatenate([clf.predict_logits(batch[i:i + 32]) for i in range(0, len(batch), 32)])
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    return {
        "agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "n_images": int(len(batch)),
    }


def _torch_logits(model, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(batch[i:i + 32])).float().numpy()
                               for i in range(0, len(batch), 32)])


def time_formats(files: dict[str, Path], images: np.ndarray, seconds: float = 1.0) -> dict[str, float]:
    """Median milliseconds per image of each model file on onnxruntime's CPU provider at batch 1.

    Each format gets the same warm-up, then rounds over the same images (up to 16 of ``images``) interleaved
    across formats, so machine noise hits them alike; at least 3 rounds, then until about ``seconds`` per
    format is spent. Model time only: the preprocessing is the same for every format.
    """
    import statistics

    clfs = {f: Classifier.load(p, providers=["CPUExecutionProvider"]) for f, p in files.items()}
    xs = [images[i:i + 1] for i in range(min(len(images), 16))]
    for clf in clfs.values():  # warm-up: first runs allocate and tune
        for x in xs[:4]:
            clf.predict_logits(x)
    rounds: dict[str, list[float]] = {f: [] for f in clfs}
    start = time.perf_counter()
    while True:
        for f, clf in clfs.items():
            t0 = time.perf_counter()
            for x in xs:
                clf.predict_logits(x)
            rounds[f].append((time.perf_counter() - t0) / len(xs) * 1e3)
        done = len(rounds[next(iter(rounds))])
        if done >= 3 and (time.perf_counter() - start >= seconds * len(clfs) or done >= 200):
            break
    return {f: float(statistics.median(v)) for f, v in rounds.items()}
