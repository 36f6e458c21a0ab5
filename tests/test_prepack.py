"""Convolution weights packed once for oneDNN (deepcovid/prepack.py, Predictor(prepack=...))."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn

from conftest import assert_same_explanations, lite0_predictor, synthetic_xray
from deepcovid import prepack
from deepcovid.prepack import PackedConv2d, prepack_convs
from deepcovid.samepad import SizedSameConv2d

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this PyTorch build has no oneDNN packing operators")


def conv_of(cin=4, cout=6, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    return conv.eval().requires_grad_(False)


def x_of(shape, seed: int = 1) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last)


class Refuse(nn.Module):
    """Stands in for a packed layer's original: calling it proves the fallback was taken."""

    def forward(self, x):
        raise AssertionError("the original convolution ran")


@pytest.mark.parametrize("kwargs", [
    dict(),                                         # 3x3, stride 1
    dict(stride=2),                                 # strided
    dict(cin=6, groups=6),                          # depthwise
    dict(k=1, padding=0),                           # pointwise
    dict(dilation=2, padding=2, bias=False),        # dilated, no bias
])
def test_a_packed_convolution_gives_the_convolutions_output_without_calling_it(kwargs):
    conv = conv_of(**kwargs)
    x = x_of((2, conv.in_channels, 16, 16))
    packed = PackedConv2d(conv, tuple(x.shape))
    assert packed.weight is conv.weight and packed.bias is conv.bias  # shared, not copied
    assert list(dict(packed.named_parameters())) == list(dict(conv.named_parameters()))
    assert packed.packed.is_mkldnn  # oneDNN's own layout, made once
    with torch.inference_mode():
        want = conv(x)
        packed._original = (Refuse(),)
        got = packed(x)
        bigger = x_of((5, conv.in_channels, 16, 16), seed=3)  # another batch size: still packed
        torch.testing.assert_close(packed(bigger), conv(bigger), atol=1e-5, rtol=1e-5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_what_the_packed_weight_does_not_serve_goes_to_the_original_convolution():
    conv = conv_of()
    packed = PackedConv2d(conv, (1, 4, 16, 16))
    calls = []
    packed._original = (lambda x: calls.append(tuple(x.shape)) or conv(x),)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x_of((1, 4, 12, 20))), conv(x_of((1, 4, 12, 20))))  # another size
        packed(x_of((1, 4, 16, 16)))  # the packed size in float32: packed, not counted
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the original's inputs
            assert packed(x_of((1, 4, 16, 16))).dtype == torch.bfloat16
    assert calls == [(1, 4, 12, 20), (1, 4, 16, 16)]
    # an input that needs a gradient: the original layer, with its backward
    x = x_of((1, 4, 16, 16)).requires_grad_(True)
    packed(x).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    conv(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    assert len(calls) == 3


def test_a_sized_same_convolution_is_packed_at_its_own_size_only():
    torch.manual_seed(0)
    same = Conv2dSame(4, 6, 3, stride=2).eval().requires_grad_(False)
    sized = SizedSameConv2d(same, (16, 16))
    packed = PackedConv2d(sized, (1, 4, 16, 16))
    with torch.inference_mode():
        for hw in ((16, 16), (15, 17)):  # the packed size, then timm's padding through the original
            x = x_of((1, 4, *hw), seed=hw[1])
            torch.testing.assert_close(packed(x), same(x), atol=1e-5, rtol=1e-5)


def test_prepack_swaps_every_plain_convolution_and_keeps_outputs_and_state_dict():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3).eval().requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    same = [n for n, m in model.named_modules() if type(m) is Conv2dSame]
    assert len(plain) > 40 and len(same) == 5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = x_of((1, 3, 64, 64))
    with torch.inference_mode():
        want = model(x)
    swapped = prepack_convs(model, x_of((1, 3, 64, 64), seed=2))
    assert swapped == plain
    assert all(type(model.get_submodule(n)) is PackedConv2d for n in plain)
    assert all(type(model.get_submodule(n)) is Conv2dSame for n in same)  # pads itself: left alone
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())


