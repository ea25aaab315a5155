"""AiR: an auxiliary image-image classifier from synthetic prototypes, fused with zero-shot CLIP, and
CoOp-style prompt learning on the fused pseudo-labels (SPEC §3; "Beyond Words", CVPR 2025).

The math is pure functions of arrays/tensors and models handed in; the registered teacher at the end
(``run_air``) feeds them from the runner's context (the synthetic rows, the CLIP column, the shared
feature store) and returns the columns ``air_aux``, ``air_fused``, ``air_prompt``. numpy does the scoring;
torch is imported only inside the functions that train or encode.

The method, with the shapes used below (N real images, C classes, D feature size, M synthetic images
of a class, K prototypes kept per class):

1. ACG. For each class, the CLIP image features of its M synthetic images; cosine of each to the
   (normalised) class mean; the K most similar are the class prototypes (``select_prototypes``).
   p̂_c(f) = (1/K) Σ_k cos(f, proto_k^c) (``aux_scores``).
2. PLG. p̂ is put on the same footing as the zero-shot p (``normalize_aux``) and fused:
   p* = p + λ p̂ (``fuse``).
3. Prompt learning (UPL/CPL style). The top-N most confident images per fused class
   (``select_confident``) train a shared learnable context of n_ctx token embeddings in front of the
   class name in the frozen CLIP text encoder (``PromptLearner``, ``train_prompts``) with
   L = L_r + β L_s: cross-entropy to the pseudo-labels on the weak view and KL consistency of a
   strong view to the weak one (``loss_r``, ``loss_s``). The learnt context classifies every image
   (``predict_with_context``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

AUX_NORMALIZATIONS = ("softmax", "sum", "none")
PLACEHOLDER = "X"  # CoOp's placeholder word: one BPE token in CLIP's vocabulary, replaced by the context


# ----------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------

@dataclass
class AirCfg:
    """Settings of the AiR teacher (``teacher.air``)."""

    enabled: bool = True  # compute the AiR probability column at all
    prototype_tricks: list[str] = field(default_factory=lambda: ["base"])  # synthesis tricks whose rows give prototypes; the paper's come from plain "a photo of a {c}"-style prompts, i.e. "base" ("all" = every row)
    m: int | None = None  # synthetic images per class considered (the first m of each class, in table order); null = all
    k: int = 16  # prototypes kept per class (not published; 16 <= the smallest M of the paper's sweep (20) and the 16-shot count UPL/CPL use)
    fusion_lambda: float = 1.0  # λ in p* = p + λ p̂ (SPEC §3: not published, 1.0)
    aux_normalize: str = "softmax"  # how p̂ is made comparable to p: softmax(aux_scale · p̂), "sum" (shift >= 0, row sum 1) or "none"
    aux_scale: float | None = None  # logit scale of the "softmax" normalisation; null = the CLIP model's own exp(logit_scale) (the zero-shot scale; 100 for a trained CLIP)
    prompt_learning: bool = True  # train the CoOp context on the fused pseudo-labels; false = the fused p* is the column
    n_ctx: int = 16  # learnable context tokens (UPL/CPL: 16)
    ctx_init: str = ""  # words whose token embeddings initialise the context ({domain} allowed, e.g. "a {domain} of a" with n_ctx 5); "" = N(0, 0.02) as UPL/CPL with 16 tokens
    top_n: int = 16  # most confident fused pseudo-labels per class used for training (UPL/CPL: 16)
    beta: float = 1.0  # β in L = L_r + β L_s (consistency weight); 0 = no strong view, L_r only
    epochs: int = 20  # CPL: 50. 20 epochs x 5 steps: ~20 min for ViT-B-32 on a 2-core CPU (measured ~12 s/step with strong views)
    batch_size: int = 32  # CPL: 64. 32 gives 5 steps per epoch on 10 classes x 16 images instead of 3
    lr: float = 0.002  # SGD learning rate (CoOp's 0.002)
    momentum: float = 0.9  # SGD momentum (CoOp)
    weight_decay: float = 5e-4  # SGD weight decay (CoOp)
    warmup_epochs: int = 2  # linear warm-up epochs before the cosine decay (CPL: 2); capped below the run length
    logit_scale: float | None = None  # training and prediction logits = scale · norm(f) · norm(T)ᵀ; null = the CLIP model's own exp(logit_scale) (100 for a trained CLIP)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...
    seed: int | None = None  # context init, data order, strong augmentation; null = the job seed

    def check(self, key: str = "teacher.air") -> None:
        """Raise ``ValueError`` naming ``key.<field>``, the value and the fix, for the first bad setting."""
        from .synth import TRICK_NAMES

        for name in ("enabled", "prompt_learning"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{key}.{name}: expected true or false, got {v!r}.")
        tricks = self.prototype_tricks
        if not isinstance(tricks, (list, tuple)) or not tricks:
            raise ValueError(f"{key}.prototype_tricks: expected a non-empty list of trick names, got {tricks!r}; "
                             f"e.g. [base].")
        valid = TRICK_NAMES
        for t in tricks:
            if t not in valid:
                raise ValueError(f"{key}.prototype_tricks: unknown trick {t!r}; choose from {', '.join(valid)}.")
        _int(key, "m", self.m, 1, allow_none=True, fix="use null for all synthetic images of a class")
        _int(key, "k", self.k, 1, fix="keep at least one prototype per class")
        _num(key, "fusion_lambda", self.fusion_lambda, 0.0, fix="use 0 to ignore the auxiliary classifier")
        if self.aux_normalize not in AUX_NORMALIZATIONS:
            raise ValueError(f"{key}.aux_normalize: unknown value {self.aux_normalize!r}; choose from "
                             f"{', '.join(AUX_NORMALIZATIONS)}.")
        if self.aux_scale is not None:
            _num(key, "aux_scale", self.aux_scale, 0.0, strict=True, fix="use null for the model's own scale")
        _int(key, "n_ctx", self.n_ctx, 1, fix="CoOp/UPL/CPL use 16")
        if self.n_ctx > 60:
            raise ValueError(f"{key}.n_ctx: {self.n_ctx} context tokens leave too little of CLIP's 77-token text "
                             f"window for the class name; use <= 60 (16 is usual).")
        if not isinstance(self.ctx_init, str):
            raise ValueError(f"{key}.ctx_init: expected a string, got {self.ctx_init!r}; use \"\" for a random init.")
        try:
            self.ctx_init.format(domain="photo")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{key}.ctx_init: {self.ctx_init!r} is not a usable template ({type(e).__name__}: {e}); "
                             "only {domain} may appear in braces.") from e
        _int(key, "top_n", self.top_n, 1, fix="UPL/CPL use 16")
        _num(key, "beta", self.beta, 0.0, fix="use 0 to train on the pseudo-labels alone")
        _int(key, "epochs", self.epochs, 1, fix="CPL uses 50")
        _int(key, "batch_size", self.batch_size, 1, fix="CPL uses 64")
        _num(key, "lr", self.lr, 0.0, strict=True, fix="CoOp uses 0.002")
        _num(key, "momentum", self.momentum, 0.0, fix="CoOp uses 0.9")
        if self.momentum >= 1:
            raise ValueError(f"{key}.momentum: must be in [0, 1), got {self.momentum}; CoOp uses 0.9.")
        _num(key, "weight_decay", self.weight_decay, 0.0, fix="CoOp uses 5e-4")
        _int(key, "warmup_epochs", self.warmup_epochs, 0, fix="use 0 for no warm-up")
        if self.logit_scale is not None:
            _num(key, "logit_scale", self.logit_scale, 0.0, strict=True, fix="use null for the model's own scale")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"{key}.device: expected a device name, got {self.device!r}; use auto, cpu, cuda or cuda:N.")
        _int(key, "seed", self.seed, None, allow_none=True, fix="use an integer or null for the job seed")


def _int(key, name, v, lo, allow_none=False, fix=""):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (lo is not None and v < lo):
        want = "an integer" if lo is None else f"an integer >= {lo}"
        raise ValueError(f"{key}.{name}: expected {want}{' or null' if allow_none else ''}, got {v!r}; {fix}.")


def _num(key, name, v, lo, strict=False, fix=""):
    ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (v <= lo if strict else v < lo):
        raise ValueError(f"{key}.{name}: expected a number {'>' if strict else '>='} {lo}, got {v!r}; {fix}.")


# ----------------------------------------------------------------------------------------------------
# ACG: auxiliary classifier from synthetic prototypes (numpy)
# ----------------------------------------------------------------------------------------------------

def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def select_prototypes(features: np.ndarray, k: int) -> np.ndarray:
    """Indices (min(k, M),) of the k synthetic images of one class closest to the class mean.

    features: (M, D) CLIP image features of the class's synthetic images (any norm). Each row is
    L2-normalised, the mean of the normalised rows is normalised again, and the rows are ranked by
    cosine to it, most similar first; equal cosines keep their row order (stable sort), so the lower
    index wins a tie. All M rows are returned (in that order) when M <= k.
    """
    f = l2_normalize(features)  # (M, D)
    if f.ndim != 2 or len(f) == 0:
        raise ValueError(f"select_prototypes: expected a non-empty (M, D) array, got shape {f.shape}.")
    centre = l2_normalize(f.mean(axis=0))  # (D,)
    sim = f @ centre  # (M,)
    order = np.argsort(-sim, kind="stable")  # (M,)
    return order[:k]


def build_prototypes(features: np.ndarray, class_index: Sequence[int], n_classes: int, k: int,
                     m: int | None = None, tricks: Sequence[str] | None = None,
                     use_tricks: Sequence[str] = ("all",), return_rows: bool = False):
    """Per-class prototypes from a table of synthetic features: a list of C arrays (K_c, D).

    features (S, D) and class_index (S,) are the synthetic rows (e.g. synthetic.parquet order);
    ``tricks`` (S,) their trick names, kept only where in ``use_tricks`` ("all" keeps every row).
    Of each class the first ``m`` remaining rows (all when None) go to ``select_prototypes``.
    A class left without rows is an error naming it. ``return_rows``: also the chosen row indices per class.
    """
    features = np.asarray(features)
    class_index = np.asarray(class_index)
    keep = np.ones(len(class_index), bool)
    if tricks is not None and "all" not in use_tricks:
        keep = np.isin(np.asarray(tricks, dtype=object), list(use_tricks))
    protos, chosen = [], []
    for c in range(n_classes):
        rows = np.flatnonzero(keep & (class_index == c))  # (M_c,)
        if m is not None:
            rows = rows[:m]
        if len(rows) == 0:
            raise ValueError(f"AiR: class {c} has no synthetic images from tricks {list(use_tricks)}; generate "
                             "some (teacher.synth) or widen teacher.air.prototype_tricks.")
        chosen.append(rows[select_prototypes(features[rows], k)])
        protos.append(features[chosen[-1]])
    return (protos, chosen) if return_rows else protos


def aux_scores(image_features: np.ndarray, prototypes: Sequence[np.ndarray]) -> np.ndarray:
    """p̂ (N, C): p̂_c = (1/K_c) Σ_k cos(f, proto_k^c), cosines in [-1, 1].

    image_features: (N, D); prototypes: C arrays (K_c, D). The mean of cosines equals the dot product
    of the normalised image feature with the mean of the normalised prototypes (not renormalised).
    """
    if not len(prototypes) or any(len(p) == 0 for p in prototypes):
        raise ValueError("aux_scores: every class needs at least one prototype (see build_prototypes).")
    f = l2_normalize(image_features)  # (N, D)
    centres = np.stack([l2_normalize(p).mean(axis=0) for p in prototypes])  # (C, D)
    return f @ centres.T  # (N, C)


def normalize_aux(p_hat: np.ndarray, how: str = "softmax", scale: float = 100.0) -> np.ndarray:
    """Make the raw auxiliary scores p̂ (N, C) comparable to the zero-shot probabilities p (N, C).

    - ``"softmax"`` (default): softmax(scale · p̂) row-wise. The auxiliary classifier is then a
      prototype classifier with the very same form and logit scale as zero-shot CLIP
      (softmax(100 · cos)), so p̂ is a distribution on the same footing as p and λ weighs two
      distributions against each other. Raw cosines of CLIP image features are all large and close
      (e.g. 0.6-0.9), so without this their class differences would hardly move p* = p + λ p̂.
    - ``"sum"``: shift each row so its minimum is 0 (p̂ - min_c p̂), then divide by the row sum; a
      distribution linear in p̂ (the least similar class gets 0); a row with all scores equal
      becomes uniform.
    - ``"none"``: the raw mean cosines, as the paper's formula writes them (no normalisation).

    The benchmark compares the three; "softmax" is the default because it is the only one with the
    zero-shot classifier's own scale.
    """
    p_hat = np.asarray(p_hat, dtype=np.float64)
    if how == "softmax":
        return softmax(scale * p_hat, axis=1)
    if how == "sum":
        q = p_hat - p_hat.min(axis=1, keepdims=True)
        s = q.sum(axis=1, keepdims=True)
        uniform = np.full_like(q, 1.0 / q.shape[1])
        return np.where(s > 0, q / np.where(s > 0, s, 1.0), uniform)
    if how == "none":
        return p_hat.copy()
    raise ValueError(f"teacher.air.aux_normalize: unknown value {how!r}; choose from {', '.join(AUX_NORMALIZATIONS)}.")


def fuse(p: np.ndarray, p_hat_norm: np.ndarray, lam: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(p*, p*/(1+λ)): p* = p + λ p̂ (N, C), and the same renormalised to a distribution.

    p (N, C) are the zero-shot probabilities, p_hat_norm (N, C) the normalised auxiliary scores.
    Downstream columns (probs/<teacher>.parquet, the ensemble) hold probabilities, so the second value
    divides by 1 + λ: its rows sum to 1 exactly when the rows of both inputs do ("softmax" and "sum"
    normalisations). With "none" it is only a rescaling of p* (its argmax and ranking are those of p*,
    its rows do not sum to 1). The argmax of both values is the same.
    """
    p = np.asarray(p, dtype=np.float64)
    p_hat_norm = np.asarray(p_hat_norm, dtype=np.float64)
    if p.shape != p_hat_norm.shape:
        raise ValueError(f"fuse: p has shape {p.shape} but p̂ has {p_hat_norm.shape}; both must be (N, C).")
    p_star = p + lam * p_hat_norm
    return p_star, p_star / (1.0 + lam)


