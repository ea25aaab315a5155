"""Job files: one YAML file describes a whole run (classes, data, models, per-stage settings).

A job is loaded into plain dataclasses, validated, and can be overridden from the command line
with ``key=value`` pairs (``student.epochs=3``, ``teacher.synth.images_per_class=8``). Every
stage saves the resolved job next to what it writes, so any artifact can be traced back.

Relative paths in a job file are resolved against the folder the job file sits in.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .rundir import IMAGE_EXTENSIONS, settings_hash  # noqa: F401  (settings_hash: re-exported for callers)

__all__ = [
    "ClassSpec", "DataCfg", "ModelsCfg", "LoraCfg", "SynthCfg", "EnsembleCfg", "TeacherCfg",
    "StudentCfg", "ExportCfg", "Job", "JobError", "load_job", "apply_overrides", "settings_hash",
]


class JobError(ValueError):
    """A job file or override is invalid; the message names the key, the value and the fix."""


@dataclass
class ClassSpec:
    name: str  # the class as used in prompts, e.g. "annual crop land"
    folder: str | None = None  # folder name in an ImageFolder evaluation set, e.g. "AnnualCrop"


@dataclass
class DataCfg:
    unlabeled: str = ""  # folder of unlabeled domain images (searched recursively)
    eval: str | None = None  # optional labeled folder, ImageFolder layout; read by evaluation only
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))  # file endings counted as images (any case)


@dataclass
class ModelsCfg:
    # Each role is a hub id or a local folder, loaded by the owning library's own loader.
    diffusion: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers pipeline folder / id
    clip: str = "ViT-B-32/laion2b_s34b_b79k"  # open_clip "ARCH/TAG", "hf-hub:org/name" or a local folder
    captioner: str = "Salesforce/blip-image-captioning-base"  # transformers image-to-text model
    expert: str = "resnet18"  # timm model name, "hf-hub:..." or a local folder


@dataclass
class LoraCfg:
    # Domain LoRA (SPEC §2, AiR): low-rank adapters on the UNet attention projections, trained on the unlabeled images.
    enabled: bool = True  # train it (before synthesis) and generate with it; false = plain diffusion model
    rank: int = 8  # LoRA rank r
    alpha: float = 8.0  # LoRA alpha (update scaled by alpha / r)
    steps: int = 1000  # optimizer steps (SPEC: 1-2k)
    lr: float = 1e-4  # AdamW learning rate (constant)
    resolution: int | None = None  # training size in pixels; null = teacher.synth.resolution
    batch_size: int = 4  # images per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    caption: str = "a {domain}"  # text condition of every training image; {domain} = the job's domain phrase
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" autocast; CUDA only (ignored on CPU)
    gradient_checkpointing: bool = False  # trade compute for memory; CUDA only (ignored on CPU)
    seed: int | None = None  # adapter init, batches, noise and timesteps; null = the job seed
    checkpoint_steps: int = 100  # save a resumable checkpoint (teacher/lora/checkpoint.safetensors) every N steps; 0 = never
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...


@dataclass
class SynthCfg:
    enabled: bool = True  # use synthetic images at all (teachers that need them, the manifest)
    source: str = "generate"  # "generate" = run the diffusion model; "table" = use teacher/synthetic.parquet as placed in the run folder
    tricks: list[str] = field(default_factory=lambda: ["base"])  # SPEC §1 trick names
    images_per_class: int = 120  # per trick
    steps: int = 40  # DDIM steps
    guidance: float = 7.5  # classifier-free guidance scale (random_guidance draws its own)
    negative_prompt: str = ""  # empty = unconditional branch
    resolution: int = 512  # generation size in pixels (must suit the UNet)
    output_size: int | None = None  # resize to this size after generation (e.g. 64 for EuroSAT)
    antialias: bool = False  # anti-alias the resize (DDN: on for CIFAR, off for EuroSAT)
    batch_size: int = 8  # images per denoising batch
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...
    half: bool = True  # fp16 on CUDA (ignored on CPU)
    grid_samples: int = 4  # samples per class in the picture of each trick (teacher/grids/<trick>.png); 0 = none
    keep_full_size: list[str] | None = None  # tricks whose full-resolution originals are also kept (teacher/synthetic_full/) when output_size shrinks them, for AiR's prototype features at CLIP's resolution; null = AiR's prototype_tricks when AiR runs; [] = none


@dataclass
class EnsembleCfg:
    weights: dict[str, float] = field(default_factory=dict)  # teacher column -> fixed weight; {} = learned without labels (see weighting)
    weighting: str = "dawid_skene"  # with weights {}: "dawid_skene" (every column, weighted by its accuracy estimated without labels; teacher/fusion.py), or over each teacher's final column nobody builds on: "agreement" (how often its argmax agrees with the others') or "equal"
    redundancy_kappa: float = 0.9  # dawid_skene: columns whose Cohen's kappa reaches this count once (copies); the columns of one teacher always do
    collapse_tv: float = 0.5  # dawid_skene: a column whose predicted-class histogram is further than this (total variation) from the prior is dropped (1 = never)
    drop_synthetic_below: float = 0.0  # drop a synthetic image when the fused probability of its generating class is below this (0 = keep all; e.g. 0.05)
    use_synthetic: bool = True  # put synthetic images in the training manifest
    synthetic_weight: float = 1.0  # per-row weight of synthetic images
    min_confidence: float = 0.0  # real images below this fused confidence get weight 0


@dataclass
class PriorCfg:
    mode: str = "estimated"  # class prior the columns are matched to and selections made under (teacher/prior.py): none (the papers' behaviour), uniform, given, estimated (class sizes from the synthetic images' class means, not the text encoder)
    given: dict[str, float] = field(default_factory=dict)  # mode given: class name -> share (fractions or counts; normalised); every class named
    shrink: float = 0.0  # mode estimated: pi = (1 - shrink) * evidence + shrink * uniform (0 = the evidence alone; chosen in the stand-in bench: make bench BENCH=teacher_tune)


def _registered_teachers() -> dict[str, type]:
    """teacher name -> its settings dataclass, from the teacher registry (teacher modules register on import)."""
    from distillery.teacher import TEACHERS

    return {name: spec.settings for name, spec in TEACHERS.items()}


@dataclass
class TeacherCfg:
    lora: LoraCfg = field(default_factory=LoraCfg)
    synth: SynthCfg = field(default_factory=SynthCfg)
    ensemble: EnsembleCfg = field(default_factory=EnsembleCfg)
    prior: PriorCfg = field(default_factory=PriorCfg)
    # teacher.<name>: the settings of each registered probability teacher (teacher.clip, teacher.air, ...),
    # declared by the teacher's own module (see distillery/teacher/base.py), filled with defaults when absent.
    methods: dict[str, Any] = field(default_factory=dict)

    def settings(self, name: str) -> Any:
        """The settings of teacher ``name`` (its defaults if the job does not mention it)."""
        if name not in self.methods:
            known = _registered_teachers()
            if name not in known:
                raise KeyError(f"teacher {name!r} is not registered; available: {', '.join(known)}")
            self.methods[name] = known[name]()
        return self.methods[name]

    def __getattr__(self, name: str) -> Any:  # job.teacher.clip -> the clip teacher's settings
        methods = self.__dict__.get("methods")
        if methods is not None and name in methods:
            return methods[name]
        raise AttributeError(f"TeacherCfg has no attribute {name!r}")

    @classmethod
    def _dynamic_fields(cls) -> dict[str, type]:
        return _registered_teachers()


@dataclass
class StudentCfg:
    model: str = "mobilenetv3_small_100"  # any timm model name
    pretrained: str | None = None  # local weights file/folder, or null to train from scratch
    input_size: int | None = None  # override timm's default input size (square)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-4  # AdamW, DDN recipe
    weight_decay: float = 0.1  # SPEC §7: 0.1 for MobileNetV3, 0.3 EuroSAT ResNet
    distill_alpha: float = 0.0  # loss = a*tau^2*KL(soft^(T/tau) || student/tau) + (1-a)*CE(hard), teacher and student softened alike (SPEC §7); 0 = plain CE
    temperature: float = 2.0  # distillation temperature tau (not published by DDN; a common default)
    model_args: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs, e.g. drop_rate
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
    workers: int = 0  # DataLoader workers (kept alive across epochs)
    device: str = "auto"
    cache: bool = True  # decode + resize every image once into a uint8 memmap at the input size (student/cache.py)
    cache_dir: str | None = None  # where that cache lives; null = <run_dir>/cache (share one folder across jobs to reuse it)
    randaugment: str | None = None  # timm RandAugment config string, e.g. "rand-m9-mstd0.5"; null = off
    mixup: float = 0.0  # mixup Beta(a, a) parameter; 0 = off (soft targets and labels are mixed alike)
    cutmix: float = 0.0  # CutMix Beta(a, a) parameter; 0 = off (with mixup too, one of the two per batch)
    ema_decay: float = 0.0  # EMA of weights (timm ModelEmaV3 with warmup); 0 = off, e.g. 0.999; saved/evaluated when on
    channels_last: bool = False  # NHWC memory format (often faster on GPUs and oneDNN CPUs)
    compile: bool = False  # torch.compile the training forward/backward (first steps pay the compile time)
    checkpoint_steps: int = 0  # also checkpoint every N steps inside an epoch (0 = at epoch ends only)
    head: str = "logits"  # "logits" = class logits; "embedding" = regress the teacher CLIP image embedding (cosine), classify by cosine with class text embeddings (student/embedding.py)
    embedding_distill: float = 0.0  # head embedding: weight of an extra KD term on logit_scale*cos(emb, class texts) vs the soft labels (0 = off)


DEFAULT_MIN_AGREEMENT = {"fp32": 0.995, "fp16": 0.995, "int8": 0.98, "int8_qdq": 0.98, "sparse24": 0.95}  # export.min_agreement per format


@dataclass
class ExportCfg:
    opset: int = 17
    formats: list[str] = field(default_factory=lambda: ["fp32"])  # fp32, fp16, int8
    required: list[str] = field(default_factory=lambda: ["fp32"])  # formats whose failed gate fails the export
    min_agreement: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIN_AGREEMENT))
    parity_images: int = 64  # held-aside real domain images used for the parity check
    calibration_images: int = 128  # INT8 calibration images, class-balanced from the pseudo-labeled domain images
    int8_exclude: list[str] = field(default_factory=lambda: ["first_conv", "classifier"])  # layers kept in float in the INT8 model: first_conv, classifier (last Gemm/MatMul) or ONNX node names
    int8_reduce_range: bool = True  # 7-bit INT8 weights: avoids the saturating uint8 x int8 sums of x86 CPUs without VNNI (AVX2/AVX-512)
    int8_qat_epochs: int = 4  # quantisation-aware fine-tuning before INT8 (self-distillation on unlabeled domain images; 0 = plain post-training quantisation)
    int8_qat_images: int = 2000  # unlabeled domain images (not the parity ones) the INT8 fine-tuning sees
    int8_qat_lr: float = 1e-4  # its AdamW learning rate (cosine to 0)
    qdq_qat_epochs: int = 4  # int8_qdq (TensorRT-style QDQ by NVIDIA Model Optimizer): QAT epochs after calibration on the int8_qat_images (0 = calibration only)
    qdq_qat_lr: float = 1e-4  # its AdamW learning rate (cosine to 0)
    sparse24_epochs: int = 4  # sparse24 (2:4 structured sparsity, Model Optimizer): fine-tuning epochs under the mask on the int8_qat_images
    sparse24_lr: float = 1e-4  # its AdamW learning rate (cosine to 0)
    tensorrt: list[str] = field(default_factory=lambda: ["fp16", "int8"])  # engines to build where TensorRT + a GPU exist ([] = none); int8 only when int8 is exported
    tensorrt_batch: list[int] = field(default_factory=lambda: [1, 8, 32])  # min / opt / max batch of the engine's profile
    tensorrt_workspace_mb: int = 1024  # TensorRT builder workspace
    deploy_timing_s: float = 1.0  # onnxruntime CPU timing per passing format (batch 1) to pick the deploy format; 0 = no timing, the most precise passing format
    deploy_tolerance: float = 0.05  # a lower precision is deployed only when it is this much faster (0.05 = 5%) than a more precise passing format
    text_encoder: bool = False  # also export the CLIP text encoder (text_encoder.onnx + its BPE vocabulary) so a device embeds new class names (export/text_encoder.py)
    preprocess_in_graph: bool = False  # also write model.pre.onnx: input a decoded uint8 NHWC image, resize/crop/normalise as ONNX ops (report.json: pixel difference and top-1 agreement vs the Pillow path)


@dataclass
class RayCfg:
    # executor: ray (the distillery[ray] extra): the teachers' per-image work on a pool of model-holding Ray actors
    address: str | None = None  # a Ray cluster ("ray://host:10001" or "auto"); null = RAY_ADDRESS, else a local Ray
    workers: int | None = None  # actors; null = one per GPU (gpus_per_worker > 0) or one per cpus_per_worker CPUs
    cpus_per_worker: float = 1.0  # CPUs each actor reserves (and its torch threads)
    gpus_per_worker: float = 0.0  # GPUs each actor reserves (e.g. 1; 0 on CPU machines)


@dataclass
class Job:
    name: str = ""
    classes: list[ClassSpec] = field(default_factory=list)
    # Domain phrase used in prompts, e.g. "satellite photo". null = none: prompts that need one say "photo",
    # and the synthesis trick `all` then includes `class_prompt` (it is left out where a domain word is set).
    domain: str | None = None
    data: DataCfg = field(default_factory=DataCfg)
    run_dir: str | None = None  # relative: from the job file's folder; default: runs/<name> under the current folder
    models: ModelsCfg = field(default_factory=ModelsCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    seed: int = 0
    executor: str = "local"  # where the teachers' per-image work runs: local (this process) or ray (see ray)
    ray: RayCfg = field(default_factory=RayCfg)
    source: str | None = None  # path of the job file (filled in by load_job)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def domain_phrase(self) -> str:
        """The domain phrase for prompts: ``domain``, or "photo" when the job sets none."""
        return self.domain or "photo"

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["teacher"].update(d["teacher"].pop("methods"))  # teacher.clip, not teacher.methods.clip
        return d


# ----------------------------------------------------------------------------------------------
# Generic dataclass <-> dict conversion with errors that name the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is not None and type(None) in args:  # Optional[X] / X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise JobError(f"{key}: expected a mapping of settings, got {value!r}. "
                           f"Valid keys: {', '.join(f.name for f in dataclasses.fields(tp))}.")
        return _from_dict(tp, value, key)
    if origin is list:
        if isinstance(value, (str, dict)) or not hasattr(value, "__iter__"):
            raise JobError(f"{key}: expected a list, got {value!r}. Write it as a YAML list, e.g. [a, b].")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise JobError(f"{key}: expected a mapping, got {value!r}.")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise JobError(f"{key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(f"{key}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; it is a number all the same
            try:
                value = float(value.strip())
            except ValueError:
                raise JobError(f"{key}: expected a number, got {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JobError(f"{key}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise JobError(f"{key}: expected a string, got {value!r}.")
        return str(value)
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    dynamic = cls._dynamic_fields() if hasattr(cls, "_dynamic_fields") else {}
    if dynamic:  # keys declared elsewhere (registered teachers): parsed with their own dataclass
        data = dict(data)
        methods = {}
        for k, tp in dynamic.items():
            full = f"{prefix}.{k}" if prefix else k
            v = data.pop(k, None)
            methods[k] = tp() if v is None else _convert(v, tp, full)
        names = names - {"methods"} | set(dynamic)
        unknown = [k for k in data if k not in names or k == "methods"]
        if not unknown:
            out = _from_dict_fields(cls, hints, data, prefix)
            out.methods = methods
            return out
    else:
        unknown = [k for k in data if k not in names]
    if unknown:
        import difflib

        k = unknown[0]
        full = f"{prefix}.{k}" if prefix else k
        near = difflib.get_close_matches(str(k), names, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise JobError(f"{full}: unknown key.{hint} Valid keys here: {', '.join(sorted(names))}.")
    return _from_dict_fields(cls, hints, data, prefix)


def _from_dict_fields(cls: type, hints: dict, data: dict, prefix: str) -> Any:
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _convert(v, hints[k], full)
    return cls(**kwargs)


def _parse_classes(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise JobError(f"classes: expected a non-empty list of class names, got {raw!r}. "
                       "Write e.g. classes: [forest, river] or a list of {name: ..., folder: ...}.")
    out = []
    for i, c in enumerate(raw):
        if isinstance(c, str):
            out.append({"name": c})
        elif isinstance(c, dict):
            out.append(c)
        else:
            raise JobError(f"classes[{i}]: expected a name or a mapping {{name, folder}}, got {c!r}.")
    return out


# ----------------------------------------------------------------------------------------------
# Overrides


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw job dict (values parsed as YAML scalars/lists)."""
    for ov in overrides:
        if "=" not in ov:
            raise JobError(f"override {ov!r}: expected key=value, e.g. student.epochs=3.")
        key, _, text = ov.partition("=")
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise JobError(f"override {ov!r}: '{p}' is not a group of settings.")
            node = nxt
        node[parts[-1]] = _parse_scalar(text)
    return raw


