"""Quantisation-aware fine-tuning (QAT) before INT8 export (``export.int8_qat_epochs``).

Post-training INT8 of a small, from-scratch MobileNetV3 loses several points (measured on EuroSAT: 3.7-5
points of top-1): every one of its ~140 quantised tensors alone already flips 1-6% of the top-1 labels.
QAT lets the weights adapt to the rounding the INT8 model will do:

1. a copy of the student with every Conv2d + BatchNorm2d pair folded into one Conv2d (checked: the folded
   copy must reproduce the student's logits), which is what onnxruntime quantises;
2. fake quantisation that mirrors onnxruntime's static QDQ: per-output-channel symmetric weights (7 bits with
   ``export.int8_reduce_range``, else 8), per-tensor asymmetric uint8 activations on the outputs of convs,
   activations, squeeze-excite products, residual sums and pooling, with MinMax ranges re-measured on the
   calibration images before every epoch. Layers ``export.int8_exclude`` keeps in float (the first conv,
   the classifier) get no weight rounding;
3. self-distillation: the loss is the KL divergence from the *original* student's softened outputs, on the
   job's own unlabeled domain images (random horizontal flips). No labels of any kind are read.

The fine-tuned float weights are then exported and quantised by onnxruntime exactly as without QAT; the
parity gate still compares the INT8 model with the original student. Straight-through gradients come from
``torch.fake_quantize_per_{channel,tensor}_affine``.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from .formats import INT8_EXCLUDE_KEYWORDS

_ACTIVATIONS = ("ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "SiLU", "Sigmoid", "GELU", "Tanh", "LeakyReLU")


def fold_batchnorm(model):
    """A copy of ``model`` (eval mode) with each Conv2d folded with the BatchNorm2d registered right after it
    in the same parent (timm's conv/bn layout); the BatchNorm keeps its activation but becomes an identity
    affine. Returns (folded model, number of folds)."""
    import torch
    from torch import nn

    model = copy.deepcopy(model).eval()
    folds = 0
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, conv), (_, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.num_features == conv.out_channels and bn.track_running_stats and bn.affine):
                continue
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                new_bias = (bias - bn.running_mean) * scale + bn.bias
                if conv.bias is None:
                    conv.bias = nn.Parameter(new_bias)
                else:
                    conv.bias.copy_(new_bias)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
                bn.weight.fill_(1.0)
                bn.bias.zero_()
            bn.requires_grad_(False)  # stays the identity: fine-tuning moves the conv, not a BN after its rounding
            folds += 1
    return model, folds


def _weight_fake_quant(bits: int):
    """A parametrisation module: per-output-channel symmetric fake quantisation of a conv/linear weight on
    onnxruntime's grid: [-127, 127] for 8 bits, [-64, 64] with reduce_range ("7 bits"), likewise
    [-2^(b-1), 2^(b-1)] below 8 bits."""
    import torch
    from torch import nn

    qmax = 127 if bits >= 8 else 2 ** (bits - 1)

    class WeightFakeQuant(nn.Module):
        enabled = True  # off while activation ranges are measured: onnxruntime calibrates the float model

        def forward(self, w):
            if not self.enabled:
                return w
            scale = w.detach().abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-12) / qmax
            zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -qmax, qmax)

    return WeightFakeQuant()


class _ActivationQuant:
    """Hooks that fake-quantise module outputs (``"out"``) or first inputs (``"in"``) to uint8 with per-tensor
    MinMax ranges (zero included), as onnxruntime's static QDQ does."""

    def __init__(self, points: list):
        self.modules = [p if isinstance(p, tuple) else (p, "out") for p in points]
        self.ranges: dict[int, list[float]] = {}
        self.mode = "off"  # off | observe | quantise
        self.handles = []
        for i, (m, where) in enumerate(self.modules):
            if where == "in":
                self.handles.append(m.register_forward_pre_hook(self._pre_hook(i)))
            else:
                self.handles.append(m.register_forward_hook(self._hook(i)))

    def _apply(self, i: int, x):
        import torch

        if not isinstance(x, torch.Tensor) or self.mode == "off":
            return None
        if self.mode == "observe":
            lo, hi = float(x.detach().min()), float(x.detach().max())
            old = self.ranges.get(i)
            self.ranges[i] = [min(lo, old[0]), max(hi, old[1])] if old else [lo, hi]
            return None
        lo, hi = self.ranges[i]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        zero = int(min(255, max(0, round(-lo / scale))))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    def _hook(self, i: int):
        return lambda _module, _inputs, out: self._apply(i, out)

    def _pre_hook(self, i: int):
        def hook(_module, inputs):
            x = self._apply(i, inputs[0]) if inputs else None
            return None if x is None else (x, *inputs[1:])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _replace_children(model, match, make) -> int:
    """Replace every submodule for which ``match(module)`` holds by ``make()``; returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make())
                n += 1
    return n


def _split_hardswish(model) -> int:
    """Replace each ``nn.Hardswish`` by x * Hardsigmoid(x) with the Hardsigmoid as its own module: onnxruntime
    runs (and quantises) HardSwish as those two nodes. Returns how many were replaced."""
    from torch import nn

    class SplitHardswish(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(x)

    return _replace_children(model, lambda m: isinstance(m, nn.Hardswish), SplitHardswish)


def _join_hardswish(model) -> None:
    """Undo :func:`_split_hardswish` (the exported graph gets its HardSwish nodes back)."""
    from torch import nn

    _replace_children(model, lambda m: type(m).__name__ == "SplitHardswish", nn.Hardswish)


def _followed_by_relu(model) -> set:
    """ids of the convs whose next sibling is a ReLU, a BatchNorm whose ``act`` is one (timm), or a plain
    BatchNorm followed by one (torchvision): onnxruntime drops such a ReLU and quantises the conv output with
    the ReLU's range instead, so the conv output is not rounded on its own."""
    from torch import nn

    out = set()
    for parent in model.modules():
        children = list(parent.children())
        for i, a in enumerate(children[:-1]):
            if not isinstance(a, nn.Conv2d):
                continue
            b = children[i + 1]
            if isinstance(b, nn.BatchNorm2d) and not hasattr(b, "act") and i + 2 < len(children):
                b = children[i + 2]
            if isinstance(getattr(b, "act", b), (nn.ReLU, nn.ReLU6)):
                out.add(id(a))
    return out


def _quant_points(model, skip: set) -> tuple[list, list]:
    """(modules whose weight is rounded, [(module, "out" | "in")] whose output or input is rounded), mirroring
    where onnxruntime's QDQ quantiser puts its nodes on a folded graph: conv outputs (also of a float conv
    whose consumers are quantised), activations (HardSwish as HardSigmoid and the product), the squeeze-excite
    mean (the input of its first conv), its product, residual sums, pooling."""
    from torch import nn

    relu_next = _followed_by_relu(model)
    weights, points = [], []
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and id(first) not in skip:
        points.append((first, "in"))  # a quantised first conv: the network input itself is rounded
    for m in model.modules():
        name = type(m).__name__
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if id(m) not in skip:
                weights.append(m)
            if (isinstance(m, nn.Conv2d) and id(m) not in relu_next) or (isinstance(m, nn.Linear) and id(m) not in skip):
                points.append((m, "out"))
        elif name in _ACTIVATIONS or name == "SplitHardswish" or "Pool" in name and not list(m.children()):
            points.append((m, "out"))
        elif hasattr(m, "conv_reduce") and hasattr(m, "conv_expand"):
            points += [(m.conv_reduce, "in"), (m, "out")]  # the mean, the product
        elif getattr(m, "has_skip", False):
            points.append((m, "out"))  # residual sum
    return weights, points


def _excluded_modules(model, exclude: list[str]) -> set:
    """The modules ``export.int8_exclude`` keeps in float: "first_conv" (first Conv2d), "classifier" (last
    Linear). Node names of the ONNX graph have no module counterpart here and are ignored."""
    from torch import nn

    first_conv, classifier = INT8_EXCLUDE_KEYWORDS
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    out = set()
    if first_conv in exclude and convs:
        out.add(id(convs[0]))
    if classifier in exclude and linears:
        out.add(id(linears[-1]))
    return out


class SimulatedInt8:
    """A folded copy of ``model`` that computes what onnxruntime's static QDQ INT8 model will: rounded weights
    (parametrisations) and rounded activations (hooks) at the places listed by :func:`_quant_points`, on the
    grid :meth:`calibrate` measures. ``check``: images on which folding must keep the logits (else
    RuntimeError)."""

    def __init__(self, model, *, exclude=(), weight_bits: int = 7, check: np.ndarray | None = None):
        import torch
        from torch.nn.utils import parametrize

        self.model, self.folds = fold_batchnorm(model)
        if check is not None:
            probe = torch.from_numpy(check)
            with torch.no_grad():
                ref = model.eval()(probe)
                drift = float((self.model(probe) - ref).abs().max())
            if drift > 1e-3 * max(float(ref.abs().max()), 1.0):
                raise RuntimeError(f"QAT: folding BatchNorm into the convolutions changed the logits by "
                                   f"{drift:.3g}; this architecture's layout is not supported, set "
                                   "export.int8_qat_epochs: 0")
        self.hardswish_split = _split_hardswish(self.model)
        for m in self.model.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
        self.weights, self.points = _quant_points(self.model, _excluded_modules(self.model, list(exclude)))
        for m in self.weights:
            parametrize.register_parametrization(m, "weight", _weight_fake_quant(weight_bits))
        self.act = _ActivationQuant(self.points)

    def calibrate(self, images: np.ndarray, batch: int = 64) -> None:
        """MinMax activation ranges of the float model (float weights, no rounding), as onnxruntime measures
        them: the simulated rounding grid is then the one the INT8 model will use."""
        import torch

        quantisers = [m.parametrizations.weight[0] for m in self.weights]
        self.act.mode, self.act.ranges = "observe", {}
        for q in quantisers:
            q.enabled = False
        with torch.no_grad():
            for i in range(0, len(images), batch):
                self.model(torch.from_numpy(images[i:i + batch]))
        for q in quantisers:
            q.enabled = True
        self.act.mode = "quantise"

    def release(self):
        """The plain float model with the current weights: hooks and parametrisations removed, HardSwish
        joined again."""
        from torch.nn.utils import parametrize

        self.act.remove()
        for m in self.weights:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        _join_hardswish(self.model)
        return self.model.eval()


def qat_finetune(model, images: np.ndarray, calibration: np.ndarray, *, epochs: int, lr: float = 1e-4,
                 batch_size: int = 32, temperature: float = 1.0, weight_bits: int = 7,
                 exclude: list[str] = (), seed: int = 0, progress: bool = True) -> tuple[Any, dict]:
    """Fine-tune a folded copy of ``model`` under simulated INT8 (see the module docstring) on ``images``
    (preprocessed float32 NCHW) for ``epochs``; ranges from ``calibration``. Returns (the float model with
    the fine-tuned weights, what was done)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from distillery.rundir import log
    from distillery.student.loss import distillation_loss

    def kl(logits, probs):  # tau^2 * KL(probs || softmax(logits / tau)), mean over rows (SPEC section 7, alpha 1)
        return distillation_loss(logits, probs, probs.argmax(1), temperature=temperature, alpha=1.0,
                                 target_temperature=temperature)  # probs are the teacher's softmax at tau already

    if epochs < 1 or len(images) == 0 or len(calibration) == 0:
        raise ValueError(f"QAT needs epochs >= 1 and some images, got epochs={epochs}, {len(images)} images, "
                         f"{len(calibration)} calibration images")
    teacher = model.eval()
    sim = SimulatedInt8(model, exclude=exclude, weight_bits=weight_bits, check=calibration[:16])
    student = sim.model  # eval mode throughout: BatchNorm is folded, dropout stays off

    probe_x = torch.from_numpy(images[:256])
    with torch.no_grad():
        probe_t = F.softmax(teacher(probe_x) / temperature, dim=1)

    def simulated_kl() -> float:
        """KL from the student of the simulated INT8 model (ranges re-measured) on the first 256 images."""
        sim.calibrate(calibration)
        with torch.no_grad():
            return float(kl(student(probe_x), probe_t))

    kl_before = simulated_kl()
    g = torch.Generator().manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(images) / batch_size))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    history = []
    bar = tqdm(total=total, desc="export: int8 QAT", disable=not progress, leave=False)
    for epoch in range(epochs):
        sim.calibrate(calibration)
        order = torch.randperm(len(images), generator=g)
        total_loss = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            x = torch.from_numpy(images[idx.numpy()])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
            with torch.no_grad():
                target = F.softmax(teacher(x) / temperature, dim=1)
            loss = kl(student(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / (s + 1):.4f}")
        history.append(round(total_loss / steps_per_epoch, 5))
        log(f"export: int8 QAT epoch {epoch + 1}/{epochs}: KL to the student {history[-1]:.4f}")
    bar.close()
    kl_after = simulated_kl()
    student = sim.release()
    info = {"epochs": epochs, "images": int(len(images)), "lr": lr, "temperature": temperature,
            "weight_bits": weight_bits, "batchnorm_folds": sim.folds, "hardswish_split": sim.hardswish_split,
            "weights_rounded": len(sim.weights), "activations_rounded": len(sim.points), "kl_by_epoch": history,
            "simulated_int8_kl": {"before": float(f"{kl_before:.4g}"), "after": float(f"{kl_after:.4g}")}}
    return student, info