def test_shared_failing_and_unavailable_swaps_are_skipped(monkeypatch):
    conv = conv_of(4, 4)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # one module, two inputs
    assert prepack_convs(model, x_of((1, 4, 16, 16))) == []
    assert model[0] is conv and model[2] is conv

    class Wrong(PackedConv2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = nn.Sequential(conv_of())
    monkeypatch.setattr(prepack, "PackedConv2d", Wrong)
    assert prepack_convs(model, x_of((1, 4, 16, 16))) == []
    assert type(model[0]) is nn.Conv2d

    class Broken(PackedConv2d):
        def __init__(self, *args):
            raise RuntimeError("no oneDNN kernel for this")

    monkeypatch.setattr(prepack, "PackedConv2d", Broken)
    assert prepack_convs(model, x_of((1, 4, 16, 16))) == []
    monkeypatch.setattr(prepack, "PackedConv2d", PackedConv2d)
    monkeypatch.setattr(prepack, "available", lambda: False)
    assert prepack_convs(model, x_of((1, 4, 16, 16))) == []
    assert type(model[0]) is nn.Conv2d


# --- activations fused into the packed convolutions ------------------------------------------

def packed_then(act: nn.Module):
    """(a packed convolution followed by ``act``, the plain convolution, an input): inputs x10, so
    that the convolution's outputs reach past every clamp tested."""
    conv = conv_of()
    x = x_of((1, 4, 16, 16)) * 10.0
    return nn.Sequential(PackedConv2d(conv, tuple(x.shape)), act).eval(), conv, x


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.Hardtanh(-1.0, 2.0)])
def test_a_clamp_after_a_packed_convolution_becomes_its_post_op_with_the_same_output(act):
    model, conv, x = packed_then(act)
    with torch.inference_mode():
        want = act(conv(x))
    low, high = (0.0, None) if type(act) is nn.ReLU else (act.min_val, act.max_val)
    assert float(conv(x).min()) < low and (high is None or float(conv(x).max()) > high)  # the clamp bites
    assert prepack.fuse_activations(model, x_of((1, 4, 16, 16), seed=2)) == [("0", "1")]
    assert type(model[1]) is nn.Identity and model[0].fused_act is act
    model[0]._original = (Refuse(),)  # the fused output comes from the packed operator alone
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_fused_layer_applies_its_activation_where_the_original_convolution_runs():
    model, conv, x = packed_then(nn.ReLU6(inplace=True))
    assert prepack.fuse_activations(model, x) == [("0", "1")]
    xg = x.clone().requires_grad_(True)  # needs a gradient: the original layer, then the activation
    got = model(xg)
    got.sum().backward()
    ref = x.clone().requires_grad_(True)
    want = nn.functional.relu6(conv(ref))
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xg.grad, ref.grad)
    with torch.inference_mode():  # another size
        other = x_of((1, 4, 12, 20)) * 10.0
        torch.testing.assert_close(model(other), nn.functional.relu6(conv(other)))


class ChangedInPlace(nn.Module):
    """The convolution's output is changed in place (a residual added) before the activation
    reads it: the activation's input is the same tensor, but not the same values."""

    def __init__(self):
        super().__init__()
        self.conv = PackedConv2d(conv_of(4, 4), (1, 4, 16, 16))
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        y += x
        return self.act(y)


class ReadTwice(nn.Module):
    """One good pair, and a convolution whose output the activation and the sum both read."""

    def __init__(self):
        super().__init__()
        self.first, self.act1 = PackedConv2d(conv_of(4, 4), (1, 4, 16, 16)), nn.ReLU6()
        self.second, self.act2 = PackedConv2d(conv_of(4, 4), (1, 4, 16, 16)), nn.ReLU()

    def forward(self, x):
        y = self.second(self.act1(self.first(x)))
        return self.act2(y) + y


def test_no_exact_post_op_kept_layers_changed_outputs_or_a_failed_check_leave_the_model_as_it_was():
    model, _, x = packed_then(nn.SiLU())  # no exact oneDNN post-op
    assert prepack.fuse_activations(model, x) == [] and type(model[1]) is nn.SiLU
    for kept in (0, 1):  # the layers Grad-CAM and the activation maps read
        model, _, x = packed_then(nn.ReLU())
        assert prepack.fuse_activations(model, x, keep=(model[kept],)) == []
        assert type(model[1]) is nn.ReLU and model[0].fused_act is None
    model = ChangedInPlace().eval()
    assert prepack.fuse_activations(model, x_of((1, 4, 16, 16))) == [] and type(model.act) is nn.ReLU
    model = ReadTwice().eval()
    x = x_of((1, 4, 16, 16)) * 10.0
    with torch.inference_mode():
        want = model(x)
    acts = (model.act1, model.act2)
    assert prepack.fuse_activations(model, x) == []  # the sum read the unclamped output: all put back
    assert (model.act1, model.act2) == acts and model.first.fused_act is None and model.second.fused_act is None
    with torch.inference_mode():
        assert torch.equal(model(x), want)