# ----------------------------------------------------------------------------------------------
# Loading and validation


def _resolve_path(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_model_ref(value: str, base: Path) -> str:
    """A model reference that looks like a path becomes an absolute path; hub ids stay as they are.

    Paths are: anything starting with '.', '/', '~', containing a backslash, with two or more '/'
    or that exists relative to the job file's folder. 'org/name' and 'ARCH/TAG' are hub ids.
    """
    if value.startswith(("hf-hub:", "local-dir:")):
        return value
    looks_like_path = value.startswith((".", "/", "~")) or "\\" in value or value.count("/") >= 2
    if looks_like_path or (base / value).exists():
        return _resolve_path(value, base)
    return value


EXPORT_FORMATS = ("fp32", "fp16", "int8", "int8_qdq", "sparse24")  # the last two need distillery[modelopt]
LORA_PRECISIONS = ("no", "fp16", "bf16")


def validate(job: Job) -> Job:
    if not job.name or any(ch in job.name for ch in "/\\") or job.name.startswith("."):
        raise JobError(f"name: {job.name!r} is not a usable job name; give a short name without slashes, "
                       "e.g. name: eurosat-tiny (it names the run folder runs/<name>).")
    seen = set()
    for i, c in enumerate(job.classes):
        if not c.name.strip():
            raise JobError(f"classes[{i}].name: empty class name. Every class needs a name used in prompts.")
        if c.name in seen:
            raise JobError(f"classes[{i}].name: {c.name!r} appears twice; class names must be unique.")
        seen.add(c.name)
    if len(job.classes) < 2:
        raise JobError(f"classes: need at least 2 classes, got {len(job.classes)}.")
    if not job.data.unlabeled:
        raise JobError("data.unlabeled: missing. Name the folder of unlabeled domain images.")
    if not Path(job.data.unlabeled).is_dir():
        raise JobError(f"data.unlabeled: folder {job.data.unlabeled!r} does not exist. "
                       "Give the folder of unlabeled images (relative paths are taken from the job file's folder).")
    if job.data.eval is not None and not Path(job.data.eval).is_dir():
        raise JobError(f"data.eval: folder {job.data.eval!r} does not exist. Give an ImageFolder-layout "
                       "folder (one sub-folder per class) or remove the key.")
    from distillery.executor import EXECUTORS
    from distillery.teacher.synth import TRICK_NAMES

    if job.executor not in EXECUTORS:
        raise JobError(f"executor: unknown executor {job.executor!r}; choose from {', '.join(EXECUTORS)}.")
    if job.ray.workers is not None and job.ray.workers < 1 or job.ray.cpus_per_worker <= 0 \
            or job.ray.gpus_per_worker < 0:
        raise JobError(f"ray: workers must be >= 1 or null, cpus_per_worker > 0, gpus_per_worker >= 0; got "
                       f"{job.ray.workers}, {job.ray.cpus_per_worker}, {job.ray.gpus_per_worker}.")
    s = job.teacher.synth
    if s.source not in ("generate", "table"):
        raise JobError(f"teacher.synth.source: unknown value {s.source!r}; choose generate (run the diffusion model) "
                       "or table (use teacher/synthetic.parquet as placed in the run folder).")
    for t in s.tricks:
        if t not in TRICK_NAMES:
            raise JobError(f"teacher.synth.tricks: unknown trick {t!r}; choose from {', '.join(TRICK_NAMES)}.")
    for k in ("images_per_class", "steps", "resolution", "batch_size"):
        if getattr(s, k) < 1:
            raise JobError(f"teacher.synth.{k}: must be >= 1, got {getattr(s, k)}.")
    if s.resolution % 8:
        raise JobError(f"teacher.synth.resolution: {s.resolution} is not a multiple of 8 (the VAE downsamples by 8).")
    if s.output_size is not None and s.output_size < 8:
        raise JobError(f"teacher.synth.output_size: {s.output_size} is too small; use >= 8 or null.")
    if s.grid_samples < 0:
        raise JobError(f"teacher.synth.grid_samples: must be >= 0, got {s.grid_samples}.")
    lo = job.teacher.lora
    for k in ("rank", "steps", "batch_size", "grad_accum"):
        if getattr(lo, k) < 1:
            raise JobError(f"teacher.lora.{k}: must be >= 1, got {getattr(lo, k)}.")
    for k in ("alpha", "lr"):
        if getattr(lo, k) <= 0:
            raise JobError(f"teacher.lora.{k}: must be > 0, got {getattr(lo, k)}.")
    if lo.checkpoint_steps < 0:
        raise JobError(f"teacher.lora.checkpoint_steps: must be >= 0 (0 = no checkpoints), got {lo.checkpoint_steps}.")
    if lo.max_grad_norm < 0:
        raise JobError(f"teacher.lora.max_grad_norm: must be >= 0 (0 = no clipping), got {lo.max_grad_norm}.")
    if lo.resolution is not None and (lo.resolution < 8 or lo.resolution % 8):
        raise JobError(f"teacher.lora.resolution: {lo.resolution} is not a multiple of 8 >= 8 (the VAE downsamples "
                       "by 8); or use null for teacher.synth.resolution.")
    if lo.mixed_precision not in LORA_PRECISIONS:
        raise JobError(f"teacher.lora.mixed_precision: unknown value {lo.mixed_precision!r}; choose from "
                       f"{', '.join(LORA_PRECISIONS)}.")
    try:
        lo.caption.format(domain=job.domain_phrase)
    except (KeyError, IndexError, ValueError) as e:
        raise JobError(f"teacher.lora.caption: {lo.caption!r} is not a usable template ({type(e).__name__}: {e}); "
                       "the only placeholder is {domain}, e.g. 'a {domain}'.") from e
    _validate_teachers(job)
    _check_finite(job)
    st = job.student
    if st.input_size is not None and (isinstance(st.input_size, bool) or st.input_size < 16):
        raise JobError(f"student.input_size: {st.input_size} is too small; use a size >= 16 (e.g. 64 or 224) or null "
                       "for the model's default.")
    if not st.model.startswith(("hf-hub:", "local-dir:")):
        import timm

        if not timm.is_model(st.model):
            raise JobError(f"student.model: timm has no model {st.model!r}. Use a timm model name such as "
                           "mobilenetv3_small_100 or resnet18 (timm.list_models('*mobile*') lists them).")
    for k in ("epochs", "batch_size"):
        if getattr(st, k) < 1:
            raise JobError(f"student.{k}: must be >= 1, got {getattr(st, k)}.")
    if st.lr <= 0:
        raise JobError(f"student.lr: must be > 0, got {st.lr}.")
    if not 0.0 <= st.distill_alpha <= 1.0:
        raise JobError(f"student.distill_alpha: must be in [0, 1], got {st.distill_alpha}.")
    if st.temperature <= 0:
        raise JobError(f"student.temperature: must be > 0, got {st.temperature}.")
    if len(st.crop_scale) != 2 or not 0 < st.crop_scale[0] <= st.crop_scale[1] <= 1:
        raise JobError(f"student.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {st.crop_scale}.")
    for k in ("mixup", "cutmix", "checkpoint_steps"):
        if getattr(st, k) < 0:
            raise JobError(f"student.{k}: must be >= 0 (0 = off), got {getattr(st, k)}.")
    if not 0.0 <= st.ema_decay < 1.0:
        raise JobError(f"student.ema_decay: must be in [0, 1) (0 = off; typical 0.999-0.9999), got {st.ema_decay}.")
    if st.head not in ("logits", "embedding"):
        raise JobError(f"student.head: unknown value {st.head!r}; choose logits (class logits) or embedding (regress "
                       "the teacher CLIP's image embedding; classes by cosine with their text embeddings).")
    if st.embedding_distill < 0:
        raise JobError(f"student.embedding_distill: must be >= 0 (0 = off), got {st.embedding_distill}.")
    if st.randaugment is not None and not str(st.randaugment).startswith("rand"):
        raise JobError(f"student.randaugment: expected a timm RandAugment string such as 'rand-m9-mstd0.5' "
                       f"(or null to turn it off), got {st.randaugment!r}.")
    for f in job.export.formats + job.export.required:
        if f not in EXPORT_FORMATS:
            raise JobError(f"export.formats/required: unknown format {f!r}; choose from {', '.join(EXPORT_FORMATS)}.")
    for f in job.export.tensorrt:
        if f not in ("fp16", "int8"):
            raise JobError(f"export.tensorrt: unknown engine precision {f!r}; choose from fp16, int8 (or [] for none).")
    b = job.export.tensorrt_batch
    if len(b) != 3 or not 1 <= b[0] <= b[1] <= b[2]:
        raise JobError(f"export.tensorrt_batch: expected [min, opt, max] with 1 <= min <= opt <= max, got {b}.")
    ex = job.export
    if ex.int8_qat_epochs < 0 or ex.int8_qat_images < 0 or not ex.int8_qat_lr > 0:
        raise JobError(f"export.int8_qat_epochs / int8_qat_images / int8_qat_lr: expected >= 0, >= 0 and > 0, got "
                       f"{ex.int8_qat_epochs} / {ex.int8_qat_images} / {ex.int8_qat_lr} (defaults 4 / 2000 / 1e-4; "
                       "int8_qat_epochs: 0 turns quantisation-aware fine-tuning off).")
    if ex.qdq_qat_epochs < 0 or ex.sparse24_epochs < 0 or not (ex.qdq_qat_lr > 0 and ex.sparse24_lr > 0):
        raise JobError(f"export.qdq_qat_epochs / sparse24_epochs: expected >= 0, got {ex.qdq_qat_epochs} / "
                       f"{ex.sparse24_epochs}; export.qdq_qat_lr / sparse24_lr: expected > 0, got {ex.qdq_qat_lr} / "
                       f"{ex.sparse24_lr} (defaults 4 / 4 and 1e-4 / 1e-4).")
    for f, v in ex.min_agreement.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise JobError(f"export.min_agreement.{f}: a top-1 agreement must be in (0, 1], got {v!r} (e.g. 0.98).")
    for k in ("parity_images", "calibration_images"):
        if getattr(ex, k) < 1:
            raise JobError(f"export.{k}: must be >= 1, got {getattr(ex, k)}.")
    if ex.deploy_timing_s < 0 or not 0 <= ex.deploy_tolerance < 1:
        raise JobError(f"export.deploy_timing_s / deploy_tolerance: expected >= 0 and in [0, 1), got "
                       f"{ex.deploy_timing_s} / {ex.deploy_tolerance}.")
    for f in job.export.required:
        if f not in job.export.formats:
            raise JobError(f"export.required: {f!r} is required but not in export.formats {job.export.formats}; add it.")
    return job


def _check_finite(node: Any, key: str = "") -> None:
    """Every number in the job is finite: NaN passes every `<`/`>` range check (``student.lr: .nan`` would train on
    NaN), so it is refused here, naming the key."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
        if isinstance(node, TeacherCfg):
            for name, cfg in node.methods.items():
                _check_finite(cfg, f"{key}.{name}")
    elif isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise JobError(f"{key}: {node} is not a finite number; give a number.")


def _validate_teachers(job: Job) -> None:
    """Each teacher's own checks, then the ensemble's weights against the columns that will exist."""
    from distillery.teacher import TEACHERS, all_columns, teachers_to_run

    for name in TEACHERS:
        try:
            job.teacher.settings(name).check(f"teacher.{name}")
        except ValueError as e:
            raise JobError(str(e)) from e
    running = teachers_to_run(job)
    for name in running:
        for col in job.teacher.settings(name).reads():
            owner = all_columns().get(col)
            if owner is None or owner not in running or running.index(owner) > running.index(name):
                raise JobError(f"teacher.{name}: reads the column {col!r}, which no teacher running before it writes "
                               f"(running: {', '.join(running)}); enable its teacher or choose another column.")
        if "synthetic" in TEACHERS[name].needs and not job.teacher.synth.enabled:
            raise JobError(f"teacher.{name}: needs the synthetic images, but teacher.synth.enabled is false; enable "
                           f"synthesis (or teacher.synth.source=table) or set teacher.{name}.enabled=false.")
    pr = job.teacher.prior
    from distillery.teacher.prior import PRIOR_MODES, given_prior

    if pr.mode not in PRIOR_MODES:
        raise JobError(f"teacher.prior.mode: unknown value {pr.mode!r}; choose {', '.join(PRIOR_MODES)} (none = no "
                       "correction, the papers' behaviour).")
    if not (isinstance(pr.shrink, (int, float)) and math.isfinite(pr.shrink) and 0.0 <= pr.shrink <= 1.0):
        raise JobError(f"teacher.prior.shrink: must be a number in [0, 1] (0 = the evidence alone, 1 = uniform), "
                       f"got {pr.shrink!r}.")
    for k, v in pr.given.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise JobError(f"teacher.prior.given.{k}: share must be a number > 0, got {v!r}.")
    if pr.mode == "given":
        try:
            given_prior(pr, job.class_names)
        except ValueError as e:
            raise JobError(str(e)) from e
    elif pr.given:
        raise JobError(f"teacher.prior.given is set but teacher.prior.mode is {pr.mode!r}; set teacher.prior.mode=given "
                       "to use the shares, or remove teacher.prior.given.")
    columns = all_columns()
    en = job.teacher.ensemble
    if en.weighting not in ("dawid_skene", "agreement", "equal"):
        raise JobError(f"teacher.ensemble.weighting: unknown value {en.weighting!r}; choose dawid_skene, agreement or "
                       "equal (or give fixed teacher.ensemble.weights).")
    for name, lo, hi in (("redundancy_kappa", 0.0, 1.0), ("collapse_tv", 0.0, 1.0)):
        v = getattr(en, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
            raise JobError(f"teacher.ensemble.{name}: must be a number in ({lo:g}, {hi:g}], got {v!r}.")
    if not 0.0 <= en.drop_synthetic_below < 1.0:
        raise JobError(f"teacher.ensemble.drop_synthetic_below: must be in [0, 1) (0 = keep every synthetic image), "
                       f"got {en.drop_synthetic_below}.")
    if not en.weights:
        return
    for col, w in job.teacher.ensemble.weights.items():
        if w < 0:
            raise JobError(f"teacher.ensemble.weights.{col}: negative weight {w}; weights must be >= 0.")
        if col not in columns:
            raise JobError(f"teacher.ensemble.weights.{col}: no teacher writes a column {col!r}; columns: "
                           f"{', '.join(columns)}.")
        if w > 0 and columns[col] not in running:
            raise JobError(f"teacher.ensemble.weights.{col}: weight {w}, but the {columns[col]!r} teacher is "
                           f"disabled (teacher.{columns[col]}.enabled=false); enable it or set the weight to 0.")
    if not any(w > 0 for w in job.teacher.ensemble.weights.values()):
        raise JobError("teacher.ensemble.weights: all weights are zero; give at least one teacher column a "
                       "weight > 0.")


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(node) -> None:
    """Raise _DuplicateKey for a mapping anywhere in a composed YAML node tree that gives a key twice (PyYAML keeps
    the last one silently, so a second ``student:`` block would drop the first without a word)."""
    import yaml

    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict = {}
            for key_node, value_node in n.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise _DuplicateKey(f"the key {key_node.value!r} is given twice (lines {seen[key] + 1} and "
                                            f"{key_node.start_mark.line + 1}); merge the two blocks into one.")
                    seen[key] = key_node.start_mark.line
                stack.extend((key_node, value_node))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> Job:
    """Load, override, resolve and validate a job file."""
    import yaml

    path = Path(path)
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))
        raise JobError(f"job file {str(path)!r} is a folder; pass the job file itself" +
                       (f", e.g. --job {path / yamls[0]}" if yamls else " (a .yaml file)") + ".")
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
        except RuntimeError as e:  # a symlink loop
            raise JobError(f"job file {str(path)!r} is a symbolic link that loops ({e}); point it at the job file.") \
                from e
        except OSError:
            pass
        raise JobError(f"job file {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not exist.")
    if not path.is_file():
        raise JobError(f"job file {str(path)!r} not found. Pass --job FILE, e.g. --job examples/eurosat-tiny.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.load(text, Loader=yaml.SafeLoader) or {}
    except _DuplicateKey as e:
        raise JobError(f"job file {str(path)!r}: {e}") from e
    except UnicodeDecodeError as e:
        raise JobError(f"job file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8.") \
            from e
    except yaml.YAMLError as e:
        raise JobError(f"job file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise JobError(f"job file {str(path)!r}: expected a mapping of settings at the top level.")
    raw.setdefault("name", path.stem)
    job = job_from_dict(raw, path.resolve().parent, overrides)
    job.source = str(path.resolve())
    return job


def job_from_dict(raw: dict, base: str | os.PathLike = ".", overrides: list[str] | None = None) -> Job:
    """Build a job from a raw dict; relative paths resolve against ``base`` (the job file's folder)."""
    import copy

    raw = apply_overrides(copy.deepcopy(raw), list(overrides or []))
    raw["classes"] = _parse_classes(raw.get("classes"))
    job = _from_dict(Job, raw)
    base = Path(base).resolve()
    job.data.unlabeled = _resolve_path(job.data.unlabeled, base) if job.data.unlabeled else ""
    job.data.eval = _resolve_path(job.data.eval, base)
    # a run_dir given in the job is a path like any other (from the job file's folder); the default is not
    job.run_dir = _resolve_path(job.run_dir, base) if job.run_dir else str((Path("runs") / job.name).resolve())
    for f in dataclasses.fields(ModelsCfg):
        setattr(job.models, f.name, resolve_model_ref(getattr(job.models, f.name), base))
    if job.student.pretrained:
        job.student.pretrained = resolve_model_ref(job.student.pretrained, base)
    if job.student.cache_dir:
        job.student.cache_dir = _resolve_path(job.student.cache_dir, base)
    return validate(job)