def _scale(value: float | None) -> float:
    """A logit-scale setting as a number: the stage resolves null to the model's own scale before calling the
    pure functions; called directly with null they use a trained CLIP's 100."""
    return 100.0 if value is None else float(value)


def fused_probs(p_text: np.ndarray, image_features: np.ndarray, prototypes: Sequence[np.ndarray],
                cfg: AirCfg) -> dict[str, np.ndarray]:
    """ACG + PLG in one call: {"p_hat": raw (N, C), "p_hat_norm": normalised, "p_star": p + λ p̂,
    "p_fused": p*/(1+λ)} (see ``normalize_aux`` and ``fuse``)."""
    p_hat = aux_scores(image_features, prototypes)
    p_hat_norm = normalize_aux(p_hat, cfg.aux_normalize, _scale(cfg.aux_scale))
    p_star, p_fused = fuse(p_text, p_hat_norm, cfg.fusion_lambda)
    return {"p_hat": p_hat, "p_hat_norm": p_hat_norm, "p_star": p_star, "p_fused": p_fused}


def select_confident(p_fused: np.ndarray, top_n: int, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels): per class the top_n images by fused probability among those whose argmax is
    that class (UPL/CPL-style pseudo-labelled training set; the selection without a class prior).

    p_fused (N, C). Each image belongs to at most one class (its argmax; an argmax tie goes to the lower
    class index, as ``np.argmax``). Within a class, images are ranked by p_fused[:, c], highest first;
    equal values are ordered by ``keys`` (a seeded hash per image, teacher/prior.py ``tie_key``), or by image
    index when no keys are given. A class with fewer than top_n such images contributes all it has (no
    padding, no borrowing from other classes); a class no image prefers contributes none. Output is grouped
    by class (0..C-1), then by rank; both arrays are int64. With a class prior the stage selects with
    ``prior.select_top`` instead (balanced labels, ranked by margin).
    """
    p_fused = np.asarray(p_fused)
    pred = p_fused.argmax(axis=1)  # (N,)
    keys = np.arange(len(p_fused), dtype=np.float64) if keys is None else np.asarray(keys, np.float64)
    idx, lab = [], []
    for c in range(p_fused.shape[1]):
        rows = np.flatnonzero(pred == c)
        rows = rows[np.lexsort((keys[rows], -p_fused[rows, c]))][:top_n]
        idx.append(rows)
        lab.append(np.full(len(rows), c))
    return np.concatenate(idx).astype(np.int64), np.concatenate(lab).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# prompt learning (torch)
# ----------------------------------------------------------------------------------------------------

_PROMPT_LEARNER = None

_PROMPT_LEARNER_DOC = """``torch.nn.Module`` holding only the shared learnable context ``ctx`` (n_ctx, width).

    ``PromptLearner(ctx)`` wraps a given (n_ctx, width) tensor; ``PromptLearner.from_model(model,
    tokenizer, n_ctx, ctx_init, generator)`` initialises it from the token embeddings of ``ctx_init``
    (its token count must equal n_ctx) or from N(0, 0.02) when ``ctx_init`` is empty.
    ``tokenize(tokenizer, class_names)`` -> (C, L) ids of "X X ... X {class}."; ``text_features(model,
    tokenized)`` -> (C, D) unnormalised text features with the context in place of the X tokens,
    computed exactly as open_clip 3.x ``CLIP.encode_text``.

    The class is created on first access (``teacher.air.PromptLearner``), so that importing this module
    does not import torch.
    """


def __getattr__(name: str):
    if name == "PromptLearner":
        return _prompt_learner_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _prompt_learner_cls():
    global _PROMPT_LEARNER
    if _PROMPT_LEARNER is None:
        _PROMPT_LEARNER = _make_prompt_learner()
    return _PROMPT_LEARNER


def _make_prompt_learner():
    import torch

    class PromptLearner(torch.nn.Module):
        __doc__ = _PROMPT_LEARNER_DOC

        def __init__(self, ctx: "torch.Tensor"):
            super().__init__()
            if ctx.ndim != 2:
                raise ValueError(f"PromptLearner: context must be (n_ctx, width), got shape {tuple(ctx.shape)}.")
            self.ctx = torch.nn.Parameter(ctx.detach().clone().float())

        @property
        def n_ctx(self) -> int:
            return self.ctx.shape[0]

        @classmethod
        def from_model(cls, model, tokenizer, n_ctx: int, ctx_init: str = "", generator=None):
            _check_clip(model)
            width = model.token_embedding.weight.shape[1]
            if ctx_init:
                ids = _word_tokens(tokenizer, ctx_init)
                if len(ids) != n_ctx:
                    raise ValueError(f"teacher.air.ctx_init: {ctx_init!r} is {len(ids)} tokens but n_ctx is {n_ctx}; "
                                     f"set teacher.air.n_ctx={len(ids)} or ctx_init=\"\" (random init).")
                dev = model.token_embedding.weight.device
                with torch.no_grad():
                    ctx = model.token_embedding(torch.as_tensor(ids, device=dev)).float().cpu()
            else:
                ctx = torch.randn(n_ctx, width, generator=generator) * 0.02
            return cls(ctx)

        def tokenize(self, tokenizer, class_names: Sequence[str]) -> "torch.Tensor":
            return tokenize_prompts(tokenizer, class_names, self.n_ctx)

        def text_features(self, model, tokenized: "torch.Tensor") -> "torch.Tensor":
            return encode_text_with_context(model, tokenized, self.ctx)

    PromptLearner.__qualname__ = "PromptLearner"
    PromptLearner.__module__ = __name__
    return PromptLearner


def _check_clip(model) -> None:
    need = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_pool_type")
    missing = [a for a in need if not hasattr(model, a)]
    if missing:
        raise ValueError(f"AiR prompt learning needs an open_clip CLIP model with its text tower on the model "
                         f"(open_clip.CLIP); {type(model).__name__} lacks {', '.join(missing)}.")


def _word_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` between SOT and EOT (EOT = the highest id, as CLIP's tokenizer makes it)."""
    t = tokenizer([text])[0]
    eot = int(t.argmax())
    return [int(x) for x in t[1:eot]]


