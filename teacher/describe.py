"""LaTTe-CLIP's synthetic texts (SPEC §4): image and group descriptions from a captioner.

Pure pieces the LaTTe-CLIP stage puts together:

- :func:`image_prompt` / :func:`group_prompt`: the paper's prompts with the job's domain filled in.
- :func:`group_canvas`: the images of one group (paper: 4 with the same zero-shot label) tiled on one
  672 x 672 canvas, which the captioner describes as a single image.
- :func:`describe`: batched greedy generation through transformers (a chat template where the processor
  has one, LLaVA style; else BLIP-style unconditional captioning).
- :func:`clean_description`: an empty / non-text output falls back to the class description, an
  overlong one is cut to the CLIP text encoder's context.
- :class:`DescriptionCache` + :func:`describe_cached`: every text is stored under (captioner, prompt,
  image sha256s), so a rerun generates nothing and a killed run keeps what it finished.

BLIP and prompts: a BLIP captioner does not follow instructions; given text it *continues* it as a
caption prefix ("describe the land use ... concisely, less than 20 words. salt ended ..."). So for a
processor without a chat template :func:`describe` ignores the prompt and captions unconditionally;
:func:`effective_prompt` says so (``"<unconditional>"``), and that is the prompt the cache records.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

# SPEC §4 / paper §3.1. {domain} = the job's domain phrase; satellite domains get the land-use wording.
IMAGE_PROMPT = "Describe the {domain} in the photo concisely, less than 20 words."
SATELLITE_IMAGE_PROMPT = "Describe the land use in the satellite image concisely, less than 20 words."
GROUP_PROMPT = "Describe the common visual attributes of the {domain} in all the photos concisely, in fewer than 20 words."
UNCONDITIONAL = "<unconditional>"  # the prompt recorded for captioners that take none (BLIP)

CANVAS_SIZE = 672  # paper: the group collage is one 672 x 672 image (LLaVA-1.6's 2 x 336 tiles)
CANVAS_GAP = 20  # pixels between neighbouring tiles (none at the canvas border)


def is_satellite(domain: str) -> bool:
    return "satellite" in domain.lower()


def image_prompt(domain: str) -> str:
    """The image-description prompt for ``domain`` (the land-use wording for satellite domains)."""
    return SATELLITE_IMAGE_PROMPT if is_satellite(domain) else IMAGE_PROMPT.format(domain=domain)


def group_prompt(domain: str) -> str:
    """The group-description prompt for ``domain``."""
    return GROUP_PROMPT.format(domain=domain)


def effective_prompt(processor, prompt: str) -> str:
    """The prompt :func:`describe` really gives this processor: ``prompt`` with a chat template, else
    ``"<unconditional>"`` (BLIP-style captioners caption without one)."""
    return prompt if getattr(processor, "chat_template", None) else UNCONDITIONAL


# ----------------------------------------------------------------------------------------------
# Group canvas


def canvas_layout(n: int, size: int = CANVAS_SIZE, gap: int = CANVAS_GAP) -> tuple[int, int, int, list[tuple[int, int]]]:
    """(cols, rows, cell, [(x, y) top-left of each cell]) for ``n`` tiles on a ``size`` square canvas.

    cols = ceil(sqrt(n)), rows = ceil(n / cols); square cells of side cell = (size - gap·(cols−1)) // cols
    (also bounded by the rows); tiles are ``gap`` apart and the grid is centred. For n = 4, size 672,
    gap 20: 2 x 2 cells of 326 px at x, y in {0, 346}.
    """
    if n < 1:
        raise ValueError(f"group_canvas: needs at least one image, got {n}.")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell = min((size - gap * (cols - 1)) // cols, (size - gap * (rows - 1)) // rows)
    if cell < 1:
        raise ValueError(f"group_canvas: {n} images with {gap} px gaps do not fit on a {size} px canvas.")
    x0 = (size - (cols * cell + (cols - 1) * gap)) // 2
    y0 = (size - (rows * cell + (rows - 1) * gap)) // 2
    return cols, rows, cell, [(x0 + (i % cols) * (cell + gap), y0 + (i // cols) * (cell + gap)) for i in range(n)]


def fit_size(w: int, h: int, cell: int) -> tuple[int, int]:
    """The largest (w', h') with w'/h' ≈ w/h that fits a cell x cell square (the longer side = cell)."""
    s = cell / max(w, h)
    return max(1, min(cell, round(w * s))), max(1, min(cell, round(h * s)))


def group_canvas(images: Sequence[Image.Image], size: int = CANVAS_SIZE, gap: int = CANVAS_GAP,
                 background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The images tiled on one RGB canvas (paper: 4 images, 2 x 2, 672 x 672, 20 px gaps).

    Each image is resized with LANCZOS, aspect preserved, so that its longer side fills its cell
    (:func:`fit_size`), and is centred in the cell; the rest is ``background``.
    """
    _, _, cell, origins = canvas_layout(len(images), size, gap)
    canvas = Image.new("RGB", (size, size), background)
    for im, (x, y) in zip(images, origins):
        im = im.convert("RGB")
        w, h = fit_size(im.width, im.height, cell)
        tile = im.resize((w, h), Image.Resampling.LANCZOS) if (w, h) != im.size else im
        canvas.paste(tile, (x + (cell - w) // 2, y + (cell - h) // 2))
    return canvas


# ----------------------------------------------------------------------------------------------
# Generation


def describe(model, processor, images: Sequence[Image.Image], prompt: str, max_new_tokens: int = 77,
             batch_size: int = 8, progress: bool = True) -> list[str]:
    """One description per image, batched greedy decoding (``do_sample=False``, one beam; paper: greedy,
    ≤ 77 new tokens).

    - Processor with a chat template (LLaVA-1.6 etc.): one user turn holding the image and ``prompt``,
      ``add_generation_prompt=True``, left padding; only the newly generated tokens are decoded.
    - Otherwise (BLIP): unconditional captioning, ``prompt`` is not given (a BLIP captioner would
      continue it as a caption prefix); see :func:`effective_prompt`.

    A decoded text that still starts with the prompt has it removed; texts are whitespace-stripped.
    """
    import torch
    from tqdm.auto import tqdm

    chat = bool(getattr(processor, "chat_template", None))
    tok = getattr(processor, "tokenizer", None)
    old_side = getattr(tok, "padding_side", None)
    if chat and tok is not None:
        tok.padding_side = "left"  # decoder-only batched generation needs the prompts right-aligned
    param = next(model.parameters())
    device, dtype = param.device, getattr(model, "dtype", param.dtype)
    text = None
    if chat:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conv, add_generation_prompt=True)
    out: list[str] = []
    bar = tqdm(total=len(images), desc="describe", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for b in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[b:b + batch_size]]
            if chat:
                inputs = processor(images=batch, text=[text] * len(batch), return_tensors="pt", padding=True)
                inputs.pop("token_type_ids", None)  # BERT-style tokenizers add them; decoder-only LMMs take none
            else:
                inputs = processor(images=batch, return_tensors="pt")
            inputs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                      if torch.is_tensor(v) else v for k, v in inputs.items()}
            with torch.inference_mode():
                ids = model.generate(**inputs, max_new_tokens=generation_limit(model, inputs, max_new_tokens),
                                     do_sample=False, num_beams=1)
            prompt_ids = inputs.get("input_ids")
            if prompt_ids is not None and ids.shape[1] >= prompt_ids.shape[1] and \
                    torch.equal(ids[:, :prompt_ids.shape[1]].cpu(), prompt_ids.cpu()):
                ids = ids[:, prompt_ids.shape[1]:]  # decoder-only models return prompt + answer
            for t in processor.batch_decode(ids, skip_special_tokens=True):
                t = t.strip()
                if chat and t.startswith(prompt):
                    t = t[len(prompt):].strip()
                out.append(t)
            bar.update(len(batch))
    finally:
        bar.close()
        if chat and tok is not None and old_side is not None:
            tok.padding_side = old_side
    return out


