"""TensorFlow 'same' convolutions without the padding copy (deepcovid/samepad.py, Predictor(unpad_same=...))."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn

from conftest import assert_same_explanations, lite0_predictor
from deepcovid.samepad import SizedSameConv2d, unpad_same_convs


def same_conv(cin: int, cout: int, k: int, stride: int, dilation: int = 1) -> Conv2dSame:
    torch.manual_seed(0)
    conv = Conv2dSame(cin, cout, k, stride=stride, dilation=dilation, bias=True)
    with torch.no_grad():
        conv.weight.normal_()  # every tap non-zero, so a tap on the wrong pixel shows
    return conv.eval()


def x_of(hw: tuple[int, int], c: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, c, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k,stride,hw,kernel,padding", [
    (3, 2, (16, 16), (4, 4), (1, 1)),   # even size: 0 before, 1 after -> one zero row/column in front
    (3, 2, (15, 15), (3, 3), (1, 1)),   # odd size: 1 and 1, already symmetric
    (5, 2, (16, 16), (6, 6), (2, 2)),   # 1 before, 2 after
    (3, 2, (16, 15), (4, 3), (1, 1)),   # mixed
    (3, 1, (16, 16), (3, 3), (1, 1)),   # stride 1: symmetric
])
def test_a_sized_conv_gives_the_same_output_as_the_same_padded_one(k, stride, hw, kernel, padding):
    conv = same_conv(4, 6, k, stride)
    new = SizedSameConv2d(conv, hw)
    assert type(new).__mro__[1] is nn.Conv2d
    assert new.kernel_size == kernel and new.padding == padding and new.stride == conv.stride
    x = x_of(hw)
    with torch.no_grad():
        want, got = conv(x), new(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the added taps are zeros, the original kernel sits behind them
    eh, ew = kernel[0] - k, kernel[1] - k
    assert torch.equal(new.weight[..., eh:, ew:], conv.weight)
    w = new.weight.detach()
    assert float(w[..., :eh, :].abs().sum() + w[..., :, :ew].abs().sum()) == 0.0


def test_another_input_size_still_gets_same_padding():
    conv = same_conv(4, 6, 3, 2)
    new = SizedSameConv2d(conv, (16, 16))
    for hw in ((15, 15), (20, 18)):
        x = x_of(hw, seed=hw[0])
        with torch.no_grad():
            torch.testing.assert_close(new(x), conv(x), atol=1e-5, rtol=1e-5)


def test_a_plain_conv_padded_on_both_sides_would_be_wrong():
    """What the module exists for: symmetric padding alone reads other pixels."""
    conv = same_conv(4, 6, 3, 2)
    x = x_of((16, 16))
    plain = nn.Conv2d(4, 6, 3, stride=2, padding=1).eval()
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        plain.bias.copy_(conv.bias)
        assert plain(x).shape == conv(x).shape
        assert float((plain(x) - conv(x)).abs().max()) > 0.1


def test_dilated_convolutions_are_refused_and_left_alone():
    conv = same_conv(4, 6, 3, 2, dilation=2)
    with pytest.raises(ValueError, match="dilated"):
        SizedSameConv2d(conv, (16, 16))
    model = nn.Sequential(conv)
    assert unpad_same_convs(model, x_of((16, 16))) == []
    assert model[0] is conv


def test_a_shared_convolution_is_left_alone():
    conv = same_conv(4, 4, 3, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    assert unpad_same_convs(model, x_of((16, 16))) == []
    assert model[0] is conv and model[2] is conv


def test_a_swap_whose_output_would_differ_is_skipped(monkeypatch):
    import deepcovid.samepad as samepad

    class Wrong(SizedSameConv2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    monkeypatch.setattr(samepad, "SizedSameConv2d", Wrong)
    conv = same_conv(4, 6, 3, 2)
    model = nn.Sequential(conv)
    assert unpad_same_convs(model, x_of((16, 16))) == []
    assert model[0] is conv


def test_efficientnet_lite0_loses_every_padding_copy_and_keeps_its_outputs(monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3).eval()
    same = [n for n, m in model.named_modules() if type(m) is Conv2dSame]
    assert len(same) == 5  # the stem and the four stride-2 depthwise convolutions
    kernels = {n: model.get_submodule(n).kernel_size for n in same}  # 3x3 and 5x5
    x = x_of((64, 64), c=3)
    with torch.no_grad():
        want = model(x)
    swapped = unpad_same_convs(model, x_of((64, 64), c=3, seed=2))
    assert swapped == same
    assert not any(type(m) is Conv2dSame for m in model.modules())
    # every stride-2 input here has an even size: one zero row and column in front of each kernel
    assert {n: model.get_submodule(n).kernel_size for n in same} == {n: (k + 1, k + 1) for n, (k, _) in kernels.items()}

    calls = []
    real_pad = torch.nn.functional.pad

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real_pad(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "pad", spy)  # timm's pad_same calls F.pad
    with torch.no_grad():
        model(x[:, :, :48, :48])
    assert calls  # the spy sees timm's padding (another size: the fallback path)
    calls.clear()
    with torch.no_grad():
        got = model(x)
    assert calls == []  # no padding copy left in the forward
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- in the Predictor ------------------------------------------------------------------------

predictor = lite0_predictor


def test_the_predictor_serves_sized_convolutions_with_the_same_results():
    plain, served = predictor(unpad_same=False), predictor()
    assert plain.unpadded == [] and any(type(m) is Conv2dSame for m in plain.model.modules())
    assert len(served.unpadded) == 5 and not any(type(m) is Conv2dSame for m in served.model.modules())
    assert "backbone.conv_stem" in served.unpadded  # an activation layer: still found by name, same maps
    assert_same_explanations(plain, served)
    # a folded convolution that was then swapped is still labelled as folded
    name = "blocks.1.0.conv_dw"
    assert f"backbone.{name}" in served.unpadded
    assert served._layer_label(name) == f"{name} (+BatchNorm, folded; +ReLU6, fused)"
