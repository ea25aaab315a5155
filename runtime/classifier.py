"""Load a distillery ONNX model and classify images: numpy, Pillow and onnxruntime only.

```python
from distillery.runtime import Classifier
clf = Classifier.load("runs/eurosat/export")  # the format export chose to deploy; or name a .onnx file
clf.predict(["field.jpg", pil_image, hwc_uint8_array], topk=3)
# [Prediction(label='annual crop land', index=0, probability=0.91, topk=[('annual crop land', 0.91), ...]), ...]
```

The model file carries its own preprocessing contract and class names in the ``distillery``
metadata entry (a JSON string, SPEC §8), so nothing else has to travel with it.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from .preprocess import ImageInput, Preprocessor, check_contract

__all__ = ["METADATA_KEY", "Prediction", "Classifier", "BaseClassifier", "read_metadata", "check_metadata",
           "provider_fallback", "default_session_options", "deployed_model"]

METADATA_KEY = "distillery"  # metadata_props key holding the JSON contract


@dataclass
class Prediction:
    label: str  # top-1 class name
    index: int  # top-1 class index
    probability: float  # softmax probability of the top-1 class
    topk: list[tuple[str, float]] = field(default_factory=list)  # best k (label, probability), best first


def check_metadata(meta: Any, path: str = "model") -> dict[str, Any]:
    """Validate a parsed ``distillery`` metadata object (class names + preprocessing contract)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the {METADATA_KEY!r} metadata is {type(meta).__name__}, expected a JSON object.")
    names = meta.get("class_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path}: metadata class_names {names!r} must be a non-empty list of strings.")
    try:
        check_contract(meta.get("preprocess"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return meta


def read_metadata(session: ort.InferenceSession, path: str = "model") -> dict[str, Any]:
    """The parsed ``distillery`` metadata of a session's model; ValueError when absent or malformed."""
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise ValueError(f"{path}: the ONNX model has no {METADATA_KEY!r} metadata entry (class names and "
                         "preprocessing contract), so it was not written by `distillery export`. Export the "
                         "student with `distillery export --job JOB.yaml` and load its folder, runs/<job>/export.")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {METADATA_KEY!r} metadata entry is not valid JSON ({e}); re-export the "
                         "model with `distillery export`.") from e
    return check_metadata(meta, path)


def deployed_model(folder: str | os.PathLike) -> str:
    """The model file an export folder (``runs/<job>/export``) deploys: the ``deploy`` entry of its
    ``report.json`` (the fastest format that passed the parity gate on the export machine), else
    ``model.onnx`` for an export written before that entry existed."""
    folder = os.fspath(folder)
    report_path = os.path.join(folder, "report.json")
    deploy = None
    if os.path.isfile(report_path):
        try:
            with open(report_path, encoding="utf-8") as f:
                deploy = json.load(f).get("deploy")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{report_path}: not a readable export report ({e}); re-run `distillery export` or "
                             "load a model file directly.") from e
    if isinstance(deploy, dict):
        name = deploy.get("file")
        if not name:
            raise ValueError(f"{folder}: the export report deploys no model ({deploy.get('why', 'no reason given')}); "
                             "fix the export or load one of its .onnx files directly.")
        path = os.path.join(folder, os.path.basename(str(name)))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: the export report deploys {name!r}, which is missing; re-run "
                                    "`distillery export`.")
        return path
    path = os.path.join(folder, "model.onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no report.json deploy entry and no model.onnx; pass the export folder "
                                "written by `distillery export` (runs/<job>/export) or a model file.")
    return path


def _provider_name(p: Any) -> str:
    return p[0] if isinstance(p, (tuple, list)) else str(p)


def provider_fallback(requested: Sequence[Any], in_use: Sequence[str]) -> list[str]:
    """Requested accelerator providers that onnxruntime is not using (it falls back silently, e.g. to CPU
    when onnxruntime-gpu cannot load the CUDA/cuDNN libraries, or when the build lacks the provider)."""
    return [n for n in map(_provider_name, requested) if n != "CPUExecutionProvider" and n not in in_use]


def default_session_options() -> ort.SessionOptions:
    """The session options :meth:`Classifier.load` uses when given none: onnxruntime's defaults (all graph
    optimisations, one intra-op thread per physical core, sequential execution) plus
    ``session.force_spinning_stop``: the worker threads spin while a ``run`` is in progress -- each of the
    network's ~80 operators would otherwise wait for them to wake up (measured 10-15% of a MobileNetV3-small
    run on 2 cores) -- and stop spinning when it returns, so they take no CPU from decoding and resizing
    the next image or from the rest of the application between calls."""
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def _default_providers() -> list[str]:
    # TensorRT's provider compiles engines at session start and needs its own libraries; opt in explicitly.
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider")
                 if p in available]
    return preferred or available