def generation_limit(model, inputs: dict, max_new_tokens: int) -> int:
    """``max_new_tokens``, capped so prompt + answer fit the text model's position table (a small captioner,
    e.g. BLIP with 64 positions, would otherwise index past it)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    ids = inputs.get("input_ids")
    used = int(ids.shape[1]) if ids is not None else 1  # BLIP starts from one BOS token
    if not max_pos:
        return max_new_tokens
    return max(1, min(max_new_tokens, int(max_pos) - used))


# ----------------------------------------------------------------------------------------------
# Cleaning

_LETTER = re.compile(r"[^\W\d_]")  # any Unicode letter


def count_clip_tokens(tokenizer, text: str) -> int:
    """Tokens ``text`` takes in the CLIP text encoder's context, SOT and EOT included.

    Works with open_clip's ``SimpleTokenizer`` (``encode``) and its ``HFTokenizer`` wrapper (``.tokenizer``).
    """
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "encode"):  # open_clip HFTokenizer: special tokens are added
        return len(inner.encode(text))
    return len(tokenizer.encode(text)) + 2


def _truncate(text: str, max_tokens: int, tokenizer) -> str:
    """The longest prefix of whole words (or, for one giant word, characters) within ``max_tokens``."""
    words = text.split()
    lo, hi = 0, len(words)  # largest k with words[:k] fitting
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_clip_tokens(tokenizer, " ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo > 0:
        return " ".join(words[:lo])
    word = words[0]
    lo, hi = 0, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_clip_tokens(tokenizer, word[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return word[:lo]


def clean_description(text: str | None, fallback: str, max_tokens: int, tokenizer) -> tuple[str, str]:
    """(text, status) for a generated description.

    - ``"fallback"``: empty, whitespace-only or no letter at all (digits, punctuation, emoji) -> ``fallback``
      (the caller passes the class description);
    - ``"truncated"``: longer than ``max_tokens`` CLIP tokens (77 with SOT/EOT, counted with the CLIP
      tokenizer) -> the longest whole-word prefix that fits;
    - ``"ok"``: whitespace-normalised ``text``.
    """
    t = " ".join((text or "").split())
    if not t or not _LETTER.search(t):
        return fallback, "fallback"
    if count_clip_tokens(tokenizer, t) > max_tokens:
        cut = _truncate(t, max_tokens, tokenizer)
        if not _LETTER.search(cut):
            return fallback, "fallback"
        return cut, "truncated"
    return t, "ok"


# ----------------------------------------------------------------------------------------------
# Cache


def description_key(captioner: str, prompt: str, image_hashes: Sequence[str]) -> str:
    """The cache key of one description: sha256 of [captioner ref, prompt, image sha256s in order]."""
    return hashlib.sha256(json.dumps([captioner, prompt, list(image_hashes)]).encode()).hexdigest()


class DescriptionCache:
    """Descriptions keyed by (captioner ref, prompt, tuple of image sha256s), stored as Parquet parts.

    ``folder/part-<n>.parquet`` holds one :meth:`put_many` call (columns key, captioner, prompt, images,
    text). Each part is written to a temporary file and renamed into place, so a run killed mid-write
    leaves every earlier part intact (a leftover ``.part-*.tmp`` is ignored). Later parts win when a key
    repeats. :meth:`compact` merges the parts into one.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._texts: dict[str, str] = {}
        for part in self._parts():
            self._load(part)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))

    def _load(self, part: Path) -> None:
        import pyarrow.parquet as pq

        t = pq.read_table(part, columns=["key", "text"]).to_pydict()
        self._texts.update(zip(t["key"], t["text"]))

    def __len__(self) -> int:
        return len(self._texts)

    @staticmethod
    def key(captioner: str, prompt: str, image_hashes: Sequence[str]) -> str:
        return description_key(captioner, prompt, image_hashes)

    def get_many(self, keys: Sequence[tuple[str, str, Sequence[str]] | str]) -> list[str | None]:
        """The stored text per key (a (captioner, prompt, hashes) triple or a :func:`description_key`), or None."""
        return [self._texts.get(k if isinstance(k, str) else description_key(*k)) for k in keys]

    def put_many(self, rows: Sequence[tuple[tuple[str, str, Sequence[str]], str]]) -> None:
        """Store ``[((captioner, prompt, hashes), text)]`` as one new part file (atomic)."""
        if not rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        from distillery.rundir import atomic_path

        cols = {"key": [], "captioner": [], "prompt": [], "images": [], "text": []}
        for (captioner, prompt, hashes), text in rows:
            cols["key"].append(description_key(captioner, prompt, hashes))
            cols["captioner"].append(captioner)
            cols["prompt"].append(prompt)
            cols["images"].append(list(hashes))
            cols["text"].append(text)
        parts = self._parts()
        n = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        with atomic_path(self.folder / f"part-{n:06d}.parquet") as tmp:
            pq.write_table(pa.table(cols), tmp)
        self._texts.update(zip(cols["key"], cols["text"]))
        from distillery import killpoints

        killpoints.progress("latte.descriptions")  # testing hook: after a part is committed

    def compact(self) -> None:
        """Merge all parts into one (the merged part is written first, then the old ones removed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from distillery.rundir import atomic_path

        parts = self._parts()
        if len(parts) < 2:
            return
        latest: dict[str, dict] = {}
        for p in parts:
            for row in pq.read_table(p).to_pylist():
                latest[row["key"]] = row
        n = int(parts[-1].stem.split("-")[1]) + 1
        with atomic_path(self.folder / f"part-{n:06d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(list(latest.values())), tmp)
        for p in parts:
            p.unlink()


def describe_cached(model, processor, cache: DescriptionCache, captioner: str, prompt: str,
                    items: Sequence[tuple[Sequence[str], Callable[[], Image.Image] | Image.Image]],
                    max_new_tokens: int = 77, batch_size: int = 8, chunk_size: int = 64,
                    progress: bool = True) -> tuple[list[str], int]:
    """(texts, generated) for ``items`` = [(image sha256s, image or a function loading it)].

    Keys use :func:`effective_prompt`; only missing keys are generated, ``chunk_size`` at a time, and each
    chunk is stored before the next starts (a killed run loses at most one chunk). Images of cached items
    are never loaded. ``generated`` counts the new descriptions (0 on a rerun). Texts are raw: clean them
    with :func:`clean_description`.
    """
    eff = effective_prompt(processor, prompt)
    keys = [(captioner, eff, tuple(h)) for h, _ in items]
    texts = cache.get_many(keys)
    todo = [i for i, t in enumerate(texts) if t is None]
    for c in range(0, len(todo), chunk_size):
        idx = todo[c:c + chunk_size]
        ims = [items[i][1]() if callable(items[i][1]) else items[i][1] for i in idx]
        new = describe(model, processor, ims, prompt, max_new_tokens, batch_size, progress)
        cache.put_many([(keys[i], t) for i, t in zip(idx, new)])
        for i, t in zip(idx, new):
            texts[i] = t
    return texts, len(todo)
