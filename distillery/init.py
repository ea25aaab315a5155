"""``distillery init``: a commented job file for your own class names and image folders.

    distillery init --classes "forest=Forest,river=River,sea or lake=SeaLake" \\
        --unlabeled examples/data/eurosat-sample/unlabeled --eval examples/data/eurosat-sample/eval \\
        --domain "satellite photo" --out my-job.yaml

Every path in the written file is absolute, so the job runs from any folder. The model roles point at the
tiny offline models (built into ``models/tiny`` of this checkout, or ``~/.cache/distillery/tiny-models``, when
missing) with settings that run in a minute on a CPU, or with ``--real`` at the real hub models with settings
for a GPU machine. A class is ``name`` or ``name=Folder`` (``Folder``: its folder in the evaluation set; without
it the folder whose name matches the class, ignoring case, spaces and punctuation, is taken).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

__all__ = ["add_arguments", "run", "job_text", "parse_classes", "tiny_models_folder"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--classes", required=True, metavar="LIST",
                   help='comma-separated class names, each optionally name=EvalFolder, e.g. "cat,dog" or '
                        '"sea or lake=SeaLake,forest=Forest"')
    p.add_argument("--unlabeled", required=True, metavar="DIR",
                   help="folder of unlabeled images (searched recursively)")
    p.add_argument("--eval", metavar="DIR", help="optional labeled folder (one subfolder per class); evaluation only")
    p.add_argument("--domain", help='domain phrase used in prompts, e.g. "satellite photo" (default: none)')
    p.add_argument("--name", help="job name = run folder runs/<name> (default: the --out file's name)")
    p.add_argument("--out", required=True, metavar="FILE", help="job file to write, e.g. my-job.yaml")
    p.add_argument("--real", action="store_true",
                   help="real models from the hub (Stable Diffusion 1.5, OpenCLIP ViT-B-32, BLIP, ResNet-18) and "
                        "GPU-sized settings, instead of the tiny offline models")
    p.add_argument("--tiny-models", metavar="DIR", help="where the tiny models are (built there if missing)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def parse_classes(text: str, eval_dir: str | os.PathLike | None = None) -> list[dict]:
    """``"a,b=B"`` -> ``[{"name": "a", "folder": ...}, {"name": "b", "folder": "B"}]``; with ``eval_dir`` every
    class gets the evaluation subfolder it names or whose name matches it; a missing one is an error."""
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        name, _, folder = part.partition("=")
        name, folder = name.strip(), folder.strip() or None
        if not name:
            raise ValueError(f"--classes: empty class name in {part!r}; write name or name=Folder.")
        out.append({"name": name, "folder": folder})
    if len(out) < 2:
        raise ValueError(f"--classes: need at least 2 classes, got {len(out)} from {text!r} (comma-separated).")
    dup = {c["name"] for c in out if sum(d["name"] == c["name"] for d in out) > 1}
    if dup:
        raise ValueError(f"--classes: {', '.join(sorted(dup))} given twice.")
    if eval_dir is not None:
        subs = sorted(p.name for p in Path(eval_dir).iterdir() if p.is_dir())
        for c in out:
            if c["folder"] is not None:
                if c["folder"] not in subs:
                    raise ValueError(f"--classes: folder {c['folder']!r} of class {c['name']!r} is not in {eval_dir} "
                                     f"(it has {', '.join(subs) or 'no folders'}).")
                continue
            match = [s for s in subs if _norm(s) == _norm(c["name"])]
            if not match:
                raise ValueError(f"--classes: no folder of {eval_dir} matches class {c['name']!r} (it has "
                                 f"{', '.join(subs) or 'no folders'}); write it as {c['name']}=FOLDER.")
            c["folder"] = match[0]
        extra = [s for s in subs if s not in {c["folder"] for c in out}]
        if extra:
            raise ValueError(f"--eval: sub-folder(s) {', '.join(extra)} of {eval_dir} match no class (the student's "
                             "evaluation refuses them); add those classes, or point --eval at a folder holding only "
                             "the classes' sub-folders.")
    return out


def tiny_models_folder() -> Path:
    """``models/tiny`` of this checkout when distillery runs from one, else ``~/.cache/distillery/tiny-models``."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "Makefile").is_file() and (repo / "distillery" / "tiny_configs").is_dir():
        return repo / "models" / "tiny"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "distillery" / "tiny-models"


def _q(s) -> str:
    """A YAML scalar: JSON strings are valid YAML."""
    return json.dumps(s, ensure_ascii=False)


REAL_MODELS = {
    "diffusion": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "clip": "ViT-B-32/laion2b_s34b_b79k",
    "captioner": "Salesforce/blip-image-captioning-base",
    "expert": "resnet18.a1_in1k",
}

