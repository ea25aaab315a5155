"""INT8 quantisation-aware fine-tuning (export/qat.py): BatchNorm folding, the fake-quantisation equations
recomputed by hand, and the fine-tuning loop on a tiny timm model."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from distillery.export.qat import _ActivationQuant, _weight_fake_quant, fold_batchnorm, qat_finetune  # noqa: E402


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding has something to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_fold_batchnorm_keeps_the_logits():
    model = tiny_model()
    x = torch.randn(4, 3, 32, 32)
    folded, n = fold_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n == n_bn > 10  # every BatchNorm of this model follows a conv
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    bns = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) and torch.all(b.running_mean == 0) for b in bns)
    assert not any(p.requires_grad for b in bns for p in b.parameters())  # the identity is not fine-tuned away
    # the original is untouched
    assert not torch.all(next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).running_mean == 0)


def test_weight_fake_quant_by_hand():
    w = torch.tensor([[0.47, -1.0, 0.26], [2.0, 0.1, -0.31]])  # no exact .5 ties
    got = _weight_fake_quant(bits=7)(w).numpy()
    # symmetric per output channel on onnxruntime's reduce_range int8 grid [-64, 64]:
    # scale = max|w_c| / 64, q = clamp(round(w / scale), -64, 64)
    want = []
    for row in w.numpy().astype(np.float64):
        s = np.abs(row).max() / 64
        want.append(np.clip(np.round(row / s), -64, 64) * s)
    np.testing.assert_allclose(got, np.array(want), rtol=1e-6, atol=1e-7)
    assert abs(got[1, 1] - 2.0 / 64 * 3) < 1e-6  # 0.1 / (2/64) = 3.2 -> 3 steps
    w8 = _weight_fake_quant(bits=8)(w).numpy()
    assert abs(w8[0, 2] - round(0.26 / (1.0 / 127)) / 127) < 1e-6


def test_activation_fake_quant_by_hand():
    mod = nn.Identity()
    act = _ActivationQuant([mod])
    act.mode = "observe"
    mod(torch.tensor([-1.0, 3.0]))
    mod(torch.tensor([0.5, 2.0]))
    assert act.ranges[0] == [-1.0, 3.0]
    act.mode = "quantise"
    x = torch.tensor([-1.0, -0.013, 0.0, 0.7, 1.2345, 3.0, 5.0])
    got = mod(x).numpy()
    # uint8 asymmetric: scale = (3 - -1) / 255, zero point = round(1 / scale) = 64
    s, zp = 4.0 / 255, 64
    want = (np.clip(np.round(x.numpy() / s) + zp, 0, 255) - zp) * s
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got[-1] == pytest.approx((255 - 64) * s)  # clipped at the top of the range
    act.remove()
    assert torch.equal(mod(x), x)


def small_cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        model[-1].weight.mul_(20)  # confident logits: rounding errors show in the KL
    return model.eval()


def test_qat_finetune_brings_the_simulated_int8_model_closer_to_the_student():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((128, 3, 16, 16)).astype(np.float32)
    model = small_cnn()
    # 3-bit weights: a rounding error large enough to be worth fixing in a few short epochs (on seeds 0-7 of
    # this toy the KL falls to 0.02-0.25 of its starting value)
    tuned, info = qat_finetune(model, images, images[:16], epochs=10, lr=3e-4, batch_size=16, weight_bits=3,
                               exclude=[], progress=False)
    # rounded: the input, both ReLU outputs (the convs before them are not rounded on their own), the pooled
    # features and the logits -- onnxruntime's QuantizeLinear nodes on this graph (see the test below)
    assert (info["batchnorm_folds"], info["weights_rounded"], info["activations_rounded"]) == (2, 3, 5)
    assert len(info["kl_by_epoch"]) == 10 and all(np.isfinite(info["kl_by_epoch"]))
    kl = info["simulated_int8_kl"]
    assert kl["after"] < 0.5 * kl["before"], kl
    # what comes back is a plain float model: no parametrisations, no hooks, trained weights
    assert not any(parametrize.is_parametrized(m) for m in tuned.modules())
    assert not any(m._forward_hooks for m in tuned.modules())
    x = torch.from_numpy(images[:8])
    with torch.no_grad():
        assert not torch.allclose(tuned(x), model(x)) and torch.isfinite(tuned(x)).all()


def test_qat_keeps_excluded_layers_unrounded_on_a_timm_model():
    model = tiny_model(1)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    _, info = qat_finetune(model, images, images, epochs=1, lr=1e-6, batch_size=16,
                           exclude=["first_conv", "classifier"], progress=False)
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert info["weights_rounded"] == convs - 2  # first conv and classifier stay in float
    assert info["batchnorm_folds"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    from distillery.export.qat import SimulatedInt8

    sim = SimulatedInt8(model, exclude=["first_conv", "classifier"])
    named = {id(m): n for n, m in sim.model.named_modules()}
    rounded = {named[id(m)] for m in sim.weights}
    assert "conv_stem" not in rounded and "classifier" not in rounded and "conv_head" in rounded
    assert not any(where == "in" and named[id(m)] == "conv_stem" for m, where in sim.points)  # input stays float


def test_fold_refuses_a_layout_it_cannot_fold():
    class BnFirst(nn.Module):  # the BatchNorm is registered after the conv but applied before it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(self.bn(x)).mean((2, 3)))

    model = BnFirst().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
        model.bn.running_var.fill_(2.0)
    calib = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    with pytest.raises(RuntimeError, match="folding BatchNorm.*int8_qat_epochs: 0"):
        qat_finetune(model, calib, calib, epochs=1, progress=False)


@pytest.mark.parametrize("which", ["timm", "plain"])
def test_simulation_rounds_where_and_how_onnxruntime_does(tmp_path, which):
    """Every tensor onnxruntime's QDQ quantiser rounds (one QuantizeLinear each) has a simulated rounding
    point with the same scale, and no point is extra: same count, same scales. (A Flatten's output is
    re-quantised on its input's grid, which changes nothing: it has no point of its own.)"""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from distillery.export.formats import _export_fp32, _export_int8
    from distillery.export.qat import SimulatedInt8

    # timm's MobileNetV3 with the export's default exclusions; a torchvision-style conv/BN/ReLU net with none
    model, exclude, px = (tiny_model(2), ["first_conv", "classifier"], 32) if which == "timm" else (small_cnn(), [], 16)
    data_config = {"input_size": [3, px, px], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                   "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center"}
    config = {"class_names": ["a", "b", "c"], "data_config": data_config, "architecture": "mobilenetv3_small_050",
              "job_hash": "t"}
    calib = np.random.default_rng(0).standard_normal((32, 3, px, px)).astype(np.float32)
    _export_fp32(model, config, 17, tmp_path / "m.onnx", progress=False)
    _export_int8(tmp_path / "m.onnx", config, calib, tmp_path / "m.int8.onnx", exclude, True)
    q = onnx.load(str(tmp_path / "m.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    made_by = {o: n.op_type for n in q.graph.node for o in n.output}
    ort_scales = sorted(float(inits[n.input[1]]) for n in q.graph.node
                        if n.op_type == "QuantizeLinear" and made_by.get(n.input[0]) != "Flatten")

    sim = SimulatedInt8(model, exclude=exclude, weight_bits=7, check=calib[:4])
    sim.calibrate(calib)
    sim_scales = sorted((max(hi, 0.0) - min(lo, 0.0)) / 255 for lo, hi in sim.act.ranges.values())
    assert len(sim.points) == len(sim.act.ranges) == len(ort_scales) > (50 if which == "timm" else 4)
    np.testing.assert_allclose(sim_scales, ort_scales, rtol=1e-3, atol=1e-7)
    # weights: onnxruntime's per-channel scales of the folded weights are the simulation's (reduce_range grid)
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    w_scales = sorted(np.round(inits[dq[n.input[1]].input[1]], 7).tolist() for n in q.graph.node
                      if n.op_type in ("Conv", "Gemm") and n.input[1] in dq)
    sim_w = sorted(np.round((m.weight.detach().abs().reshape(m.weight.shape[0], -1).amax(1) / 64).numpy()
                            .astype(np.float32), 7).tolist() for m in sim.weights)
    assert len(w_scales) == len(sim_w) == len(sim.weights)
    for a, b in zip(w_scales, sim_w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