def tokenize_prompts(tokenizer, class_names: Sequence[str], n_ctx: int):
    """(C, L) token ids of "X X ... X {class}." (n_ctx placeholders right after SOT), checked."""
    prefix = " ".join([PLACEHOLDER] * n_ctx)
    names = [c.replace("_", " ") for c in class_names]
    tokens = tokenizer([f"{prefix} {c}." for c in names])
    x_ids = _word_tokens(tokenizer, PLACEHOLDER)
    if len(x_ids) != 1:
        raise ValueError(f"AiR prompt learning: the tokenizer splits {PLACEHOLDER!r} into {len(x_ids)} tokens; "
                         "it needs CLIP's BPE tokenizer.")
    L = tokens.shape[1]
    for i, c in enumerate(names):
        row = tokens[i]
        if not bool((row[1:1 + n_ctx] == x_ids[0]).all()):
            raise ValueError(f"AiR prompt learning: the prompt for class {c!r} does not start with {n_ctx} "
                             f"placeholder tokens; check the tokenizer.")
        if int(row.argmax()) >= L - 1 and int(row[-1]) != 0:
            raise ValueError(f"AiR prompt learning: class name {c!r} with {n_ctx} context tokens does not fit "
                             f"the text encoder's {L} tokens; shorten the name or lower teacher.air.n_ctx.")
    return tokens


