"""The student stage: train a timm classifier on the teacher's manifest (SPEC §7).

Reads ``runs/<job>/teacher/manifest.parquet`` and writes ``runs/<job>/student/``:

```
checkpoint.pt       every epoch (model, optimizer, scheduler, epoch, RNG states); a rerun resumes from it
model.safetensors   the trained weights (state_dict)
config.json         architecture, num_classes, class_names, model_args, data_config, job_hash, versions
metrics.json        epochs, train loss per epoch, wall time, images/s, evaluation on data.eval if set
```

Recipe (DDN): AdamW, cosine learning-rate decay over all steps, RandomResizedCrop + horizontal flip,
loss = ``distillation_loss`` (per-row weighted; ``alpha=0`` is plain cross-entropy to the hard label).
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.rundir import (RunPaths, atomic_path, is_done, log, mark_done, read_json, save_resolved_job,
                               stage_key, stamp_path, write_json)

from .data import ImageListDataset, ManifestDataset, eval_transform, list_eval_images, read_manifest, train_transform
from .loss import distillation_loss
from .model import build_student, pretrained_files, student_data_config

__all__ = ["train_student", "evaluate", "resolve_device", "STAGE"]

STAGE = "student"
CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; errors name ``student.device``."""
    from distillery.models import pick_device

    return torch.device(pick_device(name, key="student.device"))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # as plain lists so the checkpoint loads with torch.load(weights_only=True)
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at ``path`` if it was written for these settings and inputs (same stage key)."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: start over rather than crash on it
        log(f"student: ignoring unreadable checkpoint {path} ({e}); starting from epoch 0.")
        return None
    if ckpt.get("key") != key:
        log(f"student: checkpoint {path} is from other settings or another manifest; starting from epoch 0.")
        return None
    return ckpt


@torch.no_grad()
def evaluate(model: torch.nn.Module, items: list[tuple[Path, int]], data_config: dict, class_names: list[str],
             device: torch.device | str = "cpu", batch_size: int = 64, workers: int = 0) -> dict:
    """Top-1 and per-class accuracy of ``model`` on ``[(image path, class index)]`` with timm's eval transform."""
    from torch.utils.data import DataLoader

    device = torch.device(device)
    model.eval()
    loader = DataLoader(ImageListDataset(items, eval_transform(data_config)), batch_size=batch_size,
                        num_workers=workers, shuffle=False)
    num_classes = len(class_names)
    correct = np.zeros(num_classes, dtype=np.int64)
    count = np.zeros(num_classes, dtype=np.int64)
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=1).cpu().numpy()
        y = y.numpy()
        np.add.at(count, y, 1)
        np.add.at(correct, y, (pred == y).astype(np.int64))
    return {
        "images": int(count.sum()),
        "top1": float(correct.sum() / max(count.sum(), 1)),
        "per_class": {c: (float(correct[i] / count[i]) if count[i] else None) for i, c in enumerate(class_names)},
        "per_class_images": {c: int(count[i]) for i, c in enumerate(class_names)},
    }


