"""The student stage: train a timm classifier on the teacher's manifest (SPEC §7).

Reads ``runs/<job>/teacher/manifest.parquet`` and writes ``runs/<job>/student/``:

```
checkpoint.pt       each epoch end and every student.checkpoint_steps steps (model, optimizer, scheduler,
                    EMA, RNG states, position in the epoch); a rerun resumes from it
model.safetensors   the trained weights (state_dict; the EMA weights when student.ema_decay > 0)
config.json         architecture, num_classes, class_names, model_args, data_config, weights, job_hash, versions
metrics.json        epochs, train loss per epoch, wall time, images/s, evaluation on data.eval if set
                    (top-1, per-class accuracy, confusion matrix)
confusion.png       the confusion matrix as an image (with data.eval)
report.md           a summary of the above
```
and ``<run>/cache/`` (or ``student.cache_dir``): the decode-once uint8 image cache (``student/cache.py``).

Recipe (DDN): AdamW, cosine learning-rate decay over all steps, RandomResizedCrop + horizontal flip,
loss = ``distillation_loss`` (per-row weighted; ``alpha=0`` is plain cross-entropy to the hard label).
Options: timm RandAugment, mixup/CutMix, EMA of weights, channels_last, bf16 autocast and ``torch.compile``.

Determinism: the data order is a permutation fixed by ``(seed, epoch)``, each sample's augmentation is seeded
by ``(seed, epoch, index)`` and mixing by ``(seed, epoch, step)``, so a run resumed from any checkpoint (and a
run with any number of DataLoader workers) sees exactly the batches an uninterrupted run sees.
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
_SYNC_EVERY = 10  # steps between host reads of the running loss (progress bar, NaN check)


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
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)  # [true, predicted]
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=1).cpu().numpy()
        np.add.at(confusion, (y.numpy(), pred), 1)
    count, correct = confusion.sum(axis=1), np.diag(confusion)
    return {
        "images": int(count.sum()),
        "top1": float(correct.sum() / max(count.sum(), 1)),
        "per_class": {c: (float(correct[i] / count[i]) if count[i] else None) for i, c in enumerate(class_names)},
        "per_class_images": {c: int(count[i]) for i, c in enumerate(class_names)},
        "confusion": confusion.tolist(),
    }


def _write_confusion_png(path: Path, confusion: list[list[int]], class_names: list[str]) -> None:
    """A row-normalised confusion matrix (rows: true class, columns: predicted) drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    m = np.asarray(confusion, dtype=np.float64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    font = ImageFont.load_default()
    cell, label_w = 44, 8 + 7 * max(len(c) for c in class_names)
    top = label_w  # column labels are drawn rotated above the grid
    img = Image.new("RGB", (label_w + k * cell + 8, top + k * cell + 28), "white")
    draw = ImageDraw.Draw(img)
    for i in range(k):
        draw.text((4, top + i * cell + cell // 2 - 5), class_names[i], fill="black", font=font)
        col = Image.new("RGB", (label_w, 14), "white")
        ImageDraw.Draw(col).text((2, 1), class_names[i], fill="black", font=font)
        col = col.rotate(90, expand=True)
        img.paste(col, (label_w + i * cell + cell // 2 - 7, 0))
        for j in range(k):
            v = share[i, j]
            shade = int(255 * (1 - v))
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((x0 + 6, y0 + cell // 2 - 5), f"{int(m[i, j])}", fill="white" if v > 0.5 else "black", font=font)
    draw.text((label_w, top + k * cell + 8), "rows: true class, columns: predicted; shade = share of the row",
              fill="black", font=font)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _write_report(path: Path, metrics: dict, config: dict) -> None:
    """``student/report.md``: training summary and, with an evaluation folder, accuracy and the confusion matrix."""
    lines = [f"# Student: {config['architecture']}", "",
             f"- training images: {metrics['train_images']} ({metrics['ignored_rows']} rows with weight 0 ignored)",
             f"- epochs: {metrics['epochs']}, final train loss {metrics['train_loss']:.4f}",
             f"- training time: {metrics['wall_time_s']:.1f} s, {metrics['images_per_s'] or 0:.0f} images/s on "
             f"{metrics['device']}",
             f"- saved weights: {'EMA of weights' if config['weights'] == 'ema' else 'last step'}", ""]
    ev = metrics.get("eval")
    if ev:
        lines += [f"## Evaluation on `{ev['folder']}` ({ev['images']} images)", "", f"top-1: **{ev['top1']:.4f}**"
                  + (f" (without EMA: {ev['top1_without_ema']:.4f})" if "top1_without_ema" in ev else ""), "",
                  "| class | images | accuracy |", "|---|---:|---:|"]
        for c, a in ev["per_class"].items():
            lines.append(f"| {c} | {ev['per_class_images'][c]} | {'-' if a is None else f'{a:.4f}'} |")
        lines += ["", "![confusion matrix](confusion.png)", ""]
    else:
        lines += ["No evaluation folder (`data.eval`) was given, so no accuracy is reported.", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")


def _prepare_cache(job, rows: list[dict], data_config: dict, progress: bool):
    """Check every row's file against its manifest sha256 and fill the decode cache; returns the cache."""
    from .cache import DecodeCache, file_sha256

    root = job.student.cache_dir or str(Path(job.run_path) / "cache")
    size = max(data_config["input_size"][1:])
    cache = DecodeCache(root, size, data_config["interpolation"])
    todo = []
    for r in rows:
        if r["weight"] <= 0:
            continue
        actual = file_sha256(r["path"])
        if r["sha256"] and actual != r["sha256"]:
            raise ValueError(f"manifest row {r['row']} (path {r['path']!r}): the file changed after the teacher stage "
                             f"labelled it (sha256 {actual[:12]}..., manifest says {str(r['sha256'])[:12]}...). Rerun "
                             "the teacher stage so its labels describe the current images.")
        r["sha256"] = actual
        if actual not in cache:
            todo.append((actual, r["path"]))
    if todo:
        log(f"student: decoding {len(todo)} images once into {cache.folder} ({size}x{size} uint8; "
            f"{len(cache)} already there).")
    cache.add(todo, progress=progress)
    return cache


def train_student(job, *, progress: bool = True) -> dict:
    """Run the student stage for ``job``; returns the metrics (also written to ``student/metrics.json``).

    Skips all work when the stamp matches (same student settings, classes, seed and manifest content)
    and the outputs exist; resumes from ``student/checkpoint.pt`` after an interruption (written at each
    epoch end and every ``student.checkpoint_steps`` steps), to the same weights an uninterrupted run reaches.

    Args:
        job: the resolved :class:`distillery.job.Job`.
        progress: show tqdm bars (stderr) with the loss, images/s and ETA.

    Loss settings come from ``job.student``: ``distill_alpha`` and ``temperature`` (:func:`distillation_loss`;
    ``distill_alpha=0`` is cross-entropy to the hard labels), ``mixup``/``cutmix`` (:func:`mix_batch`);
    the rest of the recipe from ``model_args``, ``crop_scale``, ``randaugment``, ``ema_decay``, ``amp``,
    ``channels_last``, ``compile``, ``cache``.
    """
    from timm import __version__ as timm_version
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data import EpochSampler, Normalize
    from .mix import mix_batch

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
    transform = train_transform(data_config, tuple(crop_scale), cfg.randaugment)  # fails early on a bad string
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    cache = _prepare_cache(job, rows, data_config, progress) if cfg.cache else None
    dataset = ManifestDataset(rows, transform, cache=cache, seed=job.seed)
    n = len(dataset)
    drop_last = n > 1 and n % cfg.batch_size == 1  # a batch of one breaks BatchNorm in train mode
    sampler = EpochSampler(n, cfg.batch_size, job.seed, drop_last)
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = steps_per_epoch * cfg.epochs
    normalize = Normalize(data_config["mean"], data_config["std"], device, cfg.channels_last)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    forward = torch.compile(model) if cfg.compile else model

    ckpt_path = out_dir / CHECKPOINT
    ckpt = _load_checkpoint(ckpt_path, key)
    start_epoch, start_step, history, train_time, images_seen = 0, 0, [], 0.0, 0
    acc = {"loss_sum": 0.0, "weight_sum": 0.0, "images": 0, "time": 0.0}  # the current epoch's running sums
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        _set_rng_state(ckpt["rng"])
        start_epoch, start_step, history = ckpt["epoch"], ckpt.get("step", 0), ckpt["history"]
        train_time, images_seen = ckpt["train_time"], ckpt["images_seen"]
        acc = ckpt.get("epoch_sums", acc)
        where = f"epoch {start_epoch}/{cfg.epochs}" + (f" + {start_step} steps" if start_step else "")
        log(f"student: resuming from {ckpt_path} after {where}.")
    del ckpt

    def save_checkpoint(epoch: int, step: int) -> None:
        _save_checkpoint(ckpt_path, {
            "key": key, "epoch": epoch, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None, "rng": _rng_state(),
            "history": history, "train_time": train_time, "images_seen": images_seen,
            "epoch_sums": dict(acc),
        })

    extras = [f for f, on in (("cache", cfg.cache), ("randaugment", cfg.randaugment), ("mixup", cfg.mixup),
                              ("cutmix", cfg.cutmix), ("EMA", cfg.ema_decay), ("channels_last", cfg.channels_last),
                              ("compile", cfg.compile), ("bf16", use_amp)) if on]
    log(f"student: {architecture} on {n} images ({len(rows) - n} with weight 0 ignored), {num_classes} classes, "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps, input {data_config['input_size'][1:]}, {device}"
        + (f"; {', '.join(extras)}" if extras else "") + ".")
    # One loader for the whole run: workers stay alive between epochs; the sampler carries the epoch.
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                        prefetch_factor=4 if cfg.workers > 0 else None)
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch + start_step, desc="student", unit="step",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            acc = {"loss_sum": 0.0, "weight_sum": 0.0, "images": 0, "time": 0.0}
        sampler.set_epoch(epoch, first)
        # Loss sums stay on the device; the host reads them every few steps (no per-step sync).
        loss_dev = torch.zeros((), device=device)
        weight_dev = torch.zeros((), device=device)
        t0 = time.perf_counter()
        step = first
        for x, labels, soft, weights in loader:
            x = normalize(x.to(device, non_blocking=True))  # uint8 (B, 3, H, W) -> normalised float
            labels = labels.to(device, non_blocking=True)
            soft, weights = soft.to(device, non_blocking=True), weights.to(device, non_blocking=True)
            x, perm, lam = mix_batch(x, job.seed, epoch, step, cfg.mixup, cfg.cutmix)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = forward(x)  # (B, C)
            loss = distillation_loss(logits, soft, labels, weights, temperature=temperature, alpha=alpha)
            if perm is not None:
                loss = lam * loss + (1.0 - lam) * distillation_loss(logits, soft[perm], labels[perm], weights[perm],
                                                                    temperature=temperature, alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model, step=epoch * steps_per_epoch + step + 1)
            w = weights.sum()
            loss_dev += loss.detach() * w
            weight_dev += w
            acc["images"] += x.shape[0]
            step += 1
            bar.update(1)
            last = step == steps_per_epoch
            checkpoint_now = cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 and not last
            if step % _SYNC_EVERY == 0 or last or checkpoint_now:
                acc["loss_sum"] += float(loss_dev)
                acc["weight_sum"] += float(weight_dev)
                loss_dev.zero_()
                weight_dev.zero_()
                running = acc["loss_sum"] / max(acc["weight_sum"], 1e-12)
                if not math.isfinite(running):
                    raise FloatingPointError(f"student: loss became {running} at epoch {epoch + 1}; lower student.lr "
                                             f"(now {cfg.lr}) or check the manifest's soft targets.")
                elapsed = acc["time"] + time.perf_counter() - t0
                bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{running:.4f}",
                                img_s=f"{acc['images'] / max(elapsed, 1e-9):.0f}")
            if checkpoint_now:
                dt = time.perf_counter() - t0
                acc["time"] += dt
                train_time += dt
                save_checkpoint(epoch, step)
                t0 = time.perf_counter()
        dt = time.perf_counter() - t0
        acc["time"] += dt
        train_time += dt
        images_seen += acc["images"]
        history.append({"epoch": epoch + 1, "loss": acc["loss_sum"] / max(acc["weight_sum"], 1e-12),
                        "lr": optimizer.param_groups[0]["lr"], "images_per_s": acc["images"] / max(acc["time"], 1e-9)})
        acc = {"loss_sum": 0.0, "weight_sum": 0.0, "images": 0, "time": 0.0}
        save_checkpoint(epoch + 1, 0)
    bar.close()

    final = ema.module if ema is not None else model
    final.eval()
    _write_weights(paths.student_weights, final)
    config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "class_names": class_names,
        "model_args": model_args,
        "data_config": data_config,
        "weights": "ema" if ema is not None else "final",
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
        "weights": config["weights"],
        "resumed_from_epoch": start_epoch or None,
        "resumed_from": {"epoch": start_epoch, "step": start_step} if (start_epoch or start_step) else None,
        "eval": None,
    }
    if eval_items:
        ev = evaluate(final, eval_items, data_config, class_names, device, batch_size=cfg.batch_size,
                      workers=cfg.workers)
        metrics["eval"] = {"folder": job.data.eval, **ev}
        if ema is not None:  # also the raw weights, to show what the EMA bought
            metrics["eval"]["top1_without_ema"] = evaluate(model, eval_items, data_config, class_names, device,
                                                           batch_size=cfg.batch_size, workers=cfg.workers)["top1"]
        _write_confusion_png(out_dir / "confusion.png", ev["confusion"], class_names)
        log(f"student: top-1 {ev['top1']:.4f} on {ev['images']} images of {job.data.eval}; confusion matrix in "
            f"{out_dir / 'confusion.png'}.")
    write_json(paths.student_metrics, metrics)
    _write_report(out_dir / "report.md", metrics, config)
    save_resolved_job(job, out_dir)
    mark_done(out_dir, STAGE, key, {"epochs": cfg.epochs, "architecture": architecture})
    log(f"student: done; final train loss {metrics['train_loss']:.4f}, wrote {out_dir}.")
    return metrics


def _write_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