def encode_text_with_context(model, tokenized, ctx):
    """open_clip ``CLIP.encode_text`` (3.x) with rows 1..n_ctx of the token embeddings replaced by ``ctx``.

    tokenized: (C, L) ids from ``tokenize_prompts``; ctx: (n_ctx, width), shared by all classes.
    Token embedding -> [SOT, ctx, class tokens, ".", EOT, pad] -> + positional embedding -> transformer
    (the model's causal ``attn_mask``; the Transformer itself handles ``batch_first``) -> ln_final ->
    pool at the model's ``text_pool_type`` ("argmax" = the EOT token, the highest id) -> text projection.
    Returns (C, D), not normalised, like ``encode_text(normalize=False)``.
    """
    import torch
    from open_clip.transformer import text_global_pool

    _check_clip(model)
    cast_dtype = model.transformer.get_cast_dtype()
    n_ctx = ctx.shape[0]
    x = model.token_embedding(tokenized).to(cast_dtype)  # (C, L, W)
    c = ctx.to(device=x.device, dtype=cast_dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (C, n_ctx, W)
    x = torch.cat([x[:, :1], c, x[:, 1 + n_ctx:]], dim=1)  # (C, L, W)
    x = x + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)  # (C, L, W)
    x = text_global_pool(x, tokenized, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(x, tuple):  # older open_clip returned (pooled, tokens)
        x = x[0]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x  # (C, D)


def loss_r(logits, labels):
    """L_r: mean cross-entropy of logits (B, C) to the integer pseudo-labels (B,)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, labels)


def loss_s(logits_strong, logits_weak):
    """L_s: mean over the batch of KL(softmax(weak) ‖ softmax(strong)); the weak view is the (detached)
    target, so gradients flow through the strong view only."""
    import torch.nn.functional as F

    target = F.softmax(logits_weak.detach(), dim=1)
    return F.kl_div(F.log_softmax(logits_strong, dim=1), target, reduction="batchmean")


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: linear warm-up lr·(s+1)/warmup for
    the first ``warmup`` steps (capped at total - 1), then cosine from lr to 0 over the rest."""
    warmup = max(0, min(warmup, total - 1))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def train_prompts(model, tokenizer, class_names: Sequence[str], weak_features, strong_batch: Callable | None,
                  labels, cfg: AirCfg, device: str = "cpu", progress: bool = True, domain: str = "photo"):
    """Train the shared context on pseudo-labelled images -> (ctx (n_ctx, width) CPU tensor, history).

    weak_features: (n, D) tensor/array, CLIP image features of the weak (evaluation-preprocessed) view of
    the n selected images, precomputed by the caller. strong_batch(positions) -> (b, 3, H, W) pixel
    tensor of a strong augmentation (``strong_transform``) of the images at those positions (0..n-1 of
    weak_features/labels); encoded here with ``model.encode_image`` under no_grad. Not called when
    cfg.beta == 0 (may be None then). labels: (n,) integer pseudo-labels.

    Per step: T = norm(text_features(ctx)) for all classes; logits = cfg.logit_scale · norm(f) · Tᵀ (a
    fixed scale, 100 by default: what a trained CLIP's exp(logit_scale) is, and what zero-shot and
    ``predict_with_context`` use); L = L_r(weak logits, labels) + β L_s(strong logits, weak logits).
    SGD (momentum, weight decay) with linear warm-up then cosine per step (``lr_at``). Only the
    context gets gradients: the CLIP model is frozen (requires_grad False, eval mode) for the run and
    its flags and mode are restored afterwards. Context init, data order and the strong augmentation
    (torch's global RNG, forked and restored) come from cfg.seed (None -> 0; the stage passes the job
    seed), so a run is deterministic. ``ctx_init`` may use {domain}.

    history: per-epoch lists "loss", "loss_r", "loss_s", "agreement" (weak-view argmax == label), "lr";
    plus "steps", "seconds".
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg.check()
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    weak = torch.as_tensor(np.asarray(weak_features, dtype=np.float32)) if not torch.is_tensor(weak_features) \
        else weak_features.detach().float().cpu()
    n, n_cls = len(labels), len(class_names)
    if n == 0:
        raise ValueError("AiR prompt learning: no pseudo-labelled images to train on.")
    if weak.ndim != 2 or len(weak) != n:
        raise ValueError(f"AiR prompt learning: weak_features must be (n, D) with n = {n} labels, got "
                         f"{tuple(weak.shape)}.")
    if int(labels.min()) < 0 or int(labels.max()) >= n_cls:
        raise ValueError(f"AiR prompt learning: labels must be in [0, {n_cls}), got {int(labels.min())}.."
                         f"{int(labels.max())}.")
    use_strong = cfg.beta > 0
    if use_strong and strong_batch is None:
        raise ValueError("AiR prompt learning: teacher.air.beta > 0 needs strong views (strong_batch); "
                         "pass one or set beta=0.")
    seed = 0 if cfg.seed is None else int(cfg.seed)
    weak = F.normalize(weak, dim=-1).to(device)
    labels = labels.to(device)
    bs = cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    scale = _scale(cfg.logit_scale)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    hist: dict[str, Any] = {k: [] for k in ("loss", "loss_r", "loss_s", "agreement", "lr")}
    t0 = time.perf_counter()
    fork_devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    try:
        model.requires_grad_(False)
        model.eval()
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            learner = _prompt_learner_cls().from_model(model, tokenizer, cfg.n_ctx, cfg.ctx_init.format(domain=domain),
                                                           generator=gen).to(device)
            tokenized = learner.tokenize(tokenizer, class_names).to(device)
            opt = torch.optim.SGD(learner.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
            step = 0
            bar = tqdm(total=total, desc="air prompts", unit="step", disable=not progress)
            for _epoch in range(cfg.epochs):
                perm = torch.randperm(n, generator=gen)
                sums = {"loss": 0.0, "loss_r": 0.0, "loss_s": 0.0, "agree": 0}
                for b in range(0, n, bs):
                    idx = perm[b:b + bs]
                    lr = lr_at(step, total, warmup, cfg.lr)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    text = F.normalize(learner.text_features(model, tokenized).float(), dim=-1)  # (C, D)
                    logits_w = scale * weak[idx.to(device)] @ text.T  # (b, C)
                    y = labels[idx.to(device)]
                    lr_loss = loss_r(logits_w, y)
                    ls_loss = torch.zeros((), device=logits_w.device)
                    if use_strong:
                        with torch.no_grad():
                            pix = strong_batch(idx.tolist()).to(device)
                            fs = F.normalize(model.encode_image(pix).float(), dim=-1)  # (b, D)
                        ls_loss = loss_s(scale * fs @ text.T, logits_w)
                    loss = lr_loss + cfg.beta * ls_loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    k = len(idx)
                    sums["loss"] += float(loss.detach()) * k
                    sums["loss_r"] += float(lr_loss.detach()) * k
                    sums["loss_s"] += float(ls_loss.detach()) * k
                    sums["agree"] += int((logits_w.detach().argmax(1) == y).sum())
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
                for key in ("loss", "loss_r", "loss_s"):
                    hist[key].append(sums[key] / n)
                hist["agreement"].append(sums["agree"] / n)
                hist["lr"].append(lr)
                from distillery import killpoints

                killpoints.progress("air.epoch", _epoch + 1)  # testing hook (no checkpoint: a rerun retrains)
            bar.close()
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
    hist["steps"] = total
    hist["seconds"] = round(time.perf_counter() - t0, 3)
    return learner.ctx.detach().cpu().clone(), hist


def strong_transform(preprocess, scale: tuple[float, float] = (0.3, 1.0)):
    """A strong augmentation for the L_s view, built from the model's own evaluation ``preprocess``.

    Reads the crop size, the resize interpolation and Normalize's mean/std from the Compose, and returns
    Compose([to RGB, RandomResizedCrop(size, scale), RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0.1)
    with p 0.8, RandomGrayscale(0.2), ToTensor, Normalize(mean, std)]) (SimCLR-style colour and crop).
    """
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    size = interp = mean = std = None
    for t in steps:
        if isinstance(t, T.Normalize):
            mean, std = list(t.mean), list(t.std)
        elif isinstance(t, (T.CenterCrop, T.RandomResizedCrop, T.RandomCrop)):
            size = t.size
        elif isinstance(t, T.Resize):
            interp = t.interpolation
            if size is None:
                size = t.size
    if size is None or mean is None:
        raise ValueError(f"strong_transform: cannot read the input size and Normalize from {preprocess!r}; "
                         "expected a torchvision Compose like open_clip's.")
    if isinstance(size, (list, tuple)):
        size = tuple(size) if len(size) == 2 else (size[0], size[0])
    kw = {"interpolation": interp} if interp is not None else {}
    return T.Compose([
        _ToRGB(),
        T.RandomResizedCrop(size, scale=scale, **kw),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class _ToRGB:
    """PIL image -> RGB (tensors and arrays pass); a class, not a lambda, so DataLoader workers can pickle it."""

    def __call__(self, im):
        return im.convert("RGB") if hasattr(im, "convert") else im

    def __repr__(self) -> str:
        return "ToRGB()"


def save_context(path: str | Path, ctx, meta: dict[str, Any]) -> None:
    """Write the context (n_ctx, width) to a safetensors file, atomically.

    ``meta`` must hold "class_names" (list) and may hold anything JSON-serialisable; stored as string
    metadata: n_ctx, width, ctx_init, class_names (JSON) and every other key JSON-encoded.
    """
    import torch
    from safetensors.torch import save_file

    from distillery.rundir import atomic_path, canonical_safetensors

    ctx = torch.as_tensor(ctx).detach().float().cpu().contiguous()
    if "class_names" not in meta:
        raise ValueError("save_context: meta needs 'class_names'.")
    md = {k: json.dumps(v) for k, v in meta.items()}
    md.update(n_ctx=json.dumps(int(ctx.shape[0])), width=json.dumps(int(ctx.shape[1])),
              ctx_init=json.dumps(meta.get("ctx_init", "")))
    with atomic_path(path) as tmp:
        save_file({"ctx": ctx}, str(tmp), metadata=md)
        canonical_safetensors(tmp)  # the same context gives the same bytes in every process


def load_context(path: str | Path):
    """(ctx (n_ctx, width) float32 tensor, meta dict) from ``save_context``'s file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        ctx = f.get_tensor("ctx")
    meta = {k: json.loads(v) for k, v in md.items()}
    if meta.get("n_ctx") != ctx.shape[0]:
        raise ValueError(f"load_context: {str(path)!r} says n_ctx={meta.get('n_ctx')} but holds {ctx.shape[0]} rows.")
    return ctx, meta


