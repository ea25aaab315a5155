"""LaTTe-CLIP prototype fine-tuning (SPEC §4, paper §3.2), as pure functions plus one training loop.

Notation (paper): f = f(x) the CLIP image feature of an (augmented) image, g(T) the CLIP text feature of
a text T, P ∈ R^{C×D} the class prototypes, T ∈ {class, image, group} the three texts of a sample.

Per step (:func:`latte_step`, driven by :func:`finetune`):

1. c_zs: the frozen zero-shot model's label, precomputed and given by the dataset (never recomputed from
   the model being trained); c_ft = argmax_c f · norm(P_c) from the current model and prototypes.
2. For each branch b ∈ {zs, ft}: texts {T_class(c_b), T_image, T_group}, encoded by the current text
   encoder; Dynamic Feature Mixer weights w (:func:`mixer_weights`), mix (:func:`mix_texts`),
   t̄_b = α P_{c_b} + (1−α) mix (:func:`prototype_text`).
3. L = L_con(f, t̄_ft) + L_con(f, t̄_zs) (:func:`contrastive_loss`), one AdamW step on both encoders,
   cosine schedule with linear warm-up.
4. Prototype momentum update (:func:`momentum_update`), once per pseudo-label type, with the t̄ of
   this step: first with (t̄_zs, c_zs), then with (t̄_ft, c_ft) — the paper: "This process is repeated
   for each pseudo-label in {c_zs, c_ft}".

Inference: :func:`predict`, nearest prototype, p = softmax(100 · norm(f) · norm(P)ᵀ).

The two bugs SPEC §4 names in the public implementation are avoided and tested: c_zs always comes from
the dataset (the frozen model, precomputed), and the momentum update replaces the stored prototypes
every step (:func:`finetune` keeps the returned tensor; nothing updates a throw-away copy).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

KEY = "teacher.latte"


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class LatteCfg:
    class_template: str = "a photo of a {c}."  # class description T_class; {c} = class name (paper / SPEC §4)
    alpha: float = 0.99  # prototype weight α in t̄ = α P_c + (1−α) mix (paper Eq. 2)
    mu: float = 0.99  # prototype momentum μ: P_c ← μ P_c + (1−μ) mean t̄ (paper §3.2; 0 = the "w/o momentum" ablation)
    mixer: str = "dynamic"  # "dynamic" = Dynamic Feature Mixer weights (Eq. 1); "mean" = all weights 1 (paper ablation)
    use_image_descriptions: bool = True  # include T_image in the mix (paper Table 2 ablation)
    use_group_descriptions: bool = True  # include T_group in the mix (paper Table 2 ablation)
    group_size: int = 4  # images per group collage for T_group (paper: 4)
    max_new_tokens: int = 77  # captioner's generation limit (paper: ≤ 77 new tokens, greedy)
    describe_batch_size: int = 8  # images per captioner batch
    lr: float = 1e-7  # AdamW peak learning rate (paper: 1e-7; 1e-6 for Food101 / SUN397)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas (OpenCLIP default)
    eps: float = 1e-6  # AdamW eps (OpenCLIP default)
    weight_decay: float = 0.2  # AdamW weight decay on matrices; 0 for gains, biases, logit scale (OpenCLIP)
    warmup_steps: int = 50  # linear warm-up steps before the cosine decay (OpenCLIP's default is 10000: see README)
    epochs: int = 15  # passes over the unlabeled images (paper: 15 on EuroSAT)
    batch_size: int = 64  # images per step (paper: 512 on a GPU; smaller default for CPUs)
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area range (bicubic)
    color_jitter: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5, 0.1])  # ColorJitter brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8  # probability of applying the colour jitter
    grayscale_p: float = 0.2  # probability of converting to grayscale
    logit_scale_max: float = 100.0  # the learnt logit scale exp(s) is clamped to this after each step (OpenCLIP)
    predict_scale: float | None = None  # p = softmax(scale · norm(f) · norm(P)ᵀ) at inference; null = the loaded CLIP's own exp(logit_scale) (100 for a trained CLIP)
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
    grad_checkpointing: bool = False  # open_clip activation checkpointing on CUDA (ignored on CPU)
    workers: int = 0  # DataLoader workers (order and augmentation stay seeded either way)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...
    seed: int | None = None  # data order and augmentation; null = the job seed (0 when used alone)

    def check(self, key: str = KEY) -> "LatteCfg":
        """Raise ValueError naming ``{key}.<field>``, the value and the fix; return self when valid."""
        def bad(name: str, fix: str):
            raise ValueError(f"{key}.{name}: {getattr(self, name)!r} is invalid; {fix}.")

        if "{c}" not in self.class_template:
            bad("class_template", "it must contain {c}, e.g. 'a photo of a {c}.'")
        for name in ("alpha", "mu", "color_jitter_p", "grayscale_p"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                bad(name, "use a number from 0 to 1")
        if self.mixer not in ("dynamic", "mean"):
            bad("mixer", "use 'dynamic' (Dynamic Feature Mixer) or 'mean' (equal weights)")
        for name in ("group_size", "max_new_tokens", "describe_batch_size", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "use a whole number >= 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            bad("batch_size", "use a whole number >= 2 (the contrastive loss needs other samples in the batch)")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            bad("warmup_steps", "use a whole number >= 0")
        if not isinstance(self.workers, int) or self.workers < 0:
            bad("workers", "use a whole number >= 0")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            bad("lr", "use a positive number, e.g. 1e-7")
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            bad("eps", "use a positive number, e.g. 1e-6")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            bad("weight_decay", "use a number >= 0, e.g. 0.2")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            bad("betas", "use two numbers in [0, 1), e.g. [0.9, 0.98]")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            bad("crop_scale", "use [min, max] with 0 < min <= max <= 1, e.g. [0.9, 1.0]")
        cj = self.color_jitter
        if len(cj) != 4 or not all(isinstance(v, (int, float)) and v >= 0 for v in cj) or cj[3] > 0.5:
            bad("color_jitter", "use [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5")
        for name in ("logit_scale_max", "predict_scale"):
            v = getattr(self, name)
            if name == "predict_scale" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
                bad(name, "use a positive number, e.g. 100" + (" (or null: the model's own)" if name == "predict_scale"
                                                                else ""))
        dev = self.device
        if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda", "mps") or
                                            (dev.startswith("cuda:") and dev[5:].isdigit())):
            bad("device", "use auto, cpu, cuda or cuda:N")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "use a whole number or null (the job seed)")
        return self


# ----------------------------------------------------------------------------------------------
# The method's pieces (pure, batched)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


@torch.no_grad()
def mixer_weights(text_feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Dynamic Feature Mixer weights (paper Eq. 1), (B, T, D), (C, D) -> (B, T), detached:

        w_t = top1_c cos(g(T_t), P_c) − top2_c cos(g(T_t), P_c) + 1e-6

    A text close to one prototype and far from the rest gets a large weight; a generic one ≈ 0 (the
    1e-6 keeps Σ w > 0). Computed under no_grad: no gradient flows through the weights. Needs C ≥ 2.
    """
    if prototypes.shape[0] < 2:
        raise ValueError(f"mixer_weights: needs at least 2 prototypes (classes), got {prototypes.shape[0]}.")
    cos = _norm(text_feats.float()) @ _norm(prototypes.float()).T  # (B, T, C)
    top = cos.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1] + 1e-6).detach()


