"""Synthesis benchmark (issue 4): the tiny models' synthesis speed on this machine, the dry run's estimate
against the measured time, and the domain LoRA's share of trainable parameters.

    python -m bench synth

* synthesis: the tiny job's 10 EuroSAT classes x 4 images, 10 DDIM steps at 64 px, batch 20 (as
  ``examples/eurosat-tiny.yaml``), through ``run_synth`` itself: images/s and UNet evaluations/s
  (a guided image step is 2 evaluations);
* LoRA training: optimizer steps/s of ``run_lora`` at batch 4, 64 px;
* dry run: ``distillery teacher --dry-run``'s estimate per stage, taken just before the measured run;
* trainable share: tiny UNet and Stable Diffusion 1.5's UNet layout (built on the meta device, no weights).

The tiny models are random: the speed figures are this machine's, the images are noise. Torch threads
are reported because on a shared 2-core machine spinning OpenMP threads can cost 10x.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["annual crop land", "forest", "herbaceous vegetation land", "highway or road", "industrial buildings",
           "pasture land", "permanent crop land", "residential buildings", "river", "sea or lake"]


def _job(models: dict, run_dir: Path, lora_steps: int):
    from distillery.job import job_from_dict

    raw = {"name": "bench-synth", "seed": 0, "domain": "satellite photo", "classes": CLASSES,
           "data": {"unlabeled": str(REPO / "examples/data/eurosat-sample/unlabeled")}, "run_dir": str(run_dir),
           "models": {k: str(v) for k, v in models.items()},
           "teacher": {"lora": {"steps": lora_steps, "batch_size": 4},
                       "synth": {"tricks": ["base"], "images_per_class": 4, "steps": 10, "resolution": 64,
                                 "output_size": 64, "batch_size": 20, "device": "cpu"}}}
    return job_from_dict(raw, base=REPO)


def main() -> dict:
    import torch

    from distillery.teacher import dry_run, lora, synth
    from distillery.tiny import build_tiny_models

    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        tmp = Path(tmp)
        models = build_tiny_models(tmp / "models")
        job = _job(models, tmp / "run", lora_steps=20)
        buf = io.StringIO()
        est = {r["stage"]: r for r in dry_run(job, out=buf)}
        print(buf.getvalue().rstrip())
        assert not job.run_path.exists()

        t0 = time.perf_counter()
        lo = lora.run_lora(job, progress=False)
        lora_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sy = synth.run_synth(job, progress=False)
        synth_s = time.perf_counter() - t0
        gen_s = sy["seconds"]  # model load + generation + writing the files (no table/grid)

    sd15 = lora.sd15_trainable_share(rank=8, alpha=8)
    n = sy["generated"]
    res = {
        "torch_threads": torch.get_num_threads(),
        "synth_images": n,
        "synth_steps": job.teacher.synth.steps,
        "synth_seconds": round(synth_s, 2),
        "synth_images_per_s": round(n / gen_s, 3),
        "synth_unet_evals_per_s": round(sy["unet_evals"] / gen_s, 1),
        "synth_estimate_s": round(est["synth"]["estimate_s"], 2),
        "synth_estimate_over_measured": round(est["synth"]["estimate_s"] / synth_s, 2),
        "lora_steps": lo["steps"],
        "lora_seconds": round(lora_s, 2),
        "lora_steps_per_s": round(lo["steps"] / lo["train_seconds"], 2),
        "lora_estimate_s": round(est["lora"]["estimate_s"], 2),
        "lora_estimate_over_measured": round(est["lora"]["estimate_s"] / lora_s, 2),
        "lora_share_tiny": lo["trainable_share"],
        "lora_params_tiny": lo["trainable_params"],
        "lora_share_sd15_r8": sd15["trainable_share"],
        "lora_params_sd15_r8": sd15["trainable_params"],
        "unet_params_sd15": sd15["unet_params"],
    }
    print(f"\n{'figure':<34} value")
    rows = [
        ("synthesis images/s (tiny, 64 px)", f"{res['synth_images_per_s']:.2f}  ({n} images, {res['synth_steps']} steps)"),
        ("synthesis UNet evals/s", f"{res['synth_unet_evals_per_s']:.0f}"),
        ("synth dry-run estimate / measured", f"{res['synth_estimate_s']:.1f}s / {res['synth_seconds']:.1f}s "
                                              f"= {res['synth_estimate_over_measured']:.2f}"),
        ("LoRA steps/s (batch 4, 64 px)", f"{res['lora_steps_per_s']:.2f}"),
        ("lora dry-run estimate / measured", f"{res['lora_estimate_s']:.1f}s / {res['lora_seconds']:.1f}s "
                                             f"= {res['lora_estimate_over_measured']:.2f}"),
        ("LoRA trainable share, tiny UNet", f"{res['lora_share_tiny']:.3%} ({res['lora_params_tiny']:,} params)"),
        ("LoRA trainable share, SD 1.5 r=8", f"{res['lora_share_sd15_r8']:.3%} ({res['lora_params_sd15_r8']:,} of "
                                             f"{res['unet_params_sd15']:,})"),
        ("torch threads", f"{res['torch_threads']} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"),
    ]
    for k, v in rows:
        print(f"{k:<34} {v}")
    return res