def context_text_features(model, tokenizer, ctx, class_names: Sequence[str]):
    """(C, D) L2-normalised text features of "<ctx> {class}." for every class, no gradients."""
    import torch
    import torch.nn.functional as F

    ctx = torch.as_tensor(ctx)
    dev = model.token_embedding.weight.device
    with torch.no_grad():
        tok = tokenize_prompts(tokenizer, class_names, ctx.shape[0]).to(dev)
        return F.normalize(encode_text_with_context(model, tok, ctx.to(dev)).float(), dim=-1)


def predict_with_context(model, tokenizer, ctx, class_names: Sequence[str], image_features,
                         scale: float | None = 100.0) -> np.ndarray:
    """(N, C) probabilities softmax(scale · norm(f) · norm(T_ctx)ᵀ) with the learnt context; the stage passes the
    scale it trained with (the model's own unless teacher.air.logit_scale says otherwise; None = 100)."""
    scale = _scale(scale)
    text = context_text_features(model, tokenizer, ctx, class_names).cpu().numpy().astype(np.float64)  # (C, D)
    f = l2_normalize(np.asarray(image_features))  # (N, D)
    return softmax(scale * f @ text.T, axis=1)


# ----------------------------------------------------------------------------------------------------
# the stage: registered as the teacher "air"
# ----------------------------------------------------------------------------------------------------