def mix_texts(text_feats: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The weighted mean of the *L2-normalised* text features, (B, T, D), (B, T) -> (B, D):

        mix = Σ_t w_t ĝ(T_t) / Σ_t w_t,    ĝ = g / ‖g‖

    (normalised so that a text with a larger raw norm does not outweigh the others; the gradient flows
    through ĝ, not through w).
    """
    w = w.to(text_feats.dtype)
    return (w.unsqueeze(-1) * _norm(text_feats)).sum(1) / w.sum(1, keepdim=True)


def prototype_text(prototypes: torch.Tensor, labels: torch.Tensor, mix: torch.Tensor, alpha: float = 0.99) -> torch.Tensor:
    """Prototype-text embedding (paper Eq. 2), (C, D), (B,), (B, D) -> (B, D):

        t̄_i = α P_{c_i} + (1 − α) mix_i

    P enters as stored (a buffer, no gradient); the gradient reaches the text encoder through mix.
    """
    return alpha * prototypes[labels].to(mix.dtype) + (1.0 - alpha) * mix


def contrastive_loss(f: torch.Tensor, t: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric CLIP loss (paper Eq. 3) on L2-normalised vectors, (B, D), (B, D) -> scalar:

        S = s · f̂ t̂ᵀ,   L = ½ [ CE(S, arange(B)) + CE(Sᵀ, arange(B)) ]

    i.e. image→text and text→image cross-entropy over the batch, the mean of the two (OpenCLIP's
    ClipLoss; Eq. 3 as printed is their sum, a constant factor 2 that AdamW all but ignores).
    Targets are arange(B) even when several samples share a class: as in the paper, each sample has its
    own t̄ (they differ by their mix of image and group descriptions), so same-class samples are negatives
    of one another — with α = 0.99 nearly identical ones, which is the paper's behaviour.
    """
    logits = logit_scale * _norm(f.float()) @ _norm(t.float()).T
    target = torch.arange(f.shape[0], device=f.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def dual_labels(f: torch.Tensor, prototypes: torch.Tensor, zs_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_ft, c_zs): c_ft = argmax_c f · norm(P_c) from the current model's features and prototypes;
    c_zs = ``zs_labels`` as given (the frozen zero-shot model's labels, precomputed — never the model
    being trained)."""
    c_ft = (f.float() @ _norm(prototypes.float()).T).argmax(dim=1)
    return c_ft, zs_labels.to(c_ft.device, torch.long)


@torch.no_grad()
def momentum_update(prototypes: torch.Tensor, tbar: torch.Tensor, labels: torch.Tensor, mu: float = 0.99) -> torch.Tensor:
    """Prototype momentum update (paper §3.2), (C, D), (B, D), (B,) -> new (C, D):

        P_c ← μ P_c + (1 − μ) · mean_{i: label_i = c} t̄_i      for every class c in the batch;

    classes absent from the batch are unchanged. t̄ is detached; returns a new tensor.
    """
    tbar = tbar.detach().to(prototypes.dtype)
    labels = labels.to(prototypes.device, torch.long)
    C = prototypes.shape[0]
    sums = torch.zeros_like(prototypes).index_add_(0, labels, tbar)
    counts = torch.bincount(labels, minlength=C).to(prototypes.dtype)
    present = counts > 0
    new = prototypes.clone()
    new[present] = mu * prototypes[present] + (1.0 - mu) * sums[present] / counts[present].unsqueeze(1)
    return new


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups (OpenCLIP's split): no weight decay for parameters with fewer than 2 dimensions
    (LayerNorm gains and biases, all biases, the class embedding) and the logit scale; ``weight_decay``
    on every matrix (projections, token and positional embeddings). Frozen parameters are left out."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "logit_scale" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_lambda(warmup: int, total: int):
    """lr factor per step: (s+1)/warmup during warm-up, then ½(1 + cos(π (s − warmup)/(total − warmup)))."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        rest = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, rest) / rest))
    return fn


def _to_rgb(im):
    return im.convert("RGB")


def train_transform(preprocess, cfg: LatteCfg):
    """The paper's augmentation at the model's own input size, mean and std (read from open_clip's
    ``preprocess``): RandomResizedCrop(size, scale=cfg.crop_scale, bicubic), ColorJitter(cfg.color_jitter)
    with p = cfg.color_jitter_p, RandomGrayscale(p = cfg.grayscale_p), ToTensor, Normalize."""
    from torchvision import transforms as T

    size, mean, std = None, None, None
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            mean, std = list(t.mean), list(t.std)
        elif isinstance(t, T.CenterCrop):
            size = tuple(t.size)
        elif isinstance(t, T.Resize) and size is None:
            size = t.size
    if size is None or mean is None:
        raise ValueError("train_transform: the preprocess has no CenterCrop/Resize size or Normalize; pass "
                         "open_clip's preprocess of the model being trained.")
    if isinstance(size, int):
        size = (size, size)
    return T.Compose([
        T.Lambda(_to_rgb),
        T.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
        T.RandomGrayscale(p=cfg.grayscale_p),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


@torch.no_grad()
def predict(model, x, prototypes: torch.Tensor, scale: float = 100.0, batch_size: int = 256) -> torch.Tensor:
    """Nearest-prototype class probabilities, (N, C): p = softmax(scale · norm(f) · norm(P)ᵀ).

    ``x``: image features (N, D); or preprocessed pixels (N, 3, H, W), or an iterable of such batches,
    encoded with ``model.encode_image`` (``model`` may be None for features).
    """
    if torch.is_tensor(x) and x.ndim == 2:
        f = x.float()
    elif torch.is_tensor(x):
        dev = next(model.parameters()).device
        f = torch.cat([model.encode_image(x[i:i + batch_size].to(dev)).float().cpu()
                       for i in range(0, x.shape[0], batch_size)]) if x.shape[0] else x.new_zeros((0, prototypes.shape[1]))
    else:
        parts = [predict(model, b, prototypes, scale, batch_size) for b in x]
        return torch.cat(parts) if parts else torch.zeros((0, prototypes.shape[0]))
    logits = scale * _norm(f.to(prototypes.device)) @ _norm(prototypes.float()).T
    return logits.softmax(dim=1)


# ----------------------------------------------------------------------------------------------
# Dataset helpers for the stage


def group_members(zs_labels: Sequence[int], group_size: int = 4, seed: int = 0) -> list[list[int]]:
    """For each image i, the indices of its group collage: i and ``group_size − 1`` other images with the
    same zero-shot label, drawn without replacement while there are enough (with replacement when the
    class is smaller; only i itself when it is alone). Deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 0x6C61])
    by_label: dict[int, list[int]] = {}
    for i, c in enumerate(zs_labels):
        by_label.setdefault(int(c), []).append(i)
    out = []
    for i, c in enumerate(zs_labels):
        others = [j for j in by_label[int(c)] if j != i]
        k = group_size - 1
        if not others:
            pick = [i] * k
        else:
            pick = rng.choice(others, size=k, replace=len(others) < k).tolist()
        out.append([i] + [int(j) for j in pick])
    return out


class LatteDataset(torch.utils.data.Dataset):
    """The dataset :func:`finetune` expects: item i -> (pixels, zs_label, class_text, image_text, group_text).

    - ``images``: paths or PIL images; ``transform``: :func:`train_transform` (a fresh augmentation each time);
    - ``zs_labels``: the frozen zero-shot model's labels; ``class_texts[c]`` the class description of c;
    - ``image_texts[i]``: the cleaned image description of image i;
    - ``group_texts[i]``: the cleaned description of the group collage built for image i; a sample uses
      the group text of a random *other* image with the same zero-shot label (SPEC §4; itself when it is
      alone), drawn from torch's global RNG, which :func:`finetune` seeds and checkpoints.
    """

    def __init__(self, images, zs_labels, class_texts, image_texts, group_texts, transform):
        if not (len(images) == len(zs_labels) == len(image_texts) == len(group_texts)):
            raise ValueError("LatteDataset: images, zs_labels, image_texts and group_texts differ in length.")
        self.images, self.transform = list(images), transform
        self.zs = [int(c) for c in zs_labels]
        self.class_texts, self.image_texts, self.group_texts = list(class_texts), list(image_texts), list(group_texts)
        self.same: dict[int, list[int]] = {}
        for i, c in enumerate(self.zs):
            self.same.setdefault(c, []).append(i)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        from distillery.images import load_rgb

        im = self.images[i]
        if not isinstance(im, Image.Image):
            im = load_rgb(im)
        c = self.zs[i]
        others = [j for j in self.same[c] if j != i] or [i]
        j = others[int(torch.randint(len(others), ()).item())]
        return self.transform(im), c, self.class_texts[c], self.image_texts[i], self.group_texts[j]


# ----------------------------------------------------------------------------------------------
# Training


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def latte_step(model, tokenizer, batch, prototypes: torch.Tensor, cfg: LatteCfg, class_texts: Sequence[str],
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict]:
    """Forward of one training step: the loss L_ft + L_zs and what the update needs.

    ``batch`` = (pixels (B,3,H,W), zs_labels (B,), class_texts of zs_labels, image_texts, group_texts).
    Returns (loss, aux) with aux: c_ft, c_zs, tbar_ft, tbar_zs (detached), w_ft, w_zs, loss_ft, loss_zs.
    Unique texts are encoded once per step (the same math: the text encoder treats each text alone).
    """
    device = torch.device(device)
    x, zs, ctext, itext, gtext = batch
    x = x.to(device, non_blocking=True)
    zs = torch.as_tensor(zs, device=device, dtype=torch.long)
    for k, (c, t) in enumerate(zip(zs.tolist(), ctext)):
        if t != class_texts[c]:
            raise ValueError(f"latte: sample {k} of the batch has class_text {t!r}, but class_texts[{c}] (its "
                             f"zero-shot label) is {class_texts[c]!r}; build both with the same template.")
    P = prototypes
    with _autocast(device, cfg.amp):
        f = model.encode_image(x).float()
    c_ft, c_zs = dual_labels(f.detach(), P, zs)
    per_branch = {"zs": [class_texts[c] for c in c_zs.tolist()], "ft": [class_texts[c] for c in c_ft.tolist()]}
    extra = []
    if cfg.use_image_descriptions:
        extra.append(list(itext))
    if cfg.use_group_descriptions:
        extra.append(list(gtext))
    unique = list(dict.fromkeys(per_branch["zs"] + per_branch["ft"] + [t for col in extra for t in col]))
    pos = {t: i for i, t in enumerate(unique)}
    with _autocast(device, cfg.amp):
        g_u = model.encode_text(tokenizer(unique).to(device)).float()
    aux: dict = {"c_ft": c_ft, "c_zs": c_zs}
    loss = 0.0
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else torch.tensor(100.0, device=device)
    for b, labels in (("ft", c_ft), ("zs", c_zs)):
        cols = [per_branch[b]] + extra  # T texts per sample: class, [image], [group]
        idx = torch.tensor([[pos[col[i]] for col in cols] for i in range(len(labels))], device=device)
        g = g_u[idx]  # (B, T, D)
        w = mixer_weights(g, P) if cfg.mixer == "dynamic" else torch.ones(g.shape[:2], device=device)
        tbar = prototype_text(P, labels, mix_texts(g, w), cfg.alpha)
        lb = contrastive_loss(f, tbar, scale)
        loss = loss + lb
        aux[f"tbar_{b}"], aux[f"w_{b}"], aux[f"loss_{b}"] = tbar.detach(), w, lb.detach()
    return loss, aux


def _rng_state() -> dict:
    """RNG states as tensors (and plain ints), loadable with torch.load(weights_only=True)."""
    ver, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": torch.tensor(list(keys), dtype=torch.int64), "python_version": ver,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate((s["python_version"], tuple(int(v) for v in s["python"].tolist()), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], *s["numpy_gauss"]))


def _run_key(cfg: LatteCfg, n: int, init: torch.Tensor, class_texts: Sequence[str]) -> str:
    """What a checkpoint must match to be resumed: settings, dataset size, initial prototypes, classes."""
    h = hashlib.sha256(json.dumps([asdict(cfg), n, list(class_texts)], sort_keys=True).encode())
    h.update(init.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _log(msg: str) -> None:
    from distillery.rundir import log

    log(msg)


def finetune(model, tokenizer, dataset, init_prototypes: torch.Tensor, cfg: LatteCfg,
             device: torch.device | str = "cpu", checkpoint_dir: Path | None = None, progress: bool = True, *,
             class_texts: Sequence[str]) -> tuple[torch.nn.Module, torch.Tensor, list[dict]]:
    """LaTTe-CLIP fine-tuning of both CLIP encoders; returns (model, prototypes (C, D), history).

    - ``dataset``: items (augmented pixels, zs_label, class_text, image_text, group_text) — see
      :class:`LatteDataset`; ``class_text`` must equal ``class_texts[zs_label]``.
    - ``init_prototypes``: (C, D) text embeddings of ``class_texts`` (the class descriptions) from the
      zero-shot model; L2-normalised here, then updated by momentum only (no gradient).
    - ``class_texts``: the C class descriptions, needed for the fine-tuned branch's T_class(c_ft).
    - ``checkpoint_dir``: ``latte.pt`` there after every epoch (model, prototypes, optimizer, scheduler,
      RNG states, epoch, history; temp file + rename). A rerun with the same settings, data size,
      prototypes and classes resumes after the last finished epoch and ends where an uninterrupted run
      ends; a finished checkpoint returns at once. Other checkpoints are ignored (logged).

    Data order: a DataLoader generator seeded by (seed, epoch); augmentation and group-text choice: torch's
    global RNG, seeded once at the start and checkpointed. The caller's global RNG states are restored.
    One AdamW step per batch (a last batch of one sample is dropped: its contrastive loss is 0).
    """
    cfg.check()
    device = torch.device(device)
    seed = 0 if cfg.seed is None else cfg.seed
    C = init_prototypes.shape[0]
    if len(class_texts) != C:
        raise ValueError(f"latte: {len(class_texts)} class_texts for {C} prototypes; give one description per class.")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"latte: needs at least 2 images to fine-tune with a contrastive loss, got {n}.")
    bs = min(cfg.batch_size, n)
    drop_last = n % bs == 1
    steps_per_epoch = n // bs if drop_last else math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    key = _run_key(cfg, n, init_prototypes, class_texts)

    model.to(device)
    if cfg.grad_checkpointing and device.type == "cuda" and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(cfg.warmup_steps, total))
    P = _norm(init_prototypes.detach().float()).to(device)
    history: list[dict] = []
    start = 0
    ckpt_path = Path(checkpoint_dir) / "latte.pt" if checkpoint_dir is not None else None

    saved_py, saved_np = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if ckpt_path is not None and ckpt_path.is_file():
            try:
                ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            except Exception as e:  # a foreign or damaged file: start over rather than crash on it
                _log(f"latte: ignoring unreadable checkpoint {ckpt_path} ({e}); starting from epoch 0.")
                ck = None
            if ck is not None and ck.get("key") != key:
                _log(f"latte: checkpoint {ckpt_path} is from other settings or data; starting from epoch 0.")
                ck = None
            if ck is not None:
                model.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
                sched.load_state_dict(ck["scheduler"])
                P = ck["prototypes"].to(device)
                history = list(ck["history"])
                start = int(ck["epoch"])
                _set_rng_state(ck["rng"])
                _log(f"latte: resuming after epoch {start}/{cfg.epochs} from {ckpt_path}")
        try:
            P, history = _train(model, tokenizer, dataset, P, cfg, class_texts, device, opt, sched, start,
                                steps_per_epoch, bs, drop_last, seed, history, ckpt_path, key, progress)
        finally:
            random.setstate(saved_py)
            np.random.set_state(saved_np)
    model.eval()
    return model, P, history


def _train(model, tokenizer, dataset, P, cfg, class_texts, device, opt, sched, start, steps_per_epoch, bs,
           drop_last, seed, history, ckpt_path, key, progress):
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from distillery.rundir import atomic_path

    total = steps_per_epoch * cfg.epochs
    bar = tqdm(total=total, initial=start * steps_per_epoch, desc="latte", unit="step", disable=not progress,
               dynamic_ncols=True)
    log_max = math.log(cfg.logit_scale_max)
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            loader = DataLoader(dataset, batch_size=bs, shuffle=True, drop_last=drop_last, generator=gen,
                                num_workers=cfg.workers, pin_memory=device.type == "cuda")
            P_start = P.clone()
            loss_sum, agree, seen, steps = 0.0, 0, 0, 0
            for batch in loader:
                loss, aux = latte_step(model, tokenizer, batch, P, cfg, class_texts, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if hasattr(model, "logit_scale"):
                    with torch.no_grad():
                        model.logit_scale.clamp_(0, log_max)
                # the paper's momentum update, once per pseudo-label type; P is replaced, never a copy
                P = momentum_update(P, aux["tbar_zs"], aux["c_zs"], cfg.mu)
                P = momentum_update(P, aux["tbar_ft"], aux["c_ft"], cfg.mu)
                loss_sum += float(loss.detach())
                agree += int((aux["c_ft"] == aux["c_zs"]).sum())
                seen += len(aux["c_ft"])
                steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / steps:.4f}", epoch=f"{epoch + 1}/{cfg.epochs}")
            shift = float((1 - (_norm(P) * _norm(P_start)).sum(1)).mean())
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(1, steps), "lr": opt.param_groups[0]["lr"],
                            "ft_zs_agreement": agree / max(1, seen), "prototype_shift": shift, "steps": steps,
                            "images": seen, "seconds": round(time.perf_counter() - t0, 3)})
            if ckpt_path is not None:
                state = {"key": key, "epoch": epoch + 1, "model": model.state_dict(), "prototypes": P.detach().cpu(),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
                         "history": history}
                with atomic_path(ckpt_path) as tmp:
                    torch.save(state, tmp)
            from distillery import killpoints

            killpoints.progress("latte.epoch", epoch + 1)  # testing hook: after the epoch's checkpoint
    finally:
        bar.close()
    return P, history


# ----------------------------------------------------------------------------------------------
# The stage: registered as the teacher "latte"

from .base import TeacherResult, TeacherSettings, register_teacher  # noqa: E402


@dataclass
class LatteSettings(TeacherSettings, LatteCfg):
    """``teacher.latte``: :class:`LatteCfg` as a registered teacher's settings (enabled, device + LaTTe's own)."""

    enabled: bool = False  # LaTTe-CLIP fine-tunes both CLIP encoders: off by default (GPU-hours on a real job)

    def check(self, key: str = "teacher.latte") -> None:
        LatteCfg.check(self, key)


def _descriptions(ctx, cfg, zs: np.ndarray, class_texts: list[str], clip_tokenizer) -> tuple[list, list, dict]:
    """Cleaned image and group descriptions per unlabeled image (cached by captioner, prompt, image hashes)."""
    from distillery.images import load_rgb
    from distillery.models import load_captioner

    from .describe import DescriptionCache, clean_description, describe_cached, group_canvas, group_prompt, \
        image_prompt

    job, images = ctx.job, ctx.images
    n = len(images)
    image_texts, group_texts = [class_texts[c] for c in zs], [class_texts[c] for c in zs]
    counts = {"ok": 0, "truncated": 0, "fallback": 0}
    if not (cfg.use_image_descriptions or cfg.use_group_descriptions):
        return image_texts, group_texts, counts
    model, processor = load_captioner(job.models.captioner, device=ctx.device())
    cache = DescriptionCache(ctx.out_dir / "descriptions")
    paths, sha = images.paths, images.sha256
    generated = 0
    captioner = f"{job.models.captioner}|greedy|max_new_tokens={cfg.max_new_tokens}"  # what decides the text

    def clean(texts):
        out = []
        for t, c in zip(texts, zs):
            text, status = clean_description(t, class_texts[c], 77, clip_tokenizer)
            counts[status] += 1
            out.append(text)
        return out

    if cfg.use_image_descriptions:
        items = [((sha[i],), (lambda i=i: load_rgb(paths[i]))) for i in range(n)]
        raw, g = describe_cached(model, processor, cache, captioner, image_prompt(job.domain_phrase), items,
                                 cfg.max_new_tokens, cfg.describe_batch_size, progress=ctx.progress)
        image_texts, generated = clean(raw), generated + g
    if cfg.use_group_descriptions:
        groups = group_members(zs.tolist(), cfg.group_size, cfg.seed if cfg.seed is not None else job.seed)
        items = [(tuple(sha[j] for j in m), (lambda m=m: group_canvas([load_rgb(paths[j]) for j in m])))
                 for m in groups]
        raw, g = describe_cached(model, processor, cache, captioner, group_prompt(job.domain_phrase), items,
                                 cfg.max_new_tokens, cfg.describe_batch_size, progress=ctx.progress)
        group_texts, generated = clean(raw), generated + g
    counts["generated"] = generated
    return image_texts, group_texts, counts


def _zero_shot_labels(ctx, seed: int) -> np.ndarray:
    """c_zs for every unlabeled image: the argmax of the (prior-matched) clip column, or with a class prior the
    assignment that meets its class sizes exactly (teacher/prior.py), ties broken by a seeded hash."""
    from .prior import balanced_labels, log_probs, tie_key

    p = ctx.columns["clip"]
    if ctx.prior is None:
        return p.argmax(axis=1)
    return balanced_labels(log_probs(p), ctx.prior, tie_key(ctx.images.sha256, seed))


def _pixel_batches(paths, preprocess, batch_size: int):
    from distillery.images import load_rgb

    for b in range(0, len(paths), batch_size):
        yield torch.stack([preprocess(load_rgb(p)) for p in paths[b:b + batch_size]])


@register_teacher("latte", settings=LatteSettings, roles=("clip", "captioner"), needs=("teacher:clip",),
                  columns=("latte",))
def run_latte(ctx) -> TeacherResult:
    """LaTTe-CLIP: LMM descriptions + prototype fine-tuning of both CLIP encoders; nearest prototype."""
    from safetensors.torch import save_file

    from distillery.models import load_clip
    from distillery.rundir import atomic_path, canonical_safetensors

    from .clip import encode_texts, prediction_sets, result_from_sets

    cfg, job = ctx.cfg, ctx.job
    device = ctx.device()
    run_cfg = LatteCfg(**{k: getattr(cfg, k) for k in LatteCfg.__dataclass_fields__})
    run_cfg.seed = cfg.seed if cfg.seed is not None else job.seed
    # c_zs: the frozen zero-shot model's labels, computed once; under a class prior, the balanced assignment to it
    zs = _zero_shot_labels(ctx, run_cfg.seed)
    class_texts = [cfg.class_template.format(c=c) for c in job.class_names]
    model, preprocess, tokenizer = load_clip(job.models.clip, device=device)
    from .clip import logit_scale_of

    scale = logit_scale_of(cfg.predict_scale, model)  # the loaded model's own, as the zero-shot it starts from
    init = torch.from_numpy(encode_texts(model, tokenizer, class_texts, device))  # (C, D): P starts here
    image_texts, group_texts, counts = _descriptions(ctx, run_cfg, zs, class_texts, tokenizer)
    data = LatteDataset(ctx.images.paths, zs.tolist(), class_texts, image_texts, group_texts,
                        train_transform(preprocess, run_cfg))
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    model, protos, hist = finetune(model, tokenizer, data, init, run_cfg, device, checkpoint_dir=ctx.out_dir,
                                   progress=ctx.progress, class_texts=class_texts)
    model.eval()
    with torch.no_grad():
        probs = {k: {"latte": predict(model, _pixel_batches(s.paths, preprocess, 64), protos, scale).numpy()}
                 for k, s in prediction_sets(ctx).items()}
    with atomic_path(ctx.out_dir / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(ctx.out_dir / "prototypes.safetensors") as tmp:
        save_file({"prototypes": protos.detach().cpu().contiguous()}, str(tmp),
                  metadata={"class_names": json.dumps(job.class_names), "class_texts": json.dumps(class_texts)})
        canonical_safetensors(tmp)  # the same prototypes give the same bytes in every process
    tables = {"descriptions": {"sha256": list(ctx.images.sha256), "zero_shot_label": zs.tolist(),
                               "image_text": image_texts, "group_text": group_texts}}
    info = {"descriptions": counts, "steps": sum(h.get("steps", 0) for h in hist) if hist else 0,
            "predict_scale": round(scale, 6), "zero_shot_label_counts": np.bincount(zs, minlength=len(class_texts)).tolist(),
            "loss_first": hist[0].get("loss") if hist else None, "loss_last": hist[-1].get("loss") if hist else None}
    return result_from_sets(probs, tables=tables, info=info)