class BaseClassifier:
    """What every backend shares: contract, class names, preprocessing, batching, softmax and top-k.

    Subclasses implement :meth:`predict_logits`. Nothing here is mutated after construction, so
    :meth:`predict` may be called from several threads at once when the backend's run is thread-safe.
    """

    format: str = "fp32"
    providers_in_use: list[str] = []

    def __init__(self, metadata: dict[str, Any], path: str = "model", fast_decode: bool = True):
        self.metadata = metadata
        self.path = path
        self.class_names: list[str] = list(metadata["class_names"])
        self.contract: dict[str, Any] = metadata["preprocess"]
        self.format = str(metadata.get("format", "fp32"))
        self.fast_decode = bool(fast_decode)
        self._pre = Preprocessor(self.contract, fast_decode=self.fast_decode)

    @property
    def input_size(self) -> list[int]:
        return list(self.contract["input_size"])  # [3, H, W]

    def pixels(self, image: ImageInput):
        """One image -> the ``H x W`` RGB PIL image the network sees (decoded, resized, cropped; before
        normalisation), following this model's contract."""
        return self._pre.image(image)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image -> (3, H, W) float32, following this model's contract."""
        return self._pre(image)

    def preprocess_batch(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images -> (B, 3, H, W) float32, following this model's contract."""
        return self._pre.batch(list(images))

    def check_batch(self, batch: Any) -> np.ndarray:
        """``batch`` as a float array shaped ``(B, 3, H, W)``; ValueError naming what is wrong otherwise."""
        batch = np.asarray(batch)
        _, h, w = self.contract["input_size"]
        if batch.dtype.kind != "f":
            raise ValueError(f"batch: dtype {batch.dtype} is not a float type; predict_logits() takes a "
                             "preprocessed (normalised) float batch -- pass raw uint8 images to predict() instead.")
        if batch.ndim == 4 and batch.shape[1:] == (h, w, 3):
            raise ValueError(f"batch: shape {batch.shape} is channels-last (B, H, W, 3); the model takes "
                             f"(B, 3, {h}, {w}): use batch.transpose(0, 3, 1, 2), or predict() for raw images.")
        if batch.ndim == 3 and batch.shape == (3, h, w):
            raise ValueError(f"batch: shape {batch.shape} is one image; add the batch axis with batch[None].")
        if batch.ndim != 4 or batch.shape[1:] != (3, h, w):
            raise ValueError(f"batch: shape {batch.shape} does not match the model input (B, 3, {h}, {w}); "
                             "use predict() for raw images or preprocess() them first.")
        return batch

    def _check_logits(self, logits: np.ndarray, n: int) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (n, len(self.class_names)):
            raise ValueError(f"{self.path}: the model returned logits of shape {logits.shape} for {n} images but "
                             f"its metadata names {len(self.class_names)} classes; the file is inconsistent, "
                             "re-export it.")
        return logits

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on an already preprocessed ``(B, 3, H, W)`` batch; returns ``(B, K)`` float32 logits."""
        raise NotImplementedError

    def _logits_for(self, items: list) -> np.ndarray:
        """Logits for a list of raw images (decode + preprocess + network)."""
        return self.predict_logits(self._pre.batch(items))

    def predict(self, images: ImageInput | Sequence[ImageInput], topk: int = 1,
                batch_size: int = 32) -> list[Prediction]:
        """Classify one image or a list of images (paths, PIL images, HWC uint8 RGB arrays).

        Returns one :class:`Prediction` per image, in order, always as a list.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)  # (N, H, W, C) stack of frames
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected a positive integer, got {topk!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}.")
        k = min(topk, len(self.class_names))
        preds: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            probs = _softmax(self._logits_for(items[start:start + batch_size]))
            for p in probs:
                order = np.argsort(-p, kind="stable")[:k]
                top = [(self.class_names[i], float(p[i])) for i in order]
                preds.append(Prediction(label=top[0][0], index=int(order[0]), probability=top[0][1], topk=top))
        return preds

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, classes={len(self.class_names)}, input={self.input_size}, "
                f"format={self.format!r}, providers={self.providers_in_use})")