from .base import TeacherResult, TeacherSettings, register_teacher  # noqa: E402


@dataclass
class AirSettings(TeacherSettings, AirCfg):
    """``teacher.air``: :class:`AirCfg` as a registered teacher's settings (enabled, device + AiR's own)."""

    def check(self, key: str = "teacher.air") -> None:
        AirCfg.check(self, key)


@register_teacher("air", settings=AirSettings, roles=("clip",), needs=("teacher:clip", "synthetic", "features:clip"),
                  columns=("air_aux", "air_fused", "air_prompt"))
def run_air(ctx) -> TeacherResult:
    """AiR: auxiliary classifier from synthetic prototypes, fused with zero-shot CLIP, then prompt learning."""
    import torch

    from distillery.images import load_rgb
    from distillery.models import load_clip

    from .clip import image_features, prediction_sets, result_from_sets

    cfg, job = ctx.cfg, ctx.job
    device = ctx.device()
    seed = cfg.seed if cfg.seed is not None else job.seed
    model, preprocess, tokenizer = load_clip(job.models.clip, device=device)
    batch = job.teacher.clip.batch_size
    from distillery.images import ImageSet

    rows = ctx.synthetic or []
    names = job.class_names
    counts = np.bincount([r["class_index"] for r in rows], minlength=len(names)) if rows else np.zeros(len(names))
    if (counts == 0).any():
        raise ValueError(f"teacher.air: class {names[int(np.argmin(counts))]!r} has no synthetic images; AiR builds "
                         "its prototypes from them. Generate some (teacher.synth) or set teacher.air.enabled=false.")
    tricks = [r["trick"] for r in rows]
    # Prototype features at CLIP's resolution: from the full-size originals where synthesis kept them
    # (teacher.synth.keep_full_size), not from the output_size copies the student trains on.
    proto_paths = [r.get("full_path") or r["path"] for r in rows]
    proto_sha = [r.get("full_sha256") or r["sha256"] for r in rows]
    sets = prediction_sets(ctx)
    protos_set = ImageSet([Path(x) for x in proto_paths], proto_sha)
    all_feats = image_features(ctx, job.models.clip, preprocess, device, batch, [*sets.values(), protos_set])
    feats = dict(zip(sets, all_feats[:-1]))  # one pass through the feature store for every image set
    proto_feats = all_feats[-1]
    try:
        protos, chosen_rows = build_prototypes(proto_feats, [r["class_index"] for r in rows], len(names), cfg.k, cfg.m,
                                               tricks, cfg.prototype_tricks, return_rows=True)
    except ValueError as e:  # name the class, not its index
        raise ValueError(str(e).replace("AiR: class ", "teacher.air: class #")
                         + f" (classes: {', '.join(f'#{i} {n}' for i, n in enumerate(names))})") from e
    chosen = {"class_index": [], "class_name": [], "path": [], "sha256": [], "synthetic_path": [], "rank": []}
    for c, picked in enumerate(chosen_rows):  # the prototypes, for the report (most similar to the mean first)
        for rank, i in enumerate(picked):  # path/sha256: the image whose features are the prototype
            for k, v in (("class_index", c), ("class_name", names[c]), ("path", proto_paths[i]),
                         ("sha256", proto_sha[i]), ("synthetic_path", rows[i]["path"]), ("rank", rank)):
                chosen[k].append(v)
    p_zs = {"real": ctx.columns["clip"], "eval": ctx.eval_columns.get("clip"),
            "synthetic": ctx.synthetic_columns.get("clip")}
    from .clip import model_logit_scale
    from .prior import balanced_labels, log_probs, select_top, tie_key

    scale = model_logit_scale(model)
    run_cfg = AirCfg(**{k: getattr(cfg, k) for k in AirCfg.__dataclass_fields__})
    run_cfg.seed = seed
    run_cfg.aux_scale = float(cfg.aux_scale) if cfg.aux_scale is not None else scale
    run_cfg.logit_scale = float(cfg.logit_scale) if cfg.logit_scale is not None else scale
    out = _aux_and_fused_sets(p_zs, feats, protos, run_cfg, ctx.prior)
    prompt = {k: o[1] for k, o in out.items()}  # (aux, fused) per image set
    info = {"prototypes_per_class": [len(p) for p in protos], "synthetic_rows": len(rows),
            "aux_scale": round(run_cfg.aux_scale, 6), "logit_scale": round(run_cfg.logit_scale, 6)}
    tables = {"prototypes": chosen}
    if cfg.prompt_learning:
        keys = tie_key(ctx.images.sha256, seed)
        if ctx.prior is None:  # the papers' selection: argmax, ranked by fused probability (hash-ordered ties)
            idx, labels = select_confident(out["real"][1], cfg.top_n, keys)
        else:  # under the prior: balanced labels, ranked by margin of the fused log-probabilities
            z = log_probs(out["real"][1])
            idx, labels = select_top(z, balanced_labels(z, ctx.prior, keys), cfg.top_n, keys, len(names))
        info["prompt_label_counts"] = np.bincount(labels, minlength=len(names)).tolist()
        strong = strong_transform(preprocess)
        paths = ctx.images.paths

        def strong_batch(positions):
            return torch.stack([strong(load_rgb(paths[idx[i]])) for i in positions])

        ctx_vec, hist = train_prompts(model, tokenizer, names, feats["real"][idx], strong_batch, labels, run_cfg,
                                      device=device, progress=ctx.progress, domain=job.domain_phrase)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        save_context(ctx.out_dir / "context.safetensors", ctx_vec,
                     {"class_names": names, "ctx_init": cfg.ctx_init, "clip": job.models.clip})
        prompt = {k: predict_with_context(model, tokenizer, ctx_vec, names, feats[k], run_cfg.logit_scale) for k in out}
        tables["training_images"] = {"path": [str(paths[i]) for i in idx], "sha256": [ctx.images.sha256[i] for i in idx],
                                     "pseudo_label": labels.tolist()}
        info.update(prompt_training_images=len(idx), prompt_loss_first=hist["loss"][0], prompt_loss_last=hist["loss"][-1],
                    prompt_seconds=hist["seconds"])
    cols = ("air_aux", "air_fused", "air_prompt")
    return result_from_sets({k: dict(zip(cols, (o[0], o[1], prompt[k]))) for k, o in out.items()},
                            tables=tables, info=info)


