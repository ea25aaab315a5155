"""Student benchmark on real EuroSAT images (issue 5, part 5): distillation quality and trainer speed.

    python -m bench student                                  # CPU defaults (~20 min on 2 cores)
    DISTILLERY_BENCH_DEVICE=cuda python -m bench student     # GPU defaults (~9 min on one H100)
    DISTILLERY_BENCH_LIMIT=20 DISTILLERY_BENCH_EPOCHS=1 python -m bench student   # smoke run

What it measures, in one run:

1. A stand-in teacher (timm ``resnet18`` from scratch, trained by our own trainer) on ``labeled_pool/``
   (3,000 labeled images) writes soft labels ``softmax(z / T)`` for ``train_unlabeled/`` (5,000 images)
   as a ``manifest.parquet`` in the normal format (path, source, sha256, label, soft_target, weight,
   temperature = T, provenance).
2. MobileNetV3-small students are trained on that manifest (a) with distillation
   (``distill_alpha`` 0.9, temperature 4) and (b) with the teacher's hard labels only (``distill_alpha`` 0).
3. A supervised reference (the same MobileNetV3-small) is trained on ``labeled_pool/`` alone.
4. All are measured on ``test/`` (2,000 images): top-1 and images/s (training and evaluation).
5. Training throughput of our trainer (``train_student``, progress bar on, as the CLI runs it) against a
   bare timm/torch loop on the same model, manifest, transforms, loss, batch, input size, workers and
   threads, alternated ``rounds`` times; the ratio uses the best round of each.

Targets (figures, not asserts): distilled student top-1 >= 0.97 x teacher top-1; trainer >= 0.95 x bare loop.

The labels of ``labeled_pool/`` and ``test/`` are read by this benchmark only (teacher / reference training
and evaluation); the students see ``train_unlabeled/`` and the teacher's soft labels, nothing else.

Settings (environment variables; defaults depend on the device, CPU / CUDA):

| variable | meaning | CPU | CUDA |
|---|---|---|---|
| DISTILLERY_EUROSAT | the staged EuroSAT folder (labeled_pool/, train_unlabeled/, test/) | ../shared/data/eurosat, else .benchdata | same |
| DISTILLERY_BENCH_DEVICE | auto, cpu, cuda | auto | |
| DISTILLERY_BENCH_EPOCHS | student epochs (distilled, hard) | 12 | 60 |
| DISTILLERY_BENCH_TEACHER_EPOCHS | teacher and supervised-reference epochs | 8 | 80 |
| DISTILLERY_BENCH_TEACHER | stand-in teacher (timm name) | resnet18 | |
| DISTILLERY_BENCH_STUDENT | student (timm name) | mobilenetv3_small_100 | |
| DISTILLERY_BENCH_INPUT | teacher input size in pixels (square; EuroSAT is 64 px) | 64 | 64 |
| DISTILLERY_BENCH_STUDENT_INPUT | student and reference input size (upsampled when > 64) | INPUT | 128 |
| DISTILLERY_BENCH_BATCH | batch size | 128 | 128 |
| DISTILLERY_BENCH_LR | AdamW learning rate (all models) | 1e-3 | 1e-3 |
| DISTILLERY_BENCH_CROP_MIN | RandomResizedCrop minimum area | 0.25 | 0.25 |
| DISTILLERY_BENCH_ALPHA / _TEMPERATURE | distillation weight and temperature | 0.9 / 4 | |
| DISTILLERY_BENCH_CHANNELS_LAST | NHWC memory format (all models, and the bare loop) | 1 | 1 |
| DISTILLERY_BENCH_EMA | EMA decay of the students (0 = off) | 0 | 0 |
| DISTILLERY_BENCH_MIXUP / _CUTMIX | mixup / CutMix Beta parameters of the students (0 = off) | 0 / 0 | |
| DISTILLERY_BENCH_RANDAUG | timm RandAugment string for the students (empty = off) | | |
| DISTILLERY_BENCH_CACHE | the trainer's decode-once uint8 cache (the bare loop always decodes files) | 1 | 1 |
| DISTILLERY_BENCH_WORKERS | DataLoader workers | 0 | min(8, cpus - 2) |
| DISTILLERY_BENCH_THREADS | torch threads | torch's default | |
| DISTILLERY_BENCH_SPEED_EPOCHS / _ROUNDS / _IMAGES | throughput comparison: epochs per measurement, rounds, manifest rows | 1 / 2 / 1536 | 4 / 2 / all |
| DISTILLERY_BENCH_LIMIT | at most N images per class (labeled, test) and 10 N unlabeled: smoke runs | all | |
| DISTILLERY_BENCH_OUT | run folder (deleted and rebuilt each run) | runs/bench/student | |
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

from ._eurosat import EXTENSIONS, REPO, env, labeled_items, labeled_rows, staged_root, write_manifest


# ----------------------------------------------------------------------------------------------
# Settings and data


def _settings() -> dict:
    import torch

    from distillery.student.train import resolve_device

    device = resolve_device(env("DEVICE", "auto"))
    cuda = device.type == "cuda"
    cpus = os.cpu_count() or 1
    return {
        "data": str(staged_root()),
        "device": str(device),
        "teacher": env("TEACHER", "resnet18"),
        "student": env("STUDENT", "mobilenetv3_small_100"),
        "epochs": env("EPOCHS", 60 if cuda else 12, int),
        "teacher_epochs": env("TEACHER_EPOCHS", 80 if cuda else 8, int),
        "input_size": env("INPUT", 64, int),  # teacher
        "student_input": env("STUDENT_INPUT", 128 if cuda else env("INPUT", 64, int), int),  # students, reference
        "batch_size": env("BATCH", 128, int),
        "lr": env("LR", 1e-3, float),
        "crop_scale": [env("CROP_MIN", 0.25, float), 1.0],
        "distill_alpha": env("ALPHA", 0.9, float),
        "temperature": env("TEMPERATURE", 4.0, float),
        "channels_last": bool(env("CHANNELS_LAST", 1, int)),
        "cache": bool(env("CACHE", 1, int)),
        "ema_decay": env("EMA", 0.0, float),
        "mixup": env("MIXUP", 0.0, float),
        "cutmix": env("CUTMIX", 0.0, float),
        "randaugment": env("RANDAUG", "") or None,
        "workers": env("WORKERS", max(0, min(8, cpus - 2)) if cuda else 0, int),
        "threads": env("THREADS", torch.get_num_threads(), int),
        "speed_epochs": env("SPEED_EPOCHS", 4 if cuda else 1, int),
        "speed_rounds": env("SPEED_ROUNDS", 2, int),
        "speed_images": env("SPEED_IMAGES", 0 if cuda else 1536, int),  # 0 = every manifest row
        "limit": env("LIMIT", 0, int),
        "out": str(Path(env("OUT", "runs/bench/student")).resolve()),
        "seed": 0,
    }


def _classes(root: Path) -> list[str]:
    """Class index = position in the sorted folder names (the dataset README)."""
    return sorted(p.name for p in (root / "labeled_pool").iterdir() if p.is_dir() and not p.name.startswith("."))


def _unlabeled(folder: Path, limit: int) -> list[Path]:
    from distillery.rundir import list_images

    paths = list_images(folder, EXTENSIONS)
    return paths[: 10 * limit] if limit else paths


# ----------------------------------------------------------------------------------------------
# Jobs through the product's own trainer


def _job(s: dict, name: str, classes: list[str], unlabeled: Path, **student):
    from distillery.job import job_from_dict

    raw = {
        "name": name, "seed": s["seed"], "domain": "satellite photo",
        "classes": [{"name": c, "folder": c} for c in classes],
        "data": {"unlabeled": str(unlabeled)},
        "run_dir": str(Path(s["out"]) / name),
        "student": {"model": s["student"], "input_size": s["student_input"], "batch_size": s["batch_size"],
                    "lr": s["lr"], "crop_scale": s["crop_scale"], "workers": s["workers"], "device": s["device"],
                    "amp": True, "pretrained": None, "channels_last": s["channels_last"], "cache": s["cache"],
                    "cache_dir": str(Path(s["out"]) / "cache"), **student},
    }
    return job_from_dict(raw, base=REPO)


def _train(job, rows: list[dict], progress: bool = False) -> tuple[dict, float]:
    from distillery.rundir import RunPaths
    from distillery.student import train_student

    write_manifest(RunPaths(job.run_path).manifest, rows)
    t0 = time.perf_counter()
    metrics = train_student(job, progress=progress)
    return metrics, time.perf_counter() - t0


def _loader(items, transform, s: dict, batch_size: int | None = None):
    import torch
    from torch.utils.data import DataLoader

    from distillery.student.data import ImageListDataset

    return DataLoader(ImageListDataset(items, transform), batch_size=batch_size or 2 * s["batch_size"], shuffle=False,
                      num_workers=s["workers"], pin_memory=torch.device(s["device"]).type == "cuda")


def _evaluate(run_dir: Path, test_items, classes: list[str], s: dict) -> dict:
    """Top-1 on test/ with the product's ``evaluate``, timed (decode + forward, like a user's evaluation)."""
    import torch

    from distillery.student import evaluate, load_student

    model, config = load_student(run_dir / "student", device=s["device"])
    if s["device"].startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ev = evaluate(model, test_items, config["data_config"], classes, s["device"], batch_size=2 * s["batch_size"],
                  workers=s["workers"])
    dt = time.perf_counter() - t0
    return {"top1": ev["top1"], "images": ev["images"], "per_class": ev["per_class"], "eval_images_per_s": ev["images"] / dt}


def _soft_labels(teacher_dir: Path, paths: list[Path], s: dict) -> tuple[list[dict], dict]:
    """The stand-in teacher's softmax(z / T) for every unlabeled image, as manifest rows."""
    import numpy as np
    import torch

    from distillery.rundir import sha256_file
    from distillery.student import load_student
    from distillery.student.data import eval_transform

    model, config = load_student(teacher_dir / "student", device=s["device"])
    loader = _loader([(p, 0) for p in paths], eval_transform(config["data_config"]), s)
    t0 = time.perf_counter()
    probs = []
    with torch.no_grad():
        for x, _ in loader:
            logits = model(x.to(s["device"])).float()
            probs.append(torch.softmax(logits / s["temperature"], dim=1).cpu().numpy())
    probs = np.concatenate(probs).astype(np.float32)
    dt = time.perf_counter() - t0
    probs /= probs.sum(axis=1, keepdims=True)  # exact float32 normalisation for the manifest check
    labels = probs.argmax(axis=1)
    prov = f"bench: {config['architecture']} stand-in teacher on labeled_pool, softmax(z/{s['temperature']:g})"
    rows = [{"path": str(p), "source": "real", "sha256": sha256_file(p), "label": int(y), "soft_target": pr.tolist(),
             "weight": 1.0, "temperature": s["temperature"], "provenance": prov}  # the T of softmax(z / T)
            for p, y, pr in zip(paths, labels, probs)]
    counts = np.bincount(labels, minlength=probs.shape[1])
    info = {"images": len(paths), "images_per_s": len(paths) / dt, "mean_max_prob": float(probs.max(axis=1).mean()),
            "label_counts": counts.tolist()}
    return rows, info


