"""``export.text_encoder: true``: the teacher CLIP's text encoder to ONNX, so a device embeds new class names.

Writes into the export folder ``text_encoder.onnx`` (input ``tokens`` int64 (B, 77), output ``embedding``
(B, D) = norm(encode_text(tokens)); metadata ``distillery_text_encoder``: vocabulary file and sha256,
context length, embedding width, the clip teacher's templates, domain phrase and logit scale) and
``bpe_simple_vocab_16e6.txt.gz``, the BPE vocabulary the numpy tokenizer (``distillery.runtime.tokenizer``)
reads. Checked here: the runtime tokenizer's tokens equal open_clip's on the job's prompts, and the ONNX
embeddings equal open_clip's (max |Δ| in the report).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from distillery.rundir import atomic_path, log, sha256_file

from .formats import STAGE

__all__ = ["export_text_encoder"]


def _text_module(clip):
    import torch
    import torch.nn.functional as F

    class TextEncoder(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, tokens):
            return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    return TextEncoder(clip).eval()


def export_text_encoder(job, out_dir: Path, opset: int, progress: bool = True) -> dict:
    """Write ``text_encoder.onnx`` + the vocabulary into ``out_dir``; returns the report entry (parity figures)."""
    import onnx
    import open_clip
    import torch
    from open_clip.tokenizer import SimpleTokenizer as OpenClipTokenizer

    from distillery.models import load_clip
    from distillery.runtime.text import TEXT_ENCODER_FILE, TEXT_METADATA_KEY, TextEncoder
    from distillery.runtime.tokenizer import VOCAB_FILE
    from distillery.teacher.clip import logit_scale_of

    clip, _, tokenizer = load_clip(job.models.clip, device="cpu")
    scale = logit_scale_of(job.teacher.clip.logit_scale, clip)
    if not isinstance(tokenizer, OpenClipTokenizer) or getattr(tokenizer, "reduction_fn", None) is not None:
        raise ValueError(f"export.text_encoder: {job.models.clip!r} uses the tokenizer {type(tokenizer).__name__}; "
                         "only open_clip's SimpleTokenizer (CLIP's BPE) has a numpy twin in the runtime.")
    out_dir = Path(out_dir)
    vocab = out_dir / VOCAB_FILE
    with atomic_path(vocab) as tmp:
        shutil.copyfile(open_clip.tokenizer.default_bpe(), tmp)
    cfg = job.teacher.clip
    prompts = [t.format(c=c, domain=job.domain_phrase) for c in job.class_names for t in cfg.templates]
    model = _text_module(clip)
    ctx = int(tokenizer.context_length)
    with tempfile.TemporaryDirectory(prefix="distillery-text-") as tmpdir:
        raw = Path(tmpdir) / "text.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (tokenizer(prompts[:2]),), str(raw), dynamo=False, input_names=["tokens"],
                              output_names=["embedding"], opset_version=opset,
                              dynamic_axes={"tokens": {0: "batch"}, "embedding": {0: "batch"}})
        proto = onnx.load(str(raw))
    with torch.no_grad():
        probe = model(tokenizer(prompts[:2]))
    meta = {"kind": "clip_text_encoder", "clip": job.models.clip, "vocab": VOCAB_FILE, "vocab_sha256": sha256_file(vocab),
            "context_length": ctx, "embedding_dim": int(probe.shape[1]), "templates": list(cfg.templates),
            "domain": job.domain_phrase, "logit_scale": scale}
    props = {p.key: p.value for p in proto.metadata_props}
    props[TEXT_METADATA_KEY] = json.dumps(meta, sort_keys=True)
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    dest = out_dir / TEXT_ENCODER_FILE
    with atomic_path(dest) as tmp:
        onnx.save_model(proto, str(tmp))

    enc = TextEncoder.load(dest)
    ours = enc.tokens(prompts)
    theirs = tokenizer(prompts).numpy()
    tokens_equal = bool(np.array_equal(ours, theirs))
    with torch.no_grad():
        ref = model(torch.from_numpy(theirs)).numpy()
    got = enc.embed_tokens(ours)
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    report = {"file": TEXT_ENCODER_FILE, "vocab": VOCAB_FILE, "prompts": len(prompts), "tokens_equal": tokens_equal,
              "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "file_size": dest.stat().st_size}
    if not tokens_equal:
        raise RuntimeError(f"{STAGE}: the runtime tokenizer disagrees with open_clip's on the job's prompts, e.g. "
                           f"{prompts[int(np.flatnonzero((ours != theirs).any(1))[0])]!r}; report this.")
    if progress:
        log(f"{STAGE}: text encoder {dest.name} + {VOCAB_FILE}: tokens equal open_clip's on {len(prompts)} prompts, "
            f"max |Δembedding| {report['max_abs_diff']:.2e}")
    return report