def _aux_and_fused_sets(p_zs: dict, feats: dict, protos, cfg, prior) -> dict:
    """{image set: (air_aux, air_fused)}. With a class prior, the prototype classifier's own class bias is
    corrected first (its softmax column matched to the prior on the real images, the same bias applied to the
    other sets; teacher/prior.py), so that it is fused on the same footing as the prior-matched zero-shot."""
    out = {k: _aux_and_fused(p_zs[k], f, protos, cfg) for k, f in feats.items() if p_zs[k] is not None}
    if prior is None or cfg.aux_normalize != "softmax" or "real" not in out:
        return out
    from .prior import match_prior

    keys = [k for k in out if k != "real"]
    aux_real, aux_rest, _ = match_prior(out["real"][0], prior, [out[k][0] for k in keys])
    lam = cfg.fusion_lambda
    fixed = {}
    for k, aux in zip(["real", *keys], [aux_real, *aux_rest]):
        p = np.asarray(p_zs[k], np.float64)
        fixed[k] = (aux, fuse(p, aux, lam)[1])
    return fixed


def _aux_and_fused(p: np.ndarray, feats: np.ndarray, protos, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The two distribution columns: air_aux = softmax(aux_scale · p̂) (the auxiliary classifier alone, always as a
    distribution) and air_fused = p*/(1+λ); with aux_normalize "none" p* is clipped at 0 and renormalised."""
    r = fused_probs(p, feats, protos, cfg)
    fused = r["p_fused"]
    if cfg.aux_normalize == "none":
        fused = np.clip(r["p_star"], 0, None)
        fused = fused / np.maximum(fused.sum(axis=1, keepdims=True), 1e-12)
    return normalize_aux(r["p_hat"], "softmax", _scale(cfg.aux_scale)), fused