# --- in the Predictor ------------------------------------------------------------------------

predictor = lite0_predictor


def test_the_predictor_packs_by_default_with_the_same_results():
    plain, served = predictor(prepack=False), predictor()
    assert plain.prepacked == [] and not any(type(m) is PackedConv2d for m in plain.model.modules())
    convs = [n for n, m in plain.model.named_modules() if isinstance(m, nn.Conv2d)]
    assert served.prepacked == convs and "backbone.conv_stem" in served.prepacked
    assert_same_explanations(plain, served)
    name = "blocks.1.0.conv_dw"  # folded, unpadded, then packed: still labelled as folded
    assert predictor(fuse_act=False)._layer_label(name) == f"{name} (+BatchNorm, folded)"


def test_a_cam_layer_inside_the_backbone_gets_its_gradient_through_the_original_convolutions():
    """Layers after Grad-CAM's target see inputs that need a gradient: they run unpacked."""
    image = synthetic_xray(np.random.default_rng(5), 96, positive=True)
    a = predictor(prepack=False, cam_layers=["blocks.4"]).explain(image)
    b = predictor(cam_layers=["blocks.4"]).explain(image)
    assert float(np.ptp(a.cam)) > 0.1  # a real map, not a flat one
    np.testing.assert_allclose(b.cam, a.cam, atol=1e-4)


def test_nothing_is_packed_where_the_packed_weights_would_not_serve():
    assert predictor(precision="bf16").prepacked == []  # autocast: the original layers would run
    assert predictor(fold_bn=False, unpad_same=False).prepacked != []  # independent of the other rewrites


def test_an_already_packed_model_still_exports_to_onnx():
    """Another Predictor on a served model's modules (as the TTA tests build one) traces the plain
    layers: ONNX cannot take the packed weight."""
    pytest.importorskip("onnxruntime")
    from deepcovid.inference import Predictor

    served = predictor()
    assert served.prepacked
    onnx = Predictor(served.model, served.meta, device="cpu", num_threads=1, backend="onnx")
    image = synthetic_xray(np.random.default_rng(7), 96, positive=True)
    assert onnx.predict(image).probabilities == pytest.approx(served.predict(image).probabilities, abs=1e-5)


def test_the_predictor_fuses_activations_by_default_with_the_same_results():
    plain, served = predictor(fuse_act=False), predictor()
    assert plain.fused_acts == [] and not any(isinstance(m, PackedConv2d) and m.fused_act is not None
                                              for m in plain.model.modules())
    convs = {c for c, _ in served.fused_acts}
    assert len(served.fused_acts) == 31 and convs < set(served.prepacked)
    assert all(type(served.model.get_submodule(a)) is nn.Identity for _, a in served.fused_acts)
    kept = {"backbone.conv_stem", "backbone.conv_head"}  # the activation maps and Grad-CAM read these
    assert not kept & convs
    assert_same_explanations(plain, served)
    # an inner convolution asked for at explain time now outputs the activated map, and says so
    assert served._layer_label("blocks.1.0.conv_dw") == "blocks.1.0.conv_dw (+BatchNorm, folded; +ReLU6, fused)"
    assert served._layer_label("blocks.1.0.conv_pwl") == "blocks.1.0.conv_pwl (+BatchNorm, folded)"  # no activation
    assert predictor(prepack=False).fused_acts == []  # fusing is a post-op of the packed operator


def test_a_served_model_can_be_deep_copied():
    """The packed weight is an opaque oneDNN tensor: a copy packs its own from the copied weight."""
    served = predictor()
    twin = copy.deepcopy(served.model)
    name = served.fused_acts[0][0]
    original, copied = served.model.get_submodule(name), twin.get_submodule(name)
    assert type(copied) is PackedConv2d and copied.packed.is_mkldnn and copied.fused_act is not None
    assert copied.weight is not original.weight and torch.equal(copied.weight, original.weight)
    x = served._to_device(served.preprocess(synthetic_xray(np.random.default_rng(9), 96, positive=True)))
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), served.model(x), atol=0, rtol=0)