def train_student(job, *, progress: bool = True) -> dict:
    """Run the student stage for ``job``; returns the metrics (also written to ``student/metrics.json``).

    Skips all work when the stamp matches (same student settings, classes, seed and manifest content)
    and the outputs exist; resumes from ``student/checkpoint.pt`` after an interruption.

    Args:
        job: the resolved :class:`distillery.job.Job`.
        progress: show a tqdm bar (stderr) with the loss and images/s.

    Loss settings come from ``job.student``: ``distill_alpha`` and ``temperature`` (:func:`distillation_loss`;
    ``distill_alpha=0`` is cross-entropy to the hard labels), ``model_args``, ``crop_scale``, ``amp``.
    """
    from timm import __version__ as timm_version
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    paths = RunPaths(job.run_path)
    cfg = job.student
    alpha, temperature, model_args, crop_scale, amp = (cfg.distill_alpha, cfg.temperature, dict(cfg.model_args),
                                                       tuple(cfg.crop_scale), cfg.amp)
    out_dir = paths.student
    class_names = job.class_names
    num_classes = len(class_names)
    eval_folders = [c.folder or c.name for c in job.classes]
    if not paths.manifest.is_file():
        raise FileNotFoundError(f"training manifest {str(paths.manifest)!r} is missing; run the teacher stage first.")

    settings = {"student": asdict(cfg), "classes": class_names, "seed": job.seed}
    extra = {"eval": job.data.eval, "eval_folders": eval_folders}
    key = stage_key(settings, [paths.manifest, *pretrained_files(cfg.pretrained)], extra)
    outputs = [paths.student_weights, paths.student_config, paths.student_metrics]
    if is_done(out_dir, STAGE, key, outputs):
        log(f"student: up to date ({out_dir}); delete {stamp_path(out_dir, STAGE).name} there to retrain.")
        return read_json(paths.student_metrics)

    rows = read_manifest(paths.manifest, num_classes)
    # List (never read) the evaluation set now, so a bad layout fails before hours of training.
    eval_items = list_eval_images(job.data.eval, eval_folders, job.data.extensions) if job.data.eval else []
    device = resolve_device(cfg.device)
    use_amp = amp and device.type == "cuda" and torch.cuda.is_bf16_supported()

    _seed_everything(job.seed)
    model, architecture, model_args = build_student(cfg.model, num_classes, cfg.pretrained, model_args)
    data_config = student_data_config(model, cfg.input_size)
    model.to(device)
    dataset = ManifestDataset(rows, train_transform(data_config, tuple(crop_scale)))
    n = len(dataset)
    drop_last = n > 1 and n % cfg.batch_size == 1  # a batch of one breaks BatchNorm in train mode
    steps_per_epoch = n // cfg.batch_size if drop_last else math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    ckpt_path = out_dir / CHECKPOINT
    ckpt = _load_checkpoint(ckpt_path, key)
    start_epoch, history, train_time, images_seen = 0, [], 0.0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        train_time, images_seen = ckpt["train_time"], ckpt["images_seen"]
        log(f"student: resuming from {ckpt_path} after epoch {start_epoch}/{cfg.epochs}.")
    del ckpt

    log(f"student: {architecture} on {n} images ({len(rows) - n} with weight 0 ignored), {num_classes} classes, "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps, input {data_config['input_size'][1:]}, {device}.")
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc="student", unit="step",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        # Data order depends only on (seed, epoch), so a resumed run sees the same batches.
        order = torch.Generator().manual_seed(job.seed + epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=order, drop_last=drop_last,
                            num_workers=cfg.workers, pin_memory=device.type == "cuda")
        loss_sum = weight_sum = 0.0
        t0 = time.perf_counter()
        epoch_images = 0
        for x, labels, soft, weights in loader:
            x = x.to(device, non_blocking=True)  # (B, 3, H, W)
            labels, soft, weights = labels.to(device), soft.to(device), weights.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)  # (B, C)
            loss = distillation_loss(logits, soft, labels, weights, temperature=temperature, alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            w = float(weights.sum())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"student: loss became {loss_value} at epoch {epoch + 1}; lower student.lr "
                                         f"(now {cfg.lr}) or check the manifest's soft targets.")
            loss_sum += loss_value * w
            weight_sum += w
            epoch_images += x.shape[0]
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_value:.4f}",
                            img_s=f"{epoch_images / max(time.perf_counter() - t0, 1e-9):.0f}")
        train_time += time.perf_counter() - t0
        images_seen += epoch_images
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(weight_sum, 1e-12),
                        "lr": optimizer.param_groups[0]["lr"]})
        _save_checkpoint(ckpt_path, {
            "key": key, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(), "history": history,
            "train_time": train_time, "images_seen": images_seen,
        })
    bar.close()

    model.eval()
    _write_weights(paths.student_weights, model)
    config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "class_names": class_names,
        "model_args": model_args,
        "data_config": data_config,
        "job_hash": key,
        "versions": {"torch": torch.__version__, "timm": timm_version},
    }
    write_json(paths.student_config, config)

    metrics: dict[str, Any] = {
        "epochs": cfg.epochs,
        "train_loss": history[-1]["loss"] if history else None,
        "history": history,
        "train_images": n,
        "ignored_rows": len(rows) - n,
        "wall_time_s": train_time,
        "images_per_s": images_seen / train_time if train_time > 0 else None,
        "device": str(device),
        "resumed_from_epoch": start_epoch or None,
        "eval": None,
    }
    if eval_items:
        ev = evaluate(model, eval_items, data_config, class_names, device, batch_size=cfg.batch_size,
                      workers=cfg.workers)
        metrics["eval"] = {"folder": job.data.eval, **ev}
        log(f"student: top-1 {ev['top1']:.4f} on {ev['images']} images of {job.data.eval}.")
    write_json(paths.student_metrics, metrics)
    save_resolved_job(job, out_dir)
    mark_done(out_dir, STAGE, key, {"epochs": cfg.epochs, "architecture": architecture})
    log(f"student: done; final train loss {metrics['train_loss']:.4f}, wrote {out_dir}.")
    return metrics


def _write_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
