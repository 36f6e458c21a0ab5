"""TensorFlow 'same' convolutions without the padding copy, for serving.

timm's ``Conv2dSame`` (in the ``tf_`` EfficientNets, so in every Lite model this project
trains) pads its input with ``F.pad`` before each call, because TensorFlow's 'same' padding
puts the odd pixel after the image (for a 3x3 stride-2 kernel on an even size: 0 before, 1
after) and ``Conv2d`` pads both sides alike. That copy is a whole extra pass over the
activation, allocated fresh on every forward.

For one input size the same output comes from a plain ``Conv2d``: pad both sides by the larger
amount, and give the kernel one more row (and column) of zeros in front, so the extra pixel on
the near side is multiplied by zero. Every output reads exactly the pixels it read before, with
the same weights; the added products are exact zeros. Serving knows its input size (the
checkpoint's), so each ``Conv2dSame`` can be swapped for a :class:`SizedSameConv2d` built for
the size it sees. On a 2-core AVX2 CPU (AMD Zen 3) that made EfficientNet-Lite0's served
``predict`` 1.15x faster at 224 px (one image per call) and the preset's ensemble (192 px, flip
TTA) 1.04-1.21x, with the same probabilities to the last bit over the 312 ``test/`` images
(``benchmarks/bench_inference.py``, README "Speed"). timm offers no such
layer (its ``Conv2dSameExport`` still pads with a separate ``ZeroPad2d``), hence this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import get_same_padding, pad_same
from torch import nn

__all__ = ["SizedSameConv2d", "swap_checked", "unpad_same_convs"]

# How far a swapped layer's output may be from the original's, relative to its size: the
# same products in another order at most (~1e-7); a wrong padding moves it by O(1).
CHECK_TOLERANCE = 1e-4


class SizedSameConv2d(nn.Conv2d):
    """A ``Conv2dSame`` for inputs of ``input_hw``, as one ``Conv2d`` (see the module docstring).

    Inputs of another size still get TensorFlow 'same' padding, through the original kernel
    (the zero rows and columns sliced off) and timm's ``pad_same``, so the layer is never wrong,
    only no faster there."""

    def __init__(self, conv: Conv2dSame, input_hw: tuple[int, int]):
        if tuple(conv.dilation) != (1, 1):
            raise ValueError("only undilated convolutions can be rewritten (a dilated kernel's extra tap "
                             "would not land on the extra pixel)")
        kh, kw = conv.weight.shape[-2:]
        ph = get_same_padding(int(input_hw[0]), kh, conv.stride[0], 1)
        pw = get_same_padding(int(input_hw[1]), kw, conv.stride[1], 1)
        # timm pads p // 2 before and p - p // 2 after: one more after when p is odd
        self.extra = (ph % 2, pw % 2)
        super().__init__(conv.in_channels, conv.out_channels, (kh + self.extra[0], kw + self.extra[1]),
                         stride=conv.stride, padding=(ph - ph // 2, pw - pw // 2), groups=conv.groups,
                         bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        with torch.no_grad():
            self.weight.copy_(F.pad(conv.weight, (self.extra[1], 0, self.extra[0], 0)))
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.weight.requires_grad_(conv.weight.requires_grad)
        if self.bias is not None:
            self.bias.requires_grad_(conv.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.input_hw:
            return super().forward(x)
        weight = self.weight[..., self.extra[0]:, self.extra[1]:]
        x = pad_same(x, weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)


def swap_checked(model: nn.Module, example: torch.Tensor, wanted, build,
                 tolerance: float = CHECK_TOLERANCE) -> list[str]:
    """Swap, in place, each sub-module for which ``wanted(module)`` holds and that is called once
    in a forward of ``example`` by ``build(module, input)``, keeping only swaps whose output on
    that input matches the original's (within ``tolerance`` relative to its size); a ``build``
    or replacement that raises ``RuntimeError``/``ValueError`` is skipped too. The serving
    rewrites' shared mechanics (this one and ``prepack``). Returns the names swapped."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name):
        def hook(_module, inputs):
            seen.setdefault(name, []).append(inputs[0])
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if wanted(m)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    swapped = []
    with torch.no_grad():
        for name, inputs in seen.items():
            if len(inputs) != 1:  # shared weights: more than one input is possible
                continue
            old, x = model.get_submodule(name), inputs[0]
            try:
                new = build(old, x)
                want, got = old(x), new(x)
            except (RuntimeError, ValueError):
                continue
            if got.shape != want.shape or float((got - want).abs().max()) > tolerance * max(
                    1.0, float(want.abs().max())):
                continue
            model.set_submodule(name, new)
            swapped.append(name)
    return swapped


def unpad_same_convs(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Swap, in place, every ``Conv2dSame`` in ``model`` (exact type, undilated, called once in a
    forward of ``example``) for a :class:`SizedSameConv2d` built for the input size it saw.
    Each swap is checked on the input the layer saw and skipped if its output differs. Returns
    the names of the swapped layers."""
    return swap_checked(model, example, lambda m: type(m) is Conv2dSame and tuple(m.dilation) == (1, 1),
                        lambda conv, x: SizedSameConv2d(conv, tuple(x.shape[-2:])))