# ----------------------------------------------------------------------------------------------
# Bare timm/torch loop (the throughput yardstick)


class _BareDataset:
    """PIL decode + transform per item; the plain PyTorch way (no distillery code)."""

    def __init__(self, rows, transform):
        import torch

        self.paths = [r["path"] for r in rows]
        self.labels = torch.tensor([r["label"] for r in rows])
        self.soft = torch.tensor([r["soft_target"] for r in rows], dtype=torch.float32)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        return self.transform(img), self.labels[i], self.soft[i]


def _bare_loop(rows: list[dict], num_classes: int, s: dict, epochs: int) -> dict:
    """A textbook timm training loop: same model, transforms, loss, batch, workers, threads and AMP as the trainer."""
    import timm
    import torch
    import torch.nn.functional as F
    from timm.data import resolve_data_config
    from timm.data.transforms import str_to_interp_mode
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    t_start = time.perf_counter()
    device = torch.device(s["device"])
    torch.manual_seed(s["seed"])
    memory_format = torch.channels_last if s["channels_last"] else torch.contiguous_format
    model = timm.create_model(s["student"], pretrained=False, num_classes=num_classes).to(device, memory_format=memory_format)
    dc = resolve_data_config({"input_size": (3, s["student_input"], s["student_input"])}, model=model)
    transform = T.Compose([
        T.RandomResizedCrop(dc["input_size"][1:], scale=tuple(s["crop_scale"]), interpolation=str_to_interp_mode(dc["interpolation"])),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(dc["mean"], dc["std"]),
    ])
    loader = DataLoader(_BareDataset(rows, transform), batch_size=s["batch_size"], shuffle=True,
                        num_workers=s["workers"], pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(loader) * epochs)
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    alpha, tau = s["distill_alpha"], s["temperature"]
    loop_time, images = 0.0, 0
    model.train()
    for _ in range(epochs):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for x, y, p in loader:
            x, y, p = x.to(device, non_blocking=True), y.to(device, non_blocking=True), p.to(device, non_blocking=True)
            x = x.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            logits = logits.float()
            loss = (alpha * tau * tau * F.kl_div(F.log_softmax(logits / tau, dim=1), p, reduction="batchmean")
                    + (1 - alpha) * F.cross_entropy(logits, y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            images += x.shape[0]
        final_loss = float(loss_sum)  # one sync per epoch
        loop_time += time.perf_counter() - t0
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"bare loop: loss became {final_loss}")
    return {"images_per_s": images / loop_time, "loop_s": loop_time, "wall_s": time.perf_counter() - t_start,
            "images": images}


def _speed(rows: list[dict], classes: list[str], unlabeled: Path, s: dict) -> dict:
    """Our trainer vs the bare loop, alternated; best round of each."""
    rows = rows[: s["speed_images"]] if s["speed_images"] else rows
    ours, bare = [], []
    for r in range(s["speed_rounds"]):
        job = _job(s, f"speed-{r}", classes, unlabeled, epochs=s["speed_epochs"], weight_decay=0.1,
                   distill_alpha=s["distill_alpha"], temperature=s["temperature"])
        metrics, wall = _train(job, rows, progress=True)  # as the CLI runs it: progress bar on
        ours.append({"images_per_s": metrics["images_per_s"], "loop_s": metrics["wall_time_s"], "wall_s": wall})
        bare.append(_bare_loop(rows, len(classes), s, s["speed_epochs"]))
        print(f"  speed round {r + 1}/{s['speed_rounds']}: trainer {ours[-1]['images_per_s']:.0f} img/s, "
              f"bare loop {bare[-1]['images_per_s']:.0f} img/s", flush=True)
    best_ours = max(o["images_per_s"] for o in ours)
    best_bare = max(b["images_per_s"] for b in bare)
    wall_ours = min(o["wall_s"] for o in ours)
    wall_bare = min(b["wall_s"] for b in bare)
    return {"images": len(rows), "epochs": s["speed_epochs"], "rounds": len(ours), "trainer": ours, "bare": bare,
            "trainer_images_per_s": best_ours, "bare_images_per_s": best_bare, "ratio": best_ours / best_bare,
            "ratio_wall": wall_bare / wall_ours}


# ----------------------------------------------------------------------------------------------


def main() -> dict:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = _settings()
    torch.set_num_threads(s["threads"])
    out = Path(s["out"])
    if out.exists():
        shutil.rmtree(out)  # every run re-measures (the trainer's stamps would otherwise skip the work)
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    root = Path(s["data"])
    classes = _classes(root)
    k = len(classes)
    labeled = labeled_items(root / "labeled_pool", classes, s["limit"])
    test = labeled_items(root / "test", classes, s["limit"])
    unlabeled_dir = root / "train_unlabeled"
    unlabeled = _unlabeled(unlabeled_dir, s["limit"])
    dev = s["device"]
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else ""
    print(f"student bench: {len(labeled)} labeled, {len(unlabeled)} unlabeled, {len(test)} test images from {root}; "
          f"device {dev} {gpu}; {s['threads']} threads, {s['workers']} workers; input {s['input_size']} px (teacher), "
          f"{s['student_input']} px (students), "
          f"batch {s['batch_size']}, lr {s['lr']:g}, crop scale {s['crop_scale']}; epochs: teacher/reference "
          f"{s['teacher_epochs']}, students {s['epochs']}"
          + (f"; LIMIT {s['limit']} per class (smoke run)" if s["limit"] else ""), flush=True)

    results: dict = {"settings": s, "device_name": gpu or "cpu", "models": {}}
    truth_rows = labeled_rows(labeled, k, "bench: labeled_pool ground truth (one-hot)")

    def run(role: str, model: str, data: str, rows: list[dict], epochs: int, **student) -> None:
        # the job's data folder is where its manifest's images are (the trainer refuses rows from elsewhere)
        folder = root / "labeled_pool" if data.startswith("labeled_pool") else unlabeled_dir
        job = _job(s, role, classes, folder, model=model, epochs=epochs, **student)
        metrics, wall = _train(job, rows)
        ev = _evaluate(Path(job.run_path), test, classes, s)
        results["models"][role] = {"model": model, "data": data, "input": student.get("input_size", s["student_input"]),
                                   "epochs": epochs, "train_images": metrics["train_images"],
                                   "top1": ev["top1"], "train_images_per_s": metrics["images_per_s"],
                                   "eval_images_per_s": ev["eval_images_per_s"], "train_s": wall,
                                   "final_loss": metrics["train_loss"], "per_class": ev["per_class"], **student}
        print(f"  {role}: top-1 {ev['top1']:.4f}, {metrics['images_per_s']:.0f} train img/s, {wall:.0f}s", flush=True)

    # (1) stand-in teacher on labeled_pool, then its soft labels for train_unlabeled
    run("teacher", s["teacher"], "labeled_pool (labels)", truth_rows, s["teacher_epochs"], weight_decay=0.3,
        input_size=s["input_size"])
    soft_rows, soft_info = _soft_labels(out / "teacher", unlabeled, s)
    results["soft_labels"] = soft_info
    print(f"  soft labels: {len(soft_rows)} images at {soft_info['images_per_s']:.0f} img/s, mean max prob "
          f"{soft_info['mean_max_prob']:.3f} (T={s['temperature']:g}), hard-label counts {soft_info['label_counts']}",
          flush=True)
    write_manifest(out / "teacher_manifest.parquet", soft_rows)  # the manifest the students share, for inspection
    # (2) students on that manifest: distillation vs hard labels only
    recipe = {"ema_decay": s["ema_decay"], "mixup": s["mixup"], "cutmix": s["cutmix"], "randaugment": s["randaugment"]}
    run("student-distilled", s["student"], f"train_unlabeled (teacher soft, a={s['distill_alpha']:g}, "
        f"T={s['temperature']:g})", soft_rows, s["epochs"], distill_alpha=s["distill_alpha"], temperature=s["temperature"],
        **recipe)
    run("student-hard", s["student"], "train_unlabeled (teacher hard labels)", soft_rows, s["epochs"], distill_alpha=0.0,
        **recipe)
    # (3) supervised reference on labeled_pool alone
    run("reference", s["student"], "labeled_pool (labels)", truth_rows, s["teacher_epochs"], distill_alpha=0.0)
    # (4) trainer vs bare loop
    speed = _speed(soft_rows, classes, unlabeled_dir, s)
    results["speed"] = speed

    m = results["models"]
    ratio_kd = m["student-distilled"]["top1"] / max(m["teacher"]["top1"], 1e-12)
    results["targets"] = {
        "distilled_vs_teacher": {"ratio": ratio_kd, "target": 0.97, "met": ratio_kd >= 0.97},
        "trainer_vs_bare": {"ratio": speed["ratio"], "target": 0.95, "met": speed["ratio"] >= 0.95},
    }
    results["wall_s"] = time.perf_counter() - t_start

    print()
    header = (f"{'role':<18} {'model':<22} {'data':<46} {'px':>4} {'epochs':>6} {'top-1':>7} {'train img/s':>11} "
              f"{'eval img/s':>10} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for role, r in m.items():
        print(f"{role:<18} {r['model']:<22} {r['data']:<46} {r['input']:>4} {r['epochs']:>6} {r['top1']:>7.4f} "
              f"{r['train_images_per_s']:>11.0f} {r['eval_images_per_s']:>10.0f} {r['train_s']:>7.0f}")
    print()
    print(f"throughput ({s['student']}, {speed['images']} images x {speed['epochs']} epochs, best of {speed['rounds']}, "
          f"batch {s['batch_size']}, {s['student_input']} px, {s['workers']} workers, {s['threads']} threads, {dev}):")
    print(f"  our trainer {speed['trainer_images_per_s']:.0f} img/s, bare timm loop {speed['bare_images_per_s']:.0f} img/s "
          f"-> ratio {speed['ratio']:.3f} (end-to-end wall ratio {speed['ratio_wall']:.3f})")
    print()
    for name, t in results["targets"].items():
        print(f"target {name}: {t['ratio']:.4f} (>= {t['target']}) {'MET' if t['met'] else 'NOT MET'}")
    note = " (SMOKE: LIMITED DATA, figures meaningless)" if s["limit"] else ""
    print(f"student bench wall time {results['wall_s']:.0f}s on {dev}{note}")
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2, default=str))
    sys.exit(0)
