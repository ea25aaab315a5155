"""Tiny, randomly initialised models for every role, built from the configs in ``tiny_configs/``.

No pretrained weights can be downloaded in tests or CI, so the demo job and the test suite use
*the same classes* a real run uses (diffusers ``UNet2DConditionModel``/``AutoencoderKL``,
transformers ``CLIPTextModel``/BLIP, open_clip ``CLIP``, a timm ResNet) at tiny sizes, seeded,
saved once to a local folder in each library's own format and then loaded through the very same
``from_pretrained`` / ``create_model`` calls that a real model id goes through.

Their outputs are noise: they exercise the machinery, not the method.
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "tiny_configs"
ROLES = ("diffusion", "clip", "captioner", "expert")
VERSION = "1"  # bump when a config or the build changes, so stale folders are rebuilt


def _cfg(name: str) -> dict:
    cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    cfg.pop("_comment", None)
    return cfg


def _bpe_merges() -> list[str]:
    """CLIP's BPE merges, read from the vocabulary file that ships inside open_clip."""
    import open_clip.tokenizer as oct

    path = Path(oct.default_bpe())
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # Same slice as open_clip's SimpleTokenizer: 49152 - 256 - 2 merges after the header line.
    return lines[1: 49152 - 256 - 2 + 1]


def write_clip_tokenizer(folder: Path) -> None:
    """Write a Hugging Face CLIP tokenizer (vocab.json + merges.txt) built offline from open_clip's BPE."""
    from open_clip.tokenizer import bytes_to_unicode

    merges = _bpe_merges()
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.model_max_length = 77
    tok.save_pretrained(folder)


def write_bert_vocab(folder: Path, size: int = 4000) -> None:
    """A WordPiece vocabulary for the tiny BLIP captioner: special tokens + the commonest CLIP words."""
    from transformers import BertTokenizer

    words: list[str] = []
    seen = set()
    for m in _bpe_merges():
        w = "".join(m.split())
        if w.endswith("</w>"):
            w = w[:-4]
            if w.isascii() and w.isalpha() and w.lower() == w and w not in seen:
                seen.add(w)
                words.append(w)
        if len(words) >= size:
            break
    chars = [chr(c) for c in range(33, 127)]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + chars + [w for w in words if w not in chars]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)


def build_diffusion(out: Path, seed: int = 0) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_cfg("unet"))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**_cfg("vae"))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_cfg("text_encoder")))
    tok_dir = out / "_tok"
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = DDIMScheduler(**_cfg("scheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir)


def build_clip(out: Path, seed: int = 0) -> None:
    """Save an open_clip model as a local folder (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = _cfg("open_clip")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg["model_cfg"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def build_captioner(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    cfg = _cfg("captioner")
    tok_dir = out / "_tok"
    write_bert_vocab(tok_dir)
    tokenizer = BertTokenizer.from_pretrained(tok_dir)
    text_cfg = dict(cfg["text_config"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                    eos_token_id=tokenizer.sep_token_id)
    config = BlipConfig(text_config=text_cfg, vision_config=cfg["vision_config"])
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.config.text_config.bos_token_id = tokenizer.cls_token_id
    model.generation_config.bos_token_id = tokenizer.cls_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    size = cfg["image_size"]
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    shutil.rmtree(tok_dir)


def build_expert(out: Path, seed: int = 0) -> None:
    """Save a timm model in timm's Hugging Face folder format (config.json + model.safetensors)."""
    import timm
    import torch
    from safetensors.torch import save_file

    cfg = _cfg("expert")
    torch.manual_seed(seed)
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    out.mkdir(parents=True, exist_ok=True)
    config = {"architecture": cfg["architecture"], "num_classes": 0, "num_features": model.num_features,
              "model_args": cfg["model_args"], "pretrained_cfg": cfg["pretrained_cfg"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))


def _configs_hash() -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(CONFIG_DIR.glob("*.json")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


BUILDERS = {"diffusion": build_diffusion, "clip": build_clip, "captioner": build_captioner, "expert": build_expert}


def build_tiny_models(out: str | Path, roles=ROLES, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Build (once) the tiny models into ``out/<role>``; a folder already built at this version is kept."""
    out = Path(out)
    paths = {}
    for role in roles:
        folder = out / role
        marker = folder / ".distillery-tiny.json"
        stamp = {"version": VERSION, "seed": seed, "configs": _configs_hash()}
        if not force and marker.is_file() and json.loads(marker.read_text()) == stamp:
            paths[role] = folder
            continue
        tmp = out / f".{role}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        BUILDERS[role](tmp, seed=seed)
        (tmp / ".distillery-tiny.json").write_text(json.dumps(stamp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        paths[role] = folder
    return paths
