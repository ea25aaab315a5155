"""Preprocessing inside the graph: a variant of an exported model whose input is the decoded image.

``model.onnx`` takes the normalised ``(B, 3, H, W)`` float32 tensor; :func:`build_preprocessing_model` writes
``model.pre.onnx``, whose input ``image`` is one decoded RGB image as uint8 ``(1, height, width, 3)`` (NHWC, any
size) and whose first ops are the contract's steps as ONNX ops (opset 18):

1. resize: the output size from the input's shape (shorter side -> ``resize`` with torchvision's truncation;
   ``squash``: exactly ``resize``; keep-ratio ``[h, w]``: both sides cover it, Python-style rounding); then
   two one-axis ``Resize`` ops, width first then height, each rounded and clipped to uint8 values, the way
   Pillow runs its two passes (``antialias=1``, ``half_pixel``, ``exclude_outside=1``; bicubic with a = -0.5,
   or bilinear). Pillow's pass order for very tall images (Pillow >= 13 goes height first when the height
   shrinks by more than twice the width) and its 22-bit fixed-point coefficients are not reproduced, so a
   pixel may differ by a level or so (measured by ``compare_with_pillow``).
2. centre crop: ``Slice`` at ``round((size - crop) / 2)`` (half to even, as torchvision). Images smaller than
   the crop after resizing (which the shorter-side resize never produces) are not zero-padded.
3. normalise: ``x * (1 / (scale * std)) + (-mean / std)`` with the runtime's float32 constants, NHWC -> NCHW.

The network after it is the exported one, converted to opset 18. The ``distillery`` metadata is the original's
plus ``"input": "image_uint8_nhwc"``, so a runtime knows to feed decoded pixels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_preprocessing_model", "PRE_INPUT", "PRE_FILE"]

PRE_INPUT = "image"
PRE_FILE = "model.pre.onnx"
_MODES = {"bicubic": "cubic", "bilinear": "linear"}


def _preprocessing_nodes(contract: dict[str, Any], out_name: str):
    from onnx import TensorProto, helper, numpy_helper

    if contract["interpolation"] not in _MODES:
        raise ValueError(f"preprocessing in the graph: interpolation {contract['interpolation']!r} has no ONNX "
                         f"Resize equivalent here (supported: {', '.join(_MODES)}).")
    _, th, tw = contract["input_size"]
    nodes, inits = [], []

    def const(name, value, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    x = node("Cast", [PRE_INPUT], ["pre_f"], to=TensorProto.FLOAT)
    x = node("Transpose", [x], ["pre_nchw"], perm=[0, 3, 1, 2])  # (1, 3, h, w)
    shape = node("Shape", [x], ["pre_shape"])
    h = node("Gather", [shape, const("pre_i2", [2])], ["pre_h"], axis=0)  # (1,) int64
    w = node("Gather", [shape, const("pre_i3", [3])], ["pre_w"], axis=0)
    nc = node("Slice", [shape, const("pre_s0", [0]), const("pre_s2", [2])], ["pre_nc"])
    resize = contract["resize"]
    if contract["crop"] == "squash":
        new_h, new_w = const("pre_rh", [resize[0]]), const("pre_rw", [resize[1]])
    elif isinstance(resize, int):  # torchvision Resize(int): shorter side -> resize, longer int(resize * long / short)
        s = const("pre_r", [resize])
        tall = node("LessOrEqual", [w, h], ["pre_tall"])
        long_h = node("Div", [node("Mul", [s, h], ["pre_sh"]), w], ["pre_long_h"])  # integer division = floor here
        long_w = node("Div", [node("Mul", [s, w], ["pre_sw"]), h], ["pre_long_w"])
        new_h = node("Where", [tall, long_h, s], ["pre_new_h"])
        new_w = node("Where", [tall, s, long_w], ["pre_new_w"])
    else:  # timm ResizeKeepRatio: ratio = min(h / rh, w / rw); round(side / ratio)
        hd = node("Cast", [h], ["pre_hd"], to=TensorProto.DOUBLE)
        wd = node("Cast", [w], ["pre_wd"], to=TensorProto.DOUBLE)
        ratio = node("Min", [node("Div", [hd, const("pre_rhd", [resize[0]], np.float64)], ["pre_qh"]),
                             node("Div", [wd, const("pre_rwd", [resize[1]], np.float64)], ["pre_qw"])], ["pre_ratio"])
        new_h = node("Cast", [node("Round", [node("Div", [hd, ratio], ["pre_nhd"])], ["pre_nhr"])], ["pre_new_h"],
                     to=TensorProto.INT64)
        new_w = node("Cast", [node("Round", [node("Div", [wd, ratio], ["pre_nwd"])], ["pre_nwr"])], ["pre_new_w"],
                     to=TensorProto.INT64)
    mode = _MODES[contract["interpolation"]]
    attrs = dict(mode=mode, antialias=1, coordinate_transformation_mode="half_pixel", exclude_outside=1)
    if mode == "cubic":
        attrs["cubic_coeff_a"] = -0.5
    lo, hi = const("pre_0", 0.0, np.float32), const("pre_255", 255.0, np.float32)
    empty = ""
    # width pass, rounded to uint8 values; then the height pass (Pillow's two passes)
    size_w = node("Concat", [nc, h, new_w], ["pre_size_w"], axis=0)
    x = node("Resize", [x, empty, empty, size_w], ["pre_rw_f"], **attrs)
    x = node("Clip", [node("Round", [x], ["pre_rw_r"]), lo, hi], ["pre_rw_u8"])
    size_h = node("Concat", [nc, new_h, new_w], ["pre_size_h"], axis=0)
    x = node("Resize", [x, empty, empty, size_h], ["pre_rh_f"], **attrs)
    x = node("Clip", [node("Round", [x], ["pre_rh_r"]), lo, hi], ["pre_rh_u8"])
    # centre crop
    def centre_offset(new, crop, tag):  # round((new - crop) / 2), half to even like Python's round()
        diff = node("Cast", [node("Sub", [new, const(f"pre_{tag}_crop", [crop])], [f"pre_{tag}_d"])],
                    [f"pre_{tag}_df"], to=TensorProto.FLOAT)
        half = node("Div", [diff, const(f"pre_{tag}_2", 2.0, np.float32)], [f"pre_{tag}_half"])
        return node("Cast", [node("Round", [half], [f"pre_{tag}_r"])], [f"pre_{tag}_off"], to=TensorProto.INT64)

    top, left = centre_offset(new_h, th, "top"), centre_offset(new_w, tw, "left")
    starts = node("Concat", [top, left], ["pre_starts"], axis=0)
    ends = node("Add", [starts, const("pre_crop", [th, tw])], ["pre_ends"])
    x = node("Slice", [x, starts, ends, const("pre_axes", [2, 3])], ["pre_crop_px"])
    # normalise with the runtime's float32 constants
    scale = np.float32(contract.get("scale", 255))
    mean = np.asarray(contract["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(contract["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    mul = (np.float32(1) / (scale * std)).astype(np.float32)
    add = (-mean / std).astype(np.float32)
    x = node("Mul", [x, const("pre_mul", mul, np.float32)], ["pre_scaled"])
    node("Add", [x, const("pre_add", add, np.float32)], [out_name])
    return nodes, inits


def build_preprocessing_model(src: str | Path, out: str | Path, *, pixels_only: bool = False) -> Path:
    """Write ``out``: ``src`` (an exported model with its ``distillery`` metadata) behind its contract's
    preprocessing as ONNX ops; input ``image`` uint8 ``(1, height, width, 3)``. ``pixels_only``: the
    preprocessing alone, output ``input`` = the normalised ``(1, 3, H, W)`` tensor (for comparisons)."""
    import onnx
    from onnx import TensorProto, helper, version_converter

    from distillery.runtime.classifier import METADATA_KEY

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    contract = meta["preprocess"]
    net_input = model.graph.input[0].name
    nodes, inits = _preprocessing_nodes(contract, net_input if not pixels_only else "input")
    image = helper.make_tensor_value_info(PRE_INPUT, TensorProto.UINT8, [1, "height", "width", 3])
    if pixels_only:
        _, th, tw = contract["input_size"]
        graph = helper.make_graph(nodes, "distillery_preprocess", [image],
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, th, tw])], inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        proto.ir_version = 8
    else:
        proto = version_converter.convert_version(model, 18)
        g = proto.graph
        old_nodes = list(g.node)
        del g.node[:]
        g.node.extend(nodes + old_nodes)
        g.initializer.extend(inits)
        del g.input[:]
        g.input.extend([image])
        meta = {**meta, "input": "image_uint8_nhwc"}
        helper.set_model_props(proto, {**props, METADATA_KEY: json.dumps(meta, sort_keys=True)})
    onnx.checker.check_model(proto)
    out = Path(out)
    onnx.save_model(proto, str(out))
    return out


def compare_with_pillow(pre_model: str | Path, model: str | Path, images: list[str]) -> dict[str, Any]:
    """The in-graph preprocessing against the runtime's Pillow path on real images: pixel difference (in levels
    of 0..255, from the normalised tensors) and top-1 agreement of ``pre_model`` with ``model`` run by the runtime."""
    import onnxruntime as ort

    from distillery.runtime import Classifier
    from distillery.runtime.preprocess import load_image

    clf = Classifier.load(model, providers=["CPUExecutionProvider"])
    pre = Classifier.load(pre_model, providers=["CPUExecutionProvider"])
    with_pixels = Path(pre_model).with_suffix(".pixels.onnx")
    build_preprocessing_model(model, with_pixels, pixels_only=True)
    try:
        sess = ort.InferenceSession(str(with_pixels), providers=["CPUExecutionProvider"])
        std = np.asarray(clf.contract["std"], dtype=np.float64).reshape(3, 1, 1) * float(clf.contract.get("scale", 255))
        max_diff, mean_diffs, agree = 0.0, [], 0
        for p in images:
            want = clf.preprocess(p).astype(np.float64)
            got = sess.run(None, {PRE_INPUT: np.asarray(load_image(p))[None]})[0][0].astype(np.float64)
            d = np.abs(got - want) * std  # normalised difference back in pixel levels
            max_diff, mean_diffs = max(max_diff, float(d.max())), mean_diffs + [float(d.mean())]
            agree += clf.predict(p)[0].index == pre.predict(p)[0].index
    finally:
        with_pixels.unlink(missing_ok=True)
    n = max(len(images), 1)
    return {"file": Path(pre_model).name, "n_images": len(images), "max_pixel_diff": round(max_diff, 4),
            "mean_pixel_diff": round(float(np.mean(mean_diffs)) if mean_diffs else 0.0, 5),
            "top1_agreement": agree / n}
