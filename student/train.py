"""The student stage: train a timm classifier on the teacher's manifest (SPEC §7).

Reads ``runs/<job>/teacher/manifest.parquet`` and writes ``runs/<job>/student/``:

```
checkpoint.pt       each epoch end and every student.checkpoint_steps steps (model, optimizer, scheduler,
                    EMA, RNG states, position in the epoch); a rerun resumes from it
model.safetensors   the trained weights (state_dict; the EMA weights when student.ema_decay > 0)
config.json         architecture, num_classes, class_names, model_args, data_config, weights, job_hash, versions
metrics.json        epochs, train loss (and top-1 on data.eval, evaluation only) per epoch, wall time, images/s,
                    evaluation on data.eval if set (top-1, per-class accuracy, confusion matrix)
confusion.png       the confusion matrix (matplotlib, with data.eval)
report.md           a summary of the above
```
and ``<run>/cache/`` (or ``student.cache_dir``): the decode-once uint8 image cache (``student/cache.py``).

Recipe (DDN): AdamW, cosine learning-rate decay over all steps, RandomResizedCrop + horizontal flip,
loss = ``distillation_loss`` (per-row weighted; teacher and student softened at ``student.temperature``, each soft
target from the temperature the manifest says it was written at; ``alpha=0`` is plain cross-entropy to the hard label).
Options: timm RandAugment, mixup/CutMix, EMA of weights, channels_last, bf16 autocast and ``torch.compile``.

Determinism: the data order is a permutation fixed by ``(seed, epoch)``, each sample's augmentation is seeded
by ``(seed, epoch, index)`` and mixing by ``(seed, epoch, step)``, so a run resumed from any checkpoint (and a
run with any number of DataLoader workers) sees exactly the batches an uninterrupted run sees.

Structure: ``train_student`` checks the stamp, then ``_setup`` (manifest, model, data, optimiser, resume state),
``_fit`` (the epoch loop with its checkpoints) and ``_finalize`` (weights, config, evaluation, metrics, report).

Several processes (``distillery student --nproc N``, ``student/dist.py``): the global batch stays
``student.batch_size`` and each rank takes a strided share of every global batch of the same ``(seed, epoch)``
permutation, so steps per epoch, the learning rate and its schedule mean what they mean in one process. Each
rank's loss is rescaled by its share of the batch's total weight, so DDP's gradient average is the gradient of the
global batch's weighted mean loss. Differences from one process: BatchNorm statistics are per rank (rank 0's
running buffers are broadcast), mixup/CutMix pair images within a rank's share, a last partial batch smaller than
2 images per rank is dropped, and sums are reduced in another order (weights agree to float rounding, not bits).
Rank 0 alone writes files, builds the decode cache (the others wait, then read it) and evaluates on data.eval;
every rank resumes from the same checkpoint. ``--nproc 1`` is the single-process path, untouched.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery import killpoints
from distillery.rundir import (RunPaths, atomic_path, clean_temp_files, is_done, log, mark_done, read_json,
                               save_resolved_job, stage_key, stamp_path, write_json)

from .data import ImageListDataset, ManifestDataset, eval_transform, list_eval_images, read_manifest, train_transform
from .dist import all_reduce_sum, barrier, get_dist_info, is_main, kill_hook
from .loss import distillation_loss
from .model import build_student, pretrained_files, student_data_config

__all__ = ["train_student", "evaluate", "resolve_device", "STAGE"]

STAGE = "student"
CHECKPOINT = "checkpoint.pt"
_SYNC_EVERY = 10  # steps between host reads of the running loss (progress bar, NaN check)
LOSS_VERSION = "2"  # bump when the distillation loss changes (2: teacher and student softened at the same tau)


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


def _write_confusion_png(path: Path, confusion: list[list[int]], class_names: list[str], job_name: str = "",
                         key: str | None = None) -> None:
    """The row-normalised confusion matrix (rows: true class, columns: predicted) drawn with matplotlib, the same
    figure as the run report's, naming the job, stage and settings hash that produced it."""
    from distillery.report import Provenance, confusion_png

    png = confusion_png(confusion, class_names, Provenance(job_name, "student", key))
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


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
    if is_main():  # rank 0 builds the cache; with torchrun the others wait for it, then reread its index
        if todo:
            log(f"student: decoding {len(todo)} images once into {cache.folder} ({size}x{size} uint8; "
                f"{len(cache)} already there).")
        cache.add(todo, progress=progress)
        killpoints.progress("student.cache")
    if get_dist_info()[1] > 1:
        barrier()
        if not is_main():
            cache = DecodeCache(root, size, data_config["interpolation"])
            missing = [sha for sha, _ in todo if sha not in cache]
            if missing:
                raise RuntimeError(f"student: rank {get_dist_info()[0]} finds {len(missing)} images missing from the "
                                   f"decode cache {cache.folder} that rank 0 built; is student.cache_dir on a folder "
                                   "every process sees?")
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
    ``channels_last``, ``compile``, ``cache``. Only rank 0 (:mod:`distillery.student.dist`) writes files.
    """
    paths = RunPaths(job.run_path)
    cfg = job.student
    eval_folders = [c.folder or c.name for c in job.classes]
    if not paths.manifest.is_file():
        raise FileNotFoundError(f"training manifest {str(paths.manifest)!r} is missing; run the teacher stage first.")

    settings = {"student": asdict(cfg), "classes": job.class_names, "seed": job.seed}
    if cfg.distill_alpha > 0:  # a student distilled by an earlier loss is retrained (plain CE is unchanged)
        settings["loss"] = LOSS_VERSION
    extra = {"eval": job.data.eval, "eval_folders": eval_folders}
    from .embedding import TEXT_FILE, stage_settings

    settings = stage_settings(settings, job)  # a logits head's key is what it was before student.head existed
    key = stage_key(settings, [paths.manifest, *pretrained_files(cfg.pretrained)], extra)
    outputs = [paths.student_weights, paths.student_config, paths.student_metrics]
    if cfg.head == "embedding":
        outputs.append(paths.student / TEXT_FILE)
    if is_done(paths.student, STAGE, key, outputs):
        log(f"student: up to date ({paths.student}); `distillery student --force` retrains it.")
        return read_json(paths.student_metrics)

    if is_main():  # a write killed mid-way (e.g. of checkpoint.pt) leaves its temporary file behind
        clean_temp_files(paths.student)
    s = _setup(job, key, eval_folders, progress)
    _fit(s, progress)
    return _finalize(s)


def _epoch_sums() -> dict:
    return {"loss_sum": 0.0, "weight_sum": 0.0, "images": 0, "time": 0.0}


@dataclass
class _Setup:
    """Everything a training run holds: the job, its data and loaders, the model and optimiser state, and the
    resume state (where training stands and what it has measured so far; restored from the checkpoint)."""

    job: Any
    key: str  # the stage key: the checkpoint's and the stamp's
    paths: RunPaths
    rows: list[dict]  # every manifest row (also the weight-0 ones)
    eval_items: list[tuple[Path, int]]
    device: torch.device
    use_amp: bool
    model: torch.nn.Module
    architecture: str
    model_args: dict
    data_config: dict
    dataset: Any  # ManifestDataset
    sampler: Any  # EpochSampler
    loader: Any  # DataLoader, one for the whole run
    normalize: Any  # Normalize
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any  # timm ModelEmaV3 or None
    forward: Any  # the model (DistributedDataParallel-wrapped with several processes), or its torch.compile wrapper
    ckpt_path: Path
    world_size: int = 1  # processes training together (torchrun); 1 = the single-process path
    start_epoch: int = 0
    start_step: int = 0
    history: list[dict] = field(default_factory=list)
    train_time: float = 0.0
    images_seen: int = 0
    acc: dict = field(default_factory=_epoch_sums)  # the current epoch's running sums
    head: Any = None  # student.head=embedding: the EmbeddingHead (student/embedding.py); None for class logits

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.job.student.epochs


def _setup(job, key: str, eval_folders: list[str], progress: bool) -> _Setup:
    """Read and check the manifest, build the model, data, loader, optimiser, scheduler and EMA, and restore
    them from ``student/checkpoint.pt`` when it was written for this ``key``."""
    from torch.utils.data import DataLoader

    from .data import EpochSampler, Normalize

    paths = RunPaths(job.run_path)
    cfg = job.student
    num_classes = len(job.class_names)
    rows = read_manifest(paths.manifest, num_classes)
    from distillery.images import check_table_paths

    check_table_paths(job, rows, paths.manifest)  # a row edited to point elsewhere is refused, not trained on
    # List (never read) the evaluation set now, so a bad layout fails before hours of training.
    eval_items = list_eval_images(job.data.eval, eval_folders, job.data.extensions, check=True) if job.data.eval else []
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()

    from .embedding import prepare_head

    head = prepare_head(job)  # before seeding: loading the CLIP must not move the student's initialisation
    _seed_everything(job.seed)
    outputs = head.dim if head is not None else num_classes
    model, architecture, model_args = build_student(cfg.model, outputs, cfg.pretrained, dict(cfg.model_args))
    data_config = student_data_config(model, cfg.input_size)
    transform = train_transform(data_config, tuple(cfg.crop_scale), cfg.randaugment)  # fails early on a bad string
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    cache = _prepare_cache(job, rows, data_config, progress) if cfg.cache else None
    dataset = ManifestDataset(rows, transform, cache=cache, seed=job.seed)
    if head is not None:  # items also carry the row's CLIP target embedding
        dataset = head.wrap(dataset, job, progress)
    n = len(dataset)
    rank, world, local_rank = get_dist_info()
    import torch.distributed as tdist

    if world > 1 and not (tdist.is_available() and tdist.is_initialized()):
        raise RuntimeError(f"student: WORLD_SIZE={world} (RANK={rank}) but this process joined no process group; "
                           f"launch several processes with `distillery student --nproc {world}` (torchrun), or "
                           "unset RANK and WORLD_SIZE for one process.")
    if cfg.batch_size < 2 * world:
        raise ValueError(f"student.batch_size={cfg.batch_size} with {world} processes: each process needs at least 2 "
                         f"images per step (BatchNorm); set student.batch_size >= {2 * world} or use fewer processes.")
    # A batch of one breaks BatchNorm in train mode; with several processes, so does a share of one.
    drop_last = n > 1 and 0 < n % cfg.batch_size < 2 * world
    sampler = EpochSampler(n, cfg.batch_size, job.seed, drop_last)
    steps_per_epoch = sampler.batches_per_epoch()
    normalize = Normalize(data_config["mean"], data_config["std"], device, cfg.channels_last)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * cfg.epochs)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    forward = model

    s = _Setup(job=job, key=key, paths=paths, rows=rows, eval_items=eval_items, device=device, use_amp=use_amp,
               model=model, architecture=architecture, model_args=model_args, data_config=data_config,
               dataset=dataset, sampler=sampler, loader=None, normalize=normalize, steps_per_epoch=steps_per_epoch,
               optimizer=optimizer, scheduler=scheduler, ema=ema, forward=forward,
               ckpt_path=paths.student / CHECKPOINT, world_size=world, head=head)
    _resume(s)  # every rank loads the same checkpoint, before DDP compares the ranks' parameters
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        s.forward = DistributedDataParallel(model, device_ids=[device.index or local_rank] if device.type == "cuda"
                                            else None)
    if cfg.compile:
        s.forward = torch.compile(s.forward)

    extras = [f for f, on in (("cache", cfg.cache), ("randaugment", cfg.randaugment), ("mixup", cfg.mixup),
                              ("cutmix", cfg.cutmix), ("EMA", cfg.ema_decay), ("channels_last", cfg.channels_last),
                              ("compile", cfg.compile), ("bf16", use_amp)) if on]
    if is_main():
        log(f"student: {architecture} on {n} images ({len(rows) - n} with weight 0 ignored), {num_classes} classes, "
            f"{cfg.epochs} epochs x {steps_per_epoch} steps, input {data_config['input_size'][1:]}, {device}"
            + (f"; {', '.join(extras)}" if extras else "")
            + (f"; {world} processes, {cfg.batch_size // world}-{-(-cfg.batch_size // world)} images each per step"
               if world > 1 else "") + ".")
    # One loader for the whole run: workers stay alive between epochs; the sampler carries the epoch.
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                     prefetch_factor=4 if cfg.workers > 0 else None,
                     # its own generator: each iterator draws a worker base seed, and from the global RNG that draw
                     # would shift dropout's stream by how often a run was resumed (augmentation is keyed on
                     # seed, epoch and image, so the worker seeds themselves change nothing)
                     generator=torch.Generator().manual_seed(job.seed))
    if world > 1:
        s.loader = DataLoader(dataset, batch_sampler=ShardedBatchSampler(sampler, cfg.batch_size, rank, world),
                              **loader_kw)
    else:
        s.loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, **loader_kw)
    return s


class ShardedBatchSampler:
    """Rank ``rank``'s share of each global batch of ``sampler``: items ``rank, rank + world, ...`` of it, so the
    ranks together see exactly the batches one process sees."""

    def __init__(self, sampler, batch_size: int, rank: int, world: int):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        batch = []
        for key in self.sampler:
            batch.append(key)
            if len(batch) == self.batch_size:
                yield batch[self.rank::self.world]
                batch = []
        if batch:
            yield batch[self.rank::self.world]


def _resume(s: _Setup) -> None:
    """Restore model, optimizer, scheduler, EMA, RNG and the resume state from the checkpoint, if it fits."""
    ckpt = _load_checkpoint(s.ckpt_path, s.key)
    if ckpt is None:
        return
    s.model.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    if s.ema is not None and ckpt.get("ema") is not None:
        s.ema.module.load_state_dict(ckpt["ema"])
    _set_rng_state(ckpt["rng"])
    s.start_epoch, s.start_step, s.history = ckpt["epoch"], ckpt.get("step", 0), ckpt["history"]
    s.train_time, s.images_seen = ckpt["train_time"], ckpt["images_seen"]
    s.acc = ckpt.get("epoch_sums", s.acc)
    where = f"epoch {s.start_epoch}/{s.job.student.epochs}" + (f" + {s.start_step} steps" if s.start_step else "")
    log(f"student: resuming from {s.ckpt_path} after {where}.")


def _checkpoint(s: _Setup, epoch: int, step: int) -> None:
    """Write ``student/checkpoint.pt`` (rank 0 only): training stands at ``step`` steps into ``epoch``."""
    if not is_main():
        return
    _save_checkpoint(s.ckpt_path, {
        "key": s.key, "epoch": epoch, "step": step, "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
        "ema": s.ema.module.state_dict() if s.ema is not None else None, "rng": _rng_state(),
        "history": s.history, "train_time": s.train_time, "images_seen": s.images_seen,
        "epoch_sums": dict(s.acc), "world_size": s.world_size,
    })
    kill_hook(epoch * s.steps_per_epoch + step)


def _fit(s: _Setup, progress: bool) -> None:
    """The epoch loop from where ``s`` stands to ``student.epochs``, with step and epoch-end checkpoints;
    updates ``s`` (history, train time, images seen) as it goes."""
    from tqdm.auto import tqdm

    from .mix import mix_batch

    cfg, seed, device = s.job.student, s.job.seed, s.device
    bar = tqdm(total=s.total_steps, initial=s.start_epoch * s.steps_per_epoch + s.start_step, desc="student",
               unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for epoch in range(s.start_epoch, cfg.epochs):
        s.model.train()
        first = s.start_step if epoch == s.start_epoch else 0
        if first == 0:
            s.acc = _epoch_sums()
        s.sampler.set_epoch(epoch, first)
        # Loss sums stay on the device; the host reads them every few steps (no per-step sync).
        loss_dev = torch.zeros((), device=device)
        weight_dev = torch.zeros((), device=device)
        t0 = time.perf_counter()
        step = first
        images_dev = 0
        for x, labels, soft, weights, soft_temp, *target in s.loader:
            x = s.normalize(x.to(device, non_blocking=True))  # uint8 (B, 3, H, W) -> normalised float
            labels = labels.to(device, non_blocking=True)
            soft, weights = soft.to(device, non_blocking=True), weights.to(device, non_blocking=True)
            soft_temp = soft_temp.to(device, non_blocking=True)  # (B,) the temperature each soft target was written at
            x, perm, lam = mix_batch(x, seed, epoch, step, cfg.mixup, cfg.cutmix)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.use_amp):
                logits = s.forward(x)  # (B, C)
            if s.head is not None:  # student.head=embedding: logits are the (B, D) embedding
                loss = s.head.loss(logits, target[0].to(device, non_blocking=True), soft, labels, weights, soft_temp,
                                   perm, lam, cfg)
            else:
                loss = distillation_loss(logits, soft, labels, weights, temperature=cfg.temperature,
                                         alpha=cfg.distill_alpha, target_temperature=soft_temp)
            if perm is not None and s.head is None:
                loss = lam * loss + (1.0 - lam) * distillation_loss(
                    logits, soft[perm], labels[perm], weights[perm], temperature=cfg.temperature,
                    alpha=cfg.distill_alpha, target_temperature=soft_temp[perm])
            s.optimizer.zero_grad(set_to_none=True)
            if s.world_size > 1:
                # DDP averages gradients over ranks; scaled by (rank's weight / mean weight per rank), that average
                # is the gradient of the global batch's weighted mean loss, as in one process.
                w_all = all_reduce_sum(weights.sum().detach().clone())
                (loss * (weights.sum().detach() * s.world_size / w_all.clamp_min(1e-12))).backward()
            else:
                loss.backward()
            s.optimizer.step()
            s.scheduler.step()
            if s.ema is not None:
                s.ema.update(s.model, step=epoch * s.steps_per_epoch + step + 1)
            w = weights.sum()
            loss_dev += loss.detach() * w
            weight_dev += w
            s.acc["images"] += x.shape[0]
            images_dev += x.shape[0]  # this rank's images since the last sync (all ranks' are summed there)
            step += 1
            bar.update(1)
            last = step == s.steps_per_epoch
            checkpoint_now = cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 and not last
            if step % _SYNC_EVERY == 0 or last or checkpoint_now:
                if s.world_size > 1:  # every rank reaches the same sync points; sum what all ranks saw
                    sums = all_reduce_sum(torch.stack([loss_dev, weight_dev, torch.tensor(
                        float(images_dev), device=device)]))
                    loss_dev, weight_dev = sums[0].clone(), sums[1].clone()
                    s.acc["images"] += int(sums[2]) - images_dev
                    images_dev = 0
                s.acc["loss_sum"] += float(loss_dev)
                s.acc["weight_sum"] += float(weight_dev)
                loss_dev.zero_()
                weight_dev.zero_()
                running = s.acc["loss_sum"] / max(s.acc["weight_sum"], 1e-12)
                if not math.isfinite(running):
                    raise FloatingPointError(f"student: loss became {running} at epoch {epoch + 1}; lower student.lr "
                                             f"(now {cfg.lr}) or check the manifest's soft targets.")
                elapsed = s.acc["time"] + time.perf_counter() - t0
                bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{running:.4f}",
                                img_s=f"{s.acc['images'] / max(elapsed, 1e-9):.0f}")
            if checkpoint_now:
                dt = time.perf_counter() - t0
                s.acc["time"] += dt
                s.train_time += dt
                _checkpoint(s, epoch, step)
                t0 = time.perf_counter()
            killpoints.progress("student.step", epoch * s.steps_per_epoch + step)  # testing hook: after step k
        dt = time.perf_counter() - t0
        s.acc["time"] += dt
        s.train_time += dt
        s.images_seen += s.acc["images"]
        s.history.append({"epoch": epoch + 1, "loss": s.acc["loss_sum"] / max(s.acc["weight_sum"], 1e-12),
                          "lr": s.optimizer.param_groups[0]["lr"],
                          "images_per_s": s.acc["images"] / max(s.acc["time"], 1e-9),
                          "eval_top1": _epoch_eval(s)})
        s.acc = _epoch_sums()
        _checkpoint(s, epoch + 1, 0)
        killpoints.progress("student.epoch", epoch + 1)  # after the epoch-end checkpoint
    bar.close()


def _epoch_eval(s: _Setup) -> float | None:
    """Top-1 on data.eval after an epoch (the weights that would be saved: EMA when on), for the report's
    accuracy curve; evaluation only. Forks the RNG so training sees exactly what it would without it."""
    if not s.eval_items or not is_main():  # with several processes rank 0 alone evaluates (and records it)
        return None
    model = s.ema.module if s.ema is not None else s.model
    with torch.random.fork_rng(devices=[]):
        top1 = evaluate(_classifier(s, model), s.eval_items, s.data_config, s.job.class_names, s.device,
                        batch_size=s.job.student.batch_size, workers=s.job.student.workers)["top1"]
    return top1


def _finalize(s: _Setup) -> dict:
    """Save the final (EMA when on) weights and config, evaluate on ``data.eval``, write metrics, confusion
    matrix, report, the resolved job and the stamp (rank 0 writes); returns the metrics."""
    from timm import __version__ as timm_version

    job, cfg, paths = s.job, s.job.student, s.paths
    out_dir, class_names, main = paths.student, job.class_names, is_main()
    final = s.ema.module if s.ema is not None else s.model
    final.eval()
    config = {
        "architecture": s.architecture,
        "num_classes": len(class_names),
        "class_names": class_names,
        "model_args": s.model_args,
        "data_config": s.data_config,
        "weights": "ema" if s.ema is not None else "final",
        "job_hash": s.key,
        "versions": {"torch": torch.__version__, "timm": timm_version},
    }
    if s.head is not None:
        config.update(s.head.config())
    if main:
        _write_weights(paths.student_weights, final)
        if s.head is not None:  # the class text-embedding matrix the export ships beside the model
            config["text_embeddings_sha256"] = s.head.save_text(out_dir, class_names)
        write_json(paths.student_config, config)
        killpoints.progress("student.weights")  # weights written, metrics and stamp not yet

    n = len(s.dataset)
    metrics: dict[str, Any] = {
        "epochs": cfg.epochs,
        "train_loss": s.history[-1]["loss"] if s.history else None,
        "history": s.history,
        "train_images": n,
        "ignored_rows": len(s.rows) - n,
        "wall_time_s": s.train_time,
        "images_per_s": s.images_seen / s.train_time if s.train_time > 0 else None,
        "device": str(s.device),
        "processes": s.world_size,
        "weights": config["weights"],
        "resumed_from_epoch": s.start_epoch or None,
        "resumed_from": {"epoch": s.start_epoch, "step": s.start_step} if (s.start_epoch or s.start_step) else None,
        "eval": None,
    }
    if s.eval_items and main:  # rank 0 alone evaluates
        ev = evaluate(_classifier(s, final), s.eval_items, s.data_config, class_names, s.device, batch_size=cfg.batch_size,
                      workers=cfg.workers)
        metrics["eval"] = {"folder": job.data.eval, **ev}
        if s.ema is not None:  # also the raw weights, to show what the EMA bought
            metrics["eval"]["top1_without_ema"] = evaluate(_classifier(s, s.model), s.eval_items, s.data_config, class_names,
                                                           s.device, batch_size=cfg.batch_size,
                                                           workers=cfg.workers)["top1"]
        if main:
            _write_confusion_png(out_dir / "confusion.png", ev["confusion"], class_names, job.name, s.key)
        log(f"student: top-1 {ev['top1']:.4f} on {ev['images']} images of {job.data.eval}; confusion matrix in "
            f"{out_dir / 'confusion.png'}.")
    if main:
        write_json(paths.student_metrics, metrics)
        _write_report(out_dir / "report.md", metrics, config)
        save_resolved_job(job, out_dir)
        mark_done(out_dir, STAGE, s.key, {"epochs": cfg.epochs, "architecture": s.architecture})
    if main:
        log(f"student: done; final train loss {metrics['train_loss']:.4f}, wrote {out_dir}.")
    return metrics


def _classifier(s: _Setup, model: torch.nn.Module) -> torch.nn.Module:
    """What classifies: the model, or for an embedding head scale * cos(model(x), class text embeddings)."""
    return model if s.head is None else s.head.classifier(model)


def _write_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