TINY_SETTINGS = """\
teacher:
  lora:   # domain LoRA on the unlabeled images (a real run uses ~1000 steps)
    steps: 20
    batch_size: 4
  synth:  # synthetic images per class and trick (SPEC §1 tricks: base, class_prompt, multi_domain, random_guidance)
    tricks: [base, class_prompt, multi_domain, random_guidance]
    images_per_class: 4
    steps: 10
    resolution: 64
    output_size: 64
    batch_size: 20
  air:      # AiR: prototypes from the synthetic images + prompt learning
    k: 4
    epochs: 5
  latte:    # LaTTe-CLIP: captioner descriptions + prototype fine-tuning of CLIP
    enabled: true
    epochs: 1
    max_new_tokens: 8
    use_group_descriptions: false
  vermouth: # Vermouth: diffusion-UNet features + a small head
    resolution: 64
    head_width: 32
    epochs: 5
  ensemble:
    weights: {}   # {} = learned without labels from how the teachers agree
student:
  model: mobilenetv3_small_050   # any timm model name
  input_size: 64
  epochs: 2
  batch_size: 32
  lr: 0.001
export:
  formats: [fp32, fp16, int8]
  required: [fp32]      # only fp32 must pass its parity gate
  int8_qat_epochs: 1
  int8_qat_images: 64
"""

REAL_SETTINGS = """\
teacher:
  lora:   # SPEC §2: r=8, 1-2k steps at the synthesis resolution
    steps: 1000
    batch_size: 4
    mixed_precision: bf16
  synth:
    tricks: [all]           # all = base, multi_domain, random_guidance (+ class_prompt when no domain is set)
    images_per_class: 120   # per trick
    steps: 40
    resolution: 512
    output_size: 224
    batch_size: 16
  air:
    epochs: 50
    batch_size: 64
  latte:
    enabled: true
  ensemble:
    weights: {}   # {} = learned without labels from how the teachers agree
student:
  model: mobilenetv3_small_100   # any timm model name
  input_size: 224
  epochs: 100
  batch_size: 128
  lr: 0.0002
  distill_alpha: 0.9
  temperature: 2
export:
  formats: [fp32, fp16, int8]
  required: [fp32]
"""


def job_text(name: str, classes: list[dict], unlabeled: str, eval_dir: str | None, domain: str | None,
             models: dict[str, str], real: bool) -> str:
    lines = [
        f"# distillery job {name!s}: written by `distillery init`; edit freely.",
        "# Run it from any folder:  distillery teacher --job THIS.yaml && distillery student --job THIS.yaml "
        "&& distillery export --job THIS.yaml",
        "# (or `make teacher student export JOB=THIS.yaml`); <run_dir>/report.html shows every stage.",
        "# Every key is a field of a dataclass in distillery/job.py; any of them can be overridden as key=value.",
        f"name: {_q(name)}",
        f"run_dir: {_q('runs/' + name)}   # relative to this file's folder, whatever folder you run from; the run "
        "folder can be moved or copied",
        "seed: 0",
        f"domain: {_q(domain) if domain else 'null'}   # a phrase used in prompts, e.g. \"satellite photo\"; "
        "null = none",
        "classes:   # name: as used in prompts; folder: its folder in data.eval",
    ]
    for c in classes:
        lines.append(f"  - {{name: {_q(c['name'])}" + (f", folder: {_q(c['folder'])}}}" if c.get("folder") else "}"))
    lines += [
        "data:",
        f"  unlabeled: {_q(unlabeled)}   # no labels needed",
        f"  eval: {_q(eval_dir) if eval_dir else 'null'}   # optional labeled folder (a subfolder per class); "
        "evaluation only",
        "models:   " + ("# real models: hub ids (cached by Hugging Face), or local folders" if real else
                        "# the tiny random models (offline, CPU): the machinery runs, the labels are noise; "
                        "`distillery init --real` for real ones"),
    ]
    lines += [f"  {role}: {_q(ref)}" for role, ref in models.items()]
    lines.append(REAL_SETTINGS if real else TINY_SETTINGS)
    return "\n".join(lines)


def run(args) -> int:
    from .job import JobError, load_job
    from .rundir import list_images

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"--out: {out} exists; pass --force to overwrite it.")
    unlabeled = Path(args.unlabeled).expanduser().resolve()
    if not unlabeled.is_dir():
        raise FileNotFoundError(f"--unlabeled: {unlabeled} is not a folder.")
    n = len(list_images(unlabeled))
    if n == 0:
        raise ValueError(f"--unlabeled: no images in {unlabeled} (looked for .jpg, .png, .webp, ... recursively).")
    eval_dir = None
    if args.eval:
        eval_dir = Path(args.eval).expanduser().resolve()
        if not eval_dir.is_dir():
            raise FileNotFoundError(f"--eval: {eval_dir} is not a folder.")
    classes = parse_classes(args.classes, eval_dir)
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]+", "-", out.stem).strip("-") or "job"
    if args.real:
        models = dict(REAL_MODELS)
    else:
        from .tiny import build_tiny_models

        folder = Path(args.tiny_models).expanduser().resolve() if args.tiny_models else tiny_models_folder()
        models = {role: str(Path(p).resolve()) for role, p in build_tiny_models(folder).items()}
    text = job_text(name, classes, str(unlabeled), str(eval_dir) if eval_dir else None, args.domain, models,
                    args.real)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    try:
        load_job(out)
    except JobError as e:
        raise ValueError(f"the written job {out} does not validate: {e}") from e
    print(f"wrote {out}: {len(classes)} classes, {n} unlabeled images in {unlabeled}"
          + (f", evaluation folder {eval_dir}" if eval_dir else "")
          + ("; real models (hub ids)" if args.real else f"; tiny models in {Path(models['clip']).parent}"))
    print(f"next: distillery teacher --job {out} && distillery student --job {out} && distillery export --job {out}")
    return 0
