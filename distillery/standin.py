"""The stand-in world: small models trained here so that teacher methods have something to close.

No pretrained weights reach these machines, so nothing would show whether a teacher method (AiR,
LaTTe-CLIP, Vermouth) gives better pseudo-labels than CLIP zero-shot. ``distillery standin`` builds
stand-ins for the pretrained roles from **labeled** EuroSAT images seen through a *source-domain
transform* S (:func:`source_transform`): the models learn on S-images, like web photos, and meet real
Sentinel-2 tiles only as an unlabeled target domain, where their zero-shot is weak, as real CLIP ViT-B/32's
is on EuroSAT (~42%).

**Label use.** This command (and the benchmarks) are the only code that reads labels:
``<data>/labeled_pool/<Class>/*.jpg``, 300 images per class. The label-free pipeline never does. Per
class the 300 files are split, deterministically (seeded), into 180 *pretraining* images (stand-in CLIP
and expert are trained on S of them) and 120 *generator* images (written as S-images in place of a
text-to-image generator, and used as held-out images to calibrate the CLIP's zero-shot, real vs S).
``test/`` is never read here.

Output (``--out``, default ``models/standin``), each in its library's own local layout:

    clip/             open_clip_config.json + open_clip_model.safetensors -> distillery.models.load_clip
    expert/           config.json + model.safetensors (timm resnet18, num_classes 0) -> load_expert
    generator/<i>-<slug>/*.png   S(generator images), 120 per class: the "base" generator (source style)
    generator.parquet path, class_index, class_name, sha256, source, provenance
    generator_adapted/, generator_adapted.parquet   the same images through S at half strength: the "adapted"
                      generator, standing in for a domain-LoRA-adapted one (never the untransformed images)
    standin.json      settings, calibration figures, timings
    .standin.stamp.json  the content hash the folder was built from: rebuilt only when it changes

The stand-ins' figures say whether a method *works* (closes some of the gap S opened); they are not the
papers' numbers.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .rundir import log, sha256_file

CONFIG_DIR = Path(__file__).parent / "standin_configs"
VERSION = "1"  # bump when the build changes, so stale folders are rebuilt
STAMP = ".standin.stamp.json"
EXTENSIONS = (".jpg", ".jpeg", ".png")

# The EuroSAT folders (class index = sorted position) and their phrasings: the first is the SPEC §3 name
# (CoOp/ELEVATER) used for zero-shot; the others keep the text tower from becoming a lookup table.
CLASSES: list[tuple[str, list[str]]] = [
    ("AnnualCrop", ["annual crop land", "farmland with annual crops", "cultivated fields"]),
    ("Forest", ["forest", "woodland", "dense trees"]),
    ("HerbaceousVegetation", ["herbaceous vegetation land", "grassland and shrubs", "wild vegetation"]),
    ("Highway", ["highway or road", "a motorway", "a road through the land"]),
    ("Industrial", ["industrial buildings", "a factory area", "warehouses"]),
    ("Pasture", ["pasture land", "a grazing meadow", "grass fields for cattle"]),
    ("PermanentCrop", ["permanent crop land", "orchards", "vineyards"]),
    ("Residential", ["residential buildings", "houses in a town", "a housing area"]),
    ("River", ["river", "a stream", "a flowing river"]),
    ("SeaLake", ["sea or lake", "open water", "a lake shore"]),
]
CAPTION_TEMPLATES = [
    "a satellite photo of a {c}.", "a photo of a {c}.", "a photo of {c}.", "an aerial view of {c}",
    "{c} seen from above", "a picture of {c}.", "an overhead image showing {c}", "{c}",
]
ZERO_SHOT_TEMPLATES = ["a satellite photo of a {c}.", "a photo of a {c}."]


# ----------------------------------------------------------------------------------------------
# The source-domain transform S


@dataclass(frozen=True)
class SourceShift:
    """Parameters of S: web-photo-like versions of Sentinel-2 tiles (applied in this order).

    Calibrated (12 CLIP epochs, held-out labeled_pool images): at these values the stand-in CLIP's zero-shot is
    43.8% on real tiles and 70.3% on S-tiles. The gap is steep in S's strength: the colour cast and the
    desaturation carry most of it (blur hardly any); at 1.6x the cast/desaturation (saturation 0.35, contrast
    0.7, gain (1.12, 1, 0.82), offset 18) real fell to 26% (S 67%); at 1.25x real was ~35% (S ~67%, 8 epochs).
    """

    saturation: float = 0.55  # PIL ImageEnhance.Color factor (1 = unchanged, 0 = grey)
    blur: float = 0.8  # Gaussian blur radius in pixels
    contrast: float = 0.8  # PIL ImageEnhance.Contrast factor around the mean grey
    gain: tuple[float, float, float] = (1.06, 1.0, 0.91)  # per-channel multiplier (a warm cast)
    offset: float = 9.0  # added to every channel (lifted blacks), in 0..255 units


SHIFT = SourceShift()


def partial_shift(strength: float, shift: SourceShift = SHIFT) -> SourceShift:
    """S at a fraction of its strength: every parameter moved that fraction of the way from the identity
    (saturation, contrast and gain from 1, blur and offset from 0); 1 = S, 0 = no change."""
    if strength == 1:
        return shift
    return SourceShift(saturation=1 + strength * (shift.saturation - 1), blur=strength * shift.blur,
                       contrast=1 + strength * (shift.contrast - 1),
                       gain=tuple(1 + strength * (g - 1) for g in shift.gain), offset=strength * shift.offset)


# The two generator variants (fixed before any measurement; README "The stand-in world"):
# base    = S(images): a generator whose images are in the source style, as Stable Diffusion's web-photo style is
#           for satellite tiles without adaptation;
# adapted = S at half strength: generated images moved part of the way to the target style, as a domain LoRA
#           trained on the unlabeled target images moves them (AiR: +3.4 to +8 points). Never the untransformed
#           images: those would be labeled target data, not a generator.
GENERATOR_VARIANTS = {"base": 1.0, "adapted": 0.5}


def source_transform(img, shift: SourceShift = SHIFT):
    """S: partial desaturation, Gaussian blur, lower contrast, a warm colour cast and lifted blacks.

    Deterministic (no randomness: the same image gives the same bytes), size and mode (RGB) kept. Real
    Sentinel-2 tiles are saturated, sharp and cool; the stand-ins are trained on S-images, so that real
    tiles are a domain they have not seen, as EuroSAT is for web-trained CLIP.
    """
    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter

    im = img.convert("RGB")
    im = ImageEnhance.Color(im).enhance(shift.saturation)
    if shift.blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(shift.blur))
    im = ImageEnhance.Contrast(im).enhance(shift.contrast)
    a = np.asarray(im, dtype=np.float32) * np.asarray(shift.gain, dtype=np.float32) + shift.offset
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------
# Settings, inputs, stamp


@dataclass
class StandinSettings:
    seed: int = 0
    pretrain_per_class: int = 180  # S-images the CLIP and the expert learn from
    generator_per_class: int = 120  # S-images standing in for a generator; also the held-out calibration set
    clip_epochs: int = 12
    clip_batch: int = 64
    clip_lr: float = 1e-3
    clip_wd: float = 0.1
    clip_jitter: float = 0.0  # colour jitter of the CLIP's training images (robustness to small colour changes)
    expert_epochs: int = 8
    expert_batch: int = 64
    expert_lr: float = 2e-3
    expert_wd: float = 0.05
    threads: int = 1
    clip_config: dict = field(default_factory=dict)  # overrides merged into standin_configs/clip.json (tests)
    expert_config: dict = field(default_factory=dict)  # overrides merged into standin_configs/expert.json


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _config(name: str, overrides: dict) -> dict:
    cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    cfg.pop("_comment", None)
    return _merge(cfg, overrides)


def split_pool(labeled_pool: Path, s: StandinSettings) -> list[dict]:
    """Per class: sorted file names, shuffled with a class-seeded RNG; the first ``pretrain_per_class`` are
    pretraining images, the next ``generator_per_class`` generator images."""
    items = []
    for ci, (folder, names) in enumerate(CLASSES):
        d = labeled_pool / folder
        if not d.is_dir():
            raise FileNotFoundError(f"standin: {str(d)!r} is missing; --data must hold labeled_pool/<Class>/ for the "
                                    f"10 EuroSAT classes ({', '.join(f for f, _ in CLASSES)}).")
        files = sorted(p.name for p in d.iterdir() if p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
        random.Random(f"standin:{s.seed}:{folder}").shuffle(files)
        need = s.pretrain_per_class + s.generator_per_class
        if len(files) < need:
            raise ValueError(f"standin: {str(d)!r} has {len(files)} images, {need} needed per class.")
        for j, name in enumerate(files[:need]):
            items.append({"path": d / name, "class_index": ci, "folder": folder, "class_name": names[0],
                          "part": "pretrain" if j < s.pretrain_per_class else "generator"})
    return items


def build_key(items: list[dict], s: StandinSettings) -> str:
    """Hash of the configs, settings (not the thread count), S's parameters, the code version (``VERSION``) and
    every input image's content."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(s).items() if k != "threads"}
    payload = {"version": VERSION, "settings": settings, "shift": asdict(SHIFT), "classes": CLASSES,
               "captions": CAPTION_TEMPLATES, "zero_shot": ZERO_SHOT_TEMPLATES,
               "clip": _config("clip", s.clip_config), "expert": _config("expert", s.expert_config)}
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    for it in items:
        h.update(f"{it['folder']}/{it['path'].name}:{it['part']}:{sha256_file(it['path'])}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Data in memory


def _load(items: list[dict], shift: bool):
    """uint8 tensor (N, 3, 64, 64) of the images (S applied when ``shift``) and their class indices."""
    import numpy as np
    import torch
    from PIL import Image

    arrs = []
    for it in items:
        with Image.open(it["path"]) as im:
            im = im.convert("RGB")
        if im.size != (64, 64):
            im = im.resize((64, 64), Image.BICUBIC)
        arrs.append(np.asarray(source_transform(im) if shift else im))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([it["class_index"] for it in items])


def _augment(x, g, jitter: float = 0.0):
    """Random 90° rotation, flip and a translation (reflect pad 6, crop back) per image; with ``jitter`` > 0 also
    a per-image, per-channel gain in [1 - jitter, 1 + jitter] and a saturation change by up to ±2·jitter.
    uint8 in, uint8 out."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    out = torch.empty_like(x)
    pad = F.pad(x.float(), (6, 6, 6, 6), mode="reflect").to(torch.uint8)
    r = torch.randint(0, 4, (n,), generator=g)
    f = torch.randint(0, 2, (n,), generator=g)
    dy = torch.randint(0, 13, (n,), generator=g)
    dx = torch.randint(0, 13, (n,), generator=g)
    for i in range(n):
        im = pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        if f[i]:
            im = im.flip(-1)
        out[i] = torch.rot90(im, int(r[i]), (1, 2))
    if jitter > 0:
        xf = out.float()
        gain = 1 + jitter * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
        sat = 1 + 2 * jitter * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
        grey = xf.mean(1, keepdim=True)
        xf = (grey + sat * (xf - grey)) * gain
        out = xf.round().clamp(0, 255).to(torch.uint8)
    return out


def _normalize(x, mean, std):
    import torch

    m = torch.tensor(mean).view(1, 3, 1, 1)
    sd = torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / sd


def _cosine_lr(opt, base: float, step: int, total: int, warmup: int) -> None:
    import math

    lr = base * (step + 1) / warmup if step < warmup else base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for gr in opt.param_groups:
        gr["lr"] = lr


# ----------------------------------------------------------------------------------------------
# Stand-in CLIP


def caption_pool() -> tuple[list[str], list[int]]:
    """Every (template x phrasing) caption and its class index."""
    texts, labels = [], []
    for ci, (_, names) in enumerate(CLASSES):
        for n in names:
            for t in CAPTION_TEMPLATES:
                texts.append(t.format(c=n))
                labels.append(ci)
    return texts, labels


def train_clip(x, y, s: StandinSettings, progress: bool = True, on_epoch=None):
    """open_clip ``CLIP`` from standin_configs/clip.json trained with ``open_clip.loss.ClipLoss`` on
    (augmented S-image, caption) pairs; a caption is drawn per sample from its class's pool."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss
    from tqdm import tqdm

    cfg = _config("clip", s.clip_config)
    torch.manual_seed(s.seed)
    model = open_clip.CLIP(**cfg["model_cfg"])
    tok = open_clip.get_tokenizer("ViT-B-32")  # CLIP's BPE, context 77 (same SimpleTokenizer as local-dir)
    texts, tlabels = caption_pool()
    tokens = tok(texts)
    by_class = [[i for i, c in enumerate(tlabels) if c == k] for k in range(len(CLASSES))]
    pp = cfg["preprocess_cfg"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.clip_wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.clip_lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    g = torch.Generator().manual_seed(s.seed)
    rng = random.Random(s.seed)
    n = len(x)
    steps_per_epoch = max(1, n // s.clip_batch)
    total = steps_per_epoch * s.clip_epochs
    step = 0
    model.train()
    bar = tqdm(total=total, desc="standin clip", unit="step", disable=not progress)
    for epoch in range(s.clip_epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            idx = perm[b * s.clip_batch:(b + 1) * s.clip_batch]
            xb = _normalize(_augment(x[idx], g, s.clip_jitter), pp["mean"], pp["std"])
            cap = [rng.choice(by_class[int(c)]) for c in y[idx]]
            uniq = sorted(set(cap))
            where = {c: i for i, c in enumerate(uniq)}
            _cosine_lr(opt, s.clip_lr, step, total, warmup=max(1, total // 10))
            img_f = model.encode_image(xb, normalize=True)
            txt_f = model.encode_text(tokens[uniq], normalize=True)[torch.tensor([where[c] for c in cap])]
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if on_epoch is not None:  # calibration runs: watch the figures per epoch
            model.eval()
            on_epoch(epoch, model, cfg)
            model.train()
    bar.close()
    model.eval()
    return model, cfg


def zero_shot_top1(model, cfg: dict, x, y, batch: int = 256) -> float:
    """Top-1 of softmax(100 · f·Tᵀ) with the SPEC class names and the two job templates (mean of normalised
    text embeddings, renormalised), on uint8 images ``x``."""
    import open_clip
    import torch

    tok = open_clip.get_tokenizer("ViT-B-32")
    pp = cfg["preprocess_cfg"]
    with torch.no_grad():
        w = []
        for _, names in CLASSES:
            t = model.encode_text(tok([tp.format(c=names[0]) for tp in ZERO_SHOT_TEMPLATES]), normalize=True)
            w.append(torch.nn.functional.normalize(t.mean(0), dim=0))
        w = torch.stack(w)
        correct = 0
        for b in range(0, len(x), batch):
            f = model.encode_image(_normalize(x[b:b + batch], pp["mean"], pp["std"]), normalize=True)
            correct += int(((100.0 * f @ w.T).argmax(1) == y[b:b + batch]).sum())
    return correct / max(1, len(x))


def save_clip(model, cfg: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Stand-in expert


def train_expert(x, y, s: StandinSettings, progress: bool = True):
    """timm resnet18 (with a 10-way head for training) on augmented S-images with cross-entropy."""
    import timm
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg = _config("expert", s.expert_config)
    torch.manual_seed(s.seed)
    args = dict(cfg["model_args"], num_classes=len(CLASSES))
    model = timm.create_model(cfg["architecture"], pretrained=False, **args)
    pc = cfg["pretrained_cfg"]
    opt = torch.optim.AdamW(model.parameters(), lr=s.expert_lr, weight_decay=s.expert_wd)
    g = torch.Generator().manual_seed(s.seed + 1)
    n = len(x)
    steps_per_epoch = max(1, n // s.expert_batch)
    total = steps_per_epoch * s.expert_epochs
    step = 0
    model.train()
    bar = tqdm(total=total, desc="standin expert", unit="step", disable=not progress)
    for _ in range(s.expert_epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            idx = perm[b * s.expert_batch:(b + 1) * s.expert_batch]
            xb = _normalize(_augment(x[idx], g), pc["mean"], pc["std"])
            _cosine_lr(opt, s.expert_lr, step, total, warmup=max(1, total // 20))
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    model.eval()
    return model, cfg


def expert_top1(model, cfg: dict, x, y, batch: int = 256) -> float:
    import torch

    pc = cfg["pretrained_cfg"]
    with torch.no_grad():
        correct = sum(int((model(_normalize(x[b:b + batch], pc["mean"], pc["std"])).argmax(1) == y[b:b + batch]).sum())
                      for b in range(0, len(x), batch))
    return correct / max(1, len(x))


def save_expert(model, cfg: dict, out: Path) -> None:
    """timm's local layout as a feature extractor (num_classes 0): the training head is dropped."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.reset_classifier(0)
    config = {"architecture": cfg["architecture"], "num_classes": 0, "num_features": model.num_features,
              "model_args": dict(cfg["model_args"], num_classes=0), "pretrained_cfg": cfg["pretrained_cfg"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Generator stand-in


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def generator_table(variant: str) -> str:
    """The table of a generator variant: ``generator.parquet`` (base) or ``generator_<variant>.parquet``."""
    if variant not in GENERATOR_VARIANTS:
        raise ValueError(f"standin: unknown generator variant {variant!r}; choose {', '.join(GENERATOR_VARIANTS)}.")
    return "generator.parquet" if variant == "base" else f"generator_{variant}.parquet"


def write_generator(items: list[dict], out: Path, variant: str = "base") -> list[dict]:
    """S(generator images) as PNG under ``generator/<class-index>-<slug>/`` (``generator_<variant>/`` for the other
    variants: S at the variant's strength) and their table rows (:func:`generator_table`)."""
    from PIL import Image

    from .rundir import write_table

    strength = GENERATOR_VARIANTS[variant]
    shift = partial_shift(strength)
    folder = "generator" if variant == "base" else f"generator_{variant}"
    what = "S" if strength == 1 else f"S at {strength:g} strength"
    rows = []
    for it in items:
        rel = Path(folder) / f"{it['class_index']}-{_slug(it['class_name'])}" / (Path(it["path"]).stem + ".png")
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(it["path"]) as im:
            source_transform(im.convert("RGB"), shift).save(dest, format="PNG")
        rows.append({"path": rel.as_posix(), "class_index": it["class_index"], "class_name": it["class_name"],
                     "sha256": sha256_file(dest), "source": f"labeled_pool/{it['folder']}/{Path(it['path']).name}",
                     "provenance": f"standin ({variant} generator): {what}(labeled_pool image), standing in for a "
                                   "text-to-image generator"})
    write_table(out / generator_table(variant), rows)
    return rows


def ensure_generators(items: list[dict], out: Path) -> None:
    """Write every generator variant missing from a built stand-in folder (images only: seconds, no training).
    A variant's table is (re)written when its strength is not the one recorded in ``generators.json``."""
    gen = [it for it in items if it["part"] == "generator"]
    record = out / "generators.json"
    have = json.loads(record.read_text()) if record.is_file() else {}
    for variant, strength in GENERATOR_VARIANTS.items():
        if have.get(variant) == strength and (out / generator_table(variant)).is_file():
            continue
        write_generator(gen, out, variant)
        have[variant] = strength
        log(f"standin: wrote the {variant} generator images ({len(gen)}, S at strength {strength:g})")
    record.write_text(json.dumps(have, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------


def build_standin(out: str | Path = "models/standin", data: str | Path = "../shared/data/eurosat",
                  settings: StandinSettings | None = None, force: bool = False, progress: bool = True) -> dict:
    """Build (once) the stand-in CLIP, expert and generator set into ``out``; returns ``standin.json``'s content.

    Reads ``<data>/labeled_pool`` (labels). A folder whose stamp matches the inputs is kept ("up to date").
    The build happens in a temporary sibling folder that replaces ``out`` only when complete.
    """
    import torch

    s = settings or StandinSettings()
    out = Path(out)
    items = split_pool(Path(data) / "labeled_pool", s)
    key = build_key(items, s)
    stamp = out / STAMP
    if not force and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key \
            and (out / "standin.json").is_file():
        log(f"standin: up to date ({out})")
        ensure_generators(items, out)
        return json.loads((out / "standin.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    t_all = time.perf_counter()
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        pre = [it for it in items if it["part"] == "pretrain"]
        gen = [it for it in items if it["part"] == "generator"]
        log(f"standin: {len(pre)} pretraining + {len(gen)} generator images from {Path(data) / 'labeled_pool'}; "
            f"{s.threads} thread(s)")
        x_pre, y_pre = _load(pre, shift=True)
        x_gen_s, y_gen = _load(gen, shift=True)
        x_gen_r, _ = _load(gen, shift=False)
        timings = {}
        t0 = time.perf_counter()
        clip, clip_cfg = train_clip(x_pre, y_pre, s, progress)
        timings["clip_s"] = time.perf_counter() - t0
        calib = {"images": len(gen), "real_top1": zero_shot_top1(clip, clip_cfg, x_gen_r, y_gen),
                 "shifted_top1": zero_shot_top1(clip, clip_cfg, x_gen_s, y_gen),
                 "pretrain_shifted_top1": zero_shot_top1(clip, clip_cfg, x_pre, y_pre),
                 "templates": ZERO_SHOT_TEMPLATES, "logit_scale": 100.0,
                 "note": "zero-shot top-1 on the held-out generator part of labeled_pool, real vs S; never test/"}
        save_clip(clip, clip_cfg, tmp / "clip")
        t0 = time.perf_counter()
        expert, expert_cfg = train_expert(x_pre, y_pre, s, progress)
        timings["expert_s"] = time.perf_counter() - t0
        expert_fig = {"real_top1": expert_top1(expert, expert_cfg, x_gen_r, y_gen),
                      "shifted_top1": expert_top1(expert, expert_cfg, x_gen_s, y_gen)}
        save_expert(expert, expert_cfg, tmp / "expert")
        t0 = time.perf_counter()
        ensure_generators(items, tmp)
        timings["generator_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_all
        info = {"version": VERSION, "key": key, "settings": asdict(s), "shift": asdict(SHIFT),
                "clip_config": clip_cfg, "calibration": calib, "expert": expert_fig,
                "images": {"pretrain": len(pre), "generator": len(gen)}, "timings": timings}
        (tmp / "standin.json").write_text(json.dumps(info, indent=2))
        (tmp / STAMP).write_text(json.dumps({"key": key}))
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    log(f"standin: CLIP zero-shot on held-out labeled_pool images: real {calib['real_top1']:.1%}, "
        f"S {calib['shifted_top1']:.1%} (S pretraining {calib['pretrain_shifted_top1']:.1%}); expert real "
        f"{expert_fig['real_top1']:.1%}, S {expert_fig['shifted_top1']:.1%}; {timings['total_s']:.0f}s -> {out}")
    return info


# ----------------------------------------------------------------------------------------------
# Command line (``distillery standin``; the parser lives here so that the label-reading code is in one file)

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "eurosat"


def add_arguments(sub) -> None:
    p = sub.add_parser(
        "standin", help="train the stand-in CLIP, expert and generator set (reads LABELED images)",
        description="Build the stand-in world (distillery/standin.py): a small open_clip ViT CLIP and a timm "
                    "resnet18 expert trained here on labeled EuroSAT images seen through a source-domain transform "
                    "S, and S-images standing in for a generator. It reads <data>/labeled_pool/<Class>/ WITH ITS "
                    "LABELS: this command and the benchmarks are the only code that may; the pipeline never does. "
                    "Rebuilds only when its inputs change (else prints 'up to date').")
    p.add_argument("--out", default="models/standin", help="output folder (default models/standin)")
    p.add_argument("--data", default=None, help="staged EuroSAT folder holding labeled_pool/ "
                                                "(default ../shared/data/eurosat beside the repository)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def summary(info: dict) -> str:
    c, e = info["calibration"], info["expert"]
    return (f"stand-in CLIP zero-shot on {c['images']} held-out labeled_pool images: real {c['real_top1']:.1%}, "
            f"S {c['shifted_top1']:.1%}; expert (linear head, training only) real {e['real_top1']:.1%}, "
            f"S {e['shifted_top1']:.1%}; built in {info['timings']['total_s']:.0f}s")


def run_cli(args) -> int:
    info = build_standin(args.out, args.data or DEFAULT_DATA, StandinSettings(threads=args.threads),
                         force=args.force, progress=not args.no_progress)
    print(summary(info) + f" -> {args.out}")
    return 0
