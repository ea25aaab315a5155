"""Embed class names on the device: the exported CLIP text encoder (``text_encoder.onnx``, written by
``distillery export`` with ``export.text_encoder: true``) + the numpy BPE tokenizer. numpy/onnxruntime only.

```python
from distillery.runtime import Classifier
from distillery.runtime.text import TextEncoder
clf = Classifier.load("runs/job/export")                      # an embedding student
enc = TextEncoder.load("runs/job/export")
clf.set_class_embeddings(enc.class_embeddings(["forest", "glacier"]), ["forest", "glacier"])
```

``class_embeddings`` is the clip teacher's prompt ensemble (``teacher/clip.py``: each class's templates
encoded, normalised, averaged, renormalised) with the templates and domain phrase of the job, read from the
encoder's metadata, so names embedded here give the matrix the export shipped.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .embeddings import l2_normalize
from .tokenizer import SimpleTokenizer

__all__ = ["TEXT_ENCODER_FILE", "TEXT_METADATA_KEY", "TextEncoder"]

TEXT_ENCODER_FILE = "text_encoder.onnx"
TEXT_METADATA_KEY = "distillery_text_encoder"


class TextEncoder:
    """CLIP text encoder on onnxruntime: texts -> normalised (N, D) embeddings."""

    def __init__(self, session: ort.InferenceSession, metadata: dict, tokenizer: SimpleTokenizer, path: str):
        self.session, self.metadata, self.tokenizer, self.path = session, metadata, tokenizer, path
        self.dim = int(metadata["embedding_dim"])
        self.templates: list[str] = list(metadata.get("templates") or ["a photo of a {c}."])
        self.domain: str = metadata.get("domain") or "photo"

    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[str] | None = None) -> "TextEncoder":
        """Open ``text_encoder.onnx`` (or the export folder holding it) and the vocabulary file beside it."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TEXT_ENCODER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text encoder {path!r} does not exist; export it with `distillery export --job "
                                    "JOB.yaml export.text_encoder=true`.")
        session = ort.InferenceSession(path, providers=list(providers or ["CPUExecutionProvider"]))
        props = session.get_modelmeta().custom_metadata_map
        if TEXT_METADATA_KEY not in props:
            raise ValueError(f"{path}: no {TEXT_METADATA_KEY!r} metadata; not a text encoder written by distillery.")
        meta = json.loads(props[TEXT_METADATA_KEY])
        vocab = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(meta["vocab"]))
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"{path}: its tokenizer vocabulary {vocab!r} is missing; copy it from the export "
                                    "folder (it is written beside text_encoder.onnx).")
        from .embeddings import file_sha256

        if meta.get("vocab_sha256") and file_sha256(vocab) != meta["vocab_sha256"]:
            raise ValueError(f"{vocab}: sha256 differs from the one {path} names; it is not the vocabulary the "
                             "encoder was exported with.")
        return cls(session, meta, SimpleTokenizer(vocab, int(meta.get("context_length", 77))), path)

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(list(texts))

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        inp = self.session.get_inputs()[0].name
        out = self.session.run(None, {inp: np.asarray(tokens, dtype=np.int64)})[0]
        return l2_normalize(out)

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Normalised text embeddings (N, D)."""
        texts = list(texts)
        parts = [self.embed_tokens(self.tokens(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str] | None = None,
                         domain: str | None = None) -> np.ndarray:
        """(C, D): per class, the mean of its normalised template embeddings, renormalised (the clip teacher's)."""
        templates = list(templates or self.templates)
        domain = self.domain if domain is None else domain
        rows = [self.embed([t.format(c=c, domain=domain) for t in templates]).mean(axis=0) for c in class_names]
        return l2_normalize(np.stack(rows))