class Classifier(BaseClassifier):
    """An ONNX image classifier with its preprocessing and class names read from the model file.

    ``providers_in_use`` lists the execution providers onnxruntime actually runs; ``provider_fallback``
    the requested accelerators it silently dropped (a RuntimeWarning says so at load time).
    """

    engine_cache: dict[str, Any] | None = None  # set by load_tensorrt: what the TensorRT engine cache did

    def __init__(self, session: ort.InferenceSession, metadata: dict[str, Any], path: str = "model",
                 requested_providers: Sequence[Any] | None = None, fast_decode: bool = True):
        super().__init__(metadata, path, fast_decode)
        self.session = session
        self.providers_in_use = session.get_providers()
        self.requested_providers = [_provider_name(p) for p in (requested_providers or self.providers_in_use)]
        self.provider_fallback = provider_fallback(self.requested_providers, self.providers_in_use)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one image input, the model has {[i.name for i in inputs]}.")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self._input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        # a model with the preprocessing inside its graph (export.preprocess_in_graph: model.pre.onnx) takes one
        # decoded uint8 RGB image (1, height, width, 3); the runtime then only decodes
        self.graph_preprocessing = metadata.get("input") == "image_uint8_nhwc" and inputs[0].type == "tensor(uint8)"
        shape = inputs[0].shape
        want = self.contract["input_size"]
        if not self.graph_preprocessing and shape and len(shape) == 4:
            graph = [d if isinstance(d, int) else None for d in shape[1:]]
            if any(g is not None and g != w for g, w in zip(graph, want)):
                raise ValueError(f"{path}: the metadata's input_size {list(want)} disagrees with the graph's input "
                                 f"{list(shape)}; the file is inconsistent, re-export it with `distillery export`.")
        n_out = outputs[0].shape[-1] if outputs[0].shape else None
        self.embedding: dict[str, Any] | None = None  # an embedding student: classes by cosine with a side matrix
        if metadata.get("head") == "embedding":
            self._init_embedding(metadata, n_out)
        elif isinstance(n_out, int) and n_out != len(self.class_names):
            raise ValueError(f"{path}: the model outputs {n_out} logits but its metadata names "
                             f"{len(self.class_names)} classes; the file is inconsistent, re-export it.")

    def _init_embedding(self, metadata: dict[str, Any], n_out: Any) -> None:
        """An embedding model: the graph outputs the normalised image embedding (B, D); the class text-embedding
        matrix is the side file the metadata names (checked by sha256), logits = logit_scale · emb · Tᵀ."""
        from .embeddings import load_class_embeddings

        emb = metadata.get("embedding")
        if not isinstance(emb, dict) or not isinstance(emb.get("dim"), int) or not emb.get("text_embeddings"):
            raise ValueError(f"{self.path}: metadata says head 'embedding' but its 'embedding' entry {emb!r} lacks "
                             "dim / text_embeddings; re-export the model with `distillery export`.")
        if isinstance(n_out, int) and n_out != emb["dim"]:
            raise ValueError(f"{self.path}: the model outputs {n_out} values but its metadata says the embedding has "
                             f"{emb['dim']}; the file is inconsistent, re-export it.")
        self.embedding = emb
        self.logit_scale = float(emb.get("logit_scale", 100.0))
        side = os.path.join(os.path.dirname(os.path.abspath(self.path)), os.path.basename(str(emb["text_embeddings"])))
        matrix, names = load_class_embeddings(side, emb["dim"], emb.get("text_embeddings_sha256"))
        self._class_matrix = matrix
        self.class_names = names
        self.text_embeddings_path = side

    def set_class_embeddings(self, matrix: np.ndarray, names: Sequence[str]) -> None:
        """Classify into new classes without retraining: ``matrix`` (C, D) class text embeddings from the same
        CLIP (rows are normalised here), ``names`` one per row. Only for embedding models.

        Swapping while another thread is inside :meth:`predict` may give that call the old names or matrix."""
        from .embeddings import check_class_embeddings

        if self.embedding is None:
            raise ValueError(f"{self.path}: not an embedding model (its classifier head outputs fixed class logits), "
                             "so its classes cannot be swapped; export a `student.head: embedding` student.")
        m, names = check_class_embeddings(matrix, names, self.embedding["dim"], where="set_class_embeddings")
        self._class_matrix, self.class_names = m, names

    def load_class_embeddings(self, path: str | os.PathLike) -> None:
        """:meth:`set_class_embeddings` from a side file (``.npz`` as written by ``save_class_embeddings``)."""
        from .embeddings import load_class_embeddings

        if self.embedding is None:
            raise ValueError(f"{self.path}: not an embedding model, so {os.fspath(path)!r} cannot replace its classes.")
        self.set_class_embeddings(*load_class_embeddings(path, self.embedding["dim"]))

    def predict_embeddings(self, batch: np.ndarray) -> np.ndarray:
        """The normalised image embeddings (B, D) of a preprocessed batch (embedding models only)."""
        if self.embedding is None:
            raise ValueError(f"{self.path}: not an embedding model; it outputs class logits (predict_logits).")
        batch = self.check_batch(batch)
        out = self.session.run([self.output_name], {self.input_name: batch.astype(self._input_dtype, copy=False)})[0]
        return self._check_embeddings(out, len(batch))

    def _check_embeddings(self, out: np.ndarray, n: int) -> np.ndarray:
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (n, self.embedding["dim"]):
            raise ValueError(f"{self.path}: the model returned shape {out.shape} for {n} images, expected "
                             f"({n}, {self.embedding['dim']}) embeddings; the file is inconsistent, re-export it.")
        return out

    def _to_logits(self, out: np.ndarray, n: int) -> np.ndarray:
        """The session's output as (n, C) logits: as it is, or cosine with the class matrix (embedding models)."""
        if self.embedding is None:
            return self._check_logits(out, n)
        from .embeddings import cosine_logits

        return cosine_logits(self._check_embeddings(out, n), self._class_matrix, self.logit_scale)

    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[Any] | None = None,
             session_options: ort.SessionOptions | None = None, fast_decode: bool = True,
             strict_providers: bool = False) -> BaseClassifier:
        """Open ``path``: an ``.onnx`` file with onnxruntime, a ``.engine`` file with TensorRT
        (:class:`distillery.runtime.tensorrt.TensorRTClassifier`; needs ``distillery[trt]``), or an export
        folder (``runs/<job>/export``): the file its ``report.json`` chose to deploy (:func:`deployed_model`).

        ``providers``: onnxruntime execution providers in order of preference; default CUDA (when
        onnxruntime-gpu is installed) then CPU. When a requested accelerator is not in use after the
        session starts, a RuntimeWarning names it (``strict_providers=True``: a RuntimeError instead).
        ``session_options``: onnxruntime session options; default :func:`default_session_options`.
        ``fast_decode``: JPEG draft-mode decoding of large files (see ``Preprocessor``).
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = deployed_model(path)
        if path.endswith(".engine"):
            from .tensorrt import TensorRTClassifier

            return TensorRTClassifier.load(path, fast_decode=fast_decode)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model {path!r} does not exist; pass the export folder written by "
                                    "`distillery export` (runs/<job>/export) or one of its .onnx files.")
        requested = list(providers) if providers else _default_providers()
        try:
            opts = default_session_options() if session_options is None else session_options
            session = ort.InferenceSession(path, sess_options=opts, providers=requested)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise ValueError(f"model {path!r} could not be opened by onnxruntime: {e}") from e
        clf = cls(session, read_metadata(session, path), path, requested_providers=requested, fast_decode=fast_decode)
        if clf.provider_fallback:
            msg = (f"{path}: requested {', '.join(clf.provider_fallback)} but onnxruntime runs on "
                   f"{', '.join(clf.providers_in_use)} (available in this onnxruntime build: "
                   f"{', '.join(ort.get_available_providers())}). For CUDA install onnxruntime-gpu "
                   "(`pip install distillery[gpu]`) with matching CUDA/cuDNN libraries on the library path.")
            if strict_providers:
                raise RuntimeError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return clf

    @classmethod
    def load_tensorrt(cls, path: str | os.PathLike, **kwargs) -> "Classifier":
        """Open an ``.onnx`` file (or export folder) on onnxruntime's TensorRT provider, building the engine on
        this device on first load and reusing it after (a keyed cache; see :mod:`distillery.runtime.engine_cache`,
        whose ``load_tensorrt`` takes the keyword arguments). Without TensorRT: one warning, default providers."""
        from .engine_cache import load_tensorrt

        return load_tensorrt(path, **kwargs)

    def _logits_for(self, items: list) -> np.ndarray:
        if not self.graph_preprocessing:
            return super()._logits_for(items)
        from .preprocess import load_image

        out = [self.session.run([self.output_name], {self.input_name: np.asarray(load_image(im))[None]})[0]
               for im in items]
        return self._to_logits(np.concatenate(out), len(items))

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on an already preprocessed ``(B, 3, H, W)`` batch; returns ``(B, K)`` float32 logits.

        onnxruntime's ``run`` is thread-safe, so this may be called from several threads on one instance.
        """
        if self.graph_preprocessing:
            raise ValueError(f"{self.path}: this model preprocesses inside its graph and takes decoded uint8 images; "
                             "use predict(), or the model without preprocessing (model.onnx) for tensors.")
        batch = self.check_batch(batch)
        out = self.session.run([self.output_name], {self.input_name: batch.astype(self._input_dtype, copy=False)})
        return self._to_logits(out[0], len(batch))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
