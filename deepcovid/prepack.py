"""Convolution weights packed once into oneDNN's layout, for serving on a CPU.

An eager ``F.conv2d`` on a CPU hands its weight to oneDNN in PyTorch's plain layout, and oneDNN
reorders it into its own blocked layout on every call: for ResNet50, 25 million weights copied
per forward. ``torch.compile`` with freezing avoids that by packing each weight once (inductor's
``mkldnn_fusion`` pass: ``mkldnn._reorder_convolution_weight``, then
``mkldnn._convolution_pointwise``), which is much of why it was faster than eager here. This
module makes that one step in the eager model, so ``explain`` (hooks, autograd) keeps working,
layer names stay the same and nothing is compiled. On this project's 2-core AVX2 CPU (AMD Zen
3) it made the served forward 1.24x faster for ResNet50 and 1.14x for EfficientNet-Lite0 at
224 px, with the same outputs (``benchmarks/bench_inference.py``, README "Speed").

Why our own module: PyTorch has no public eager API for it (``torch.utils.mkldnn.to_mkldnn``
converts to TorchScript and to mkldnn tensors, which timm's models and Grad-CAM's hooks do not
take). The two operators are the ones inductor emits. Where they are missing or fail (another
PyTorch build, another CPU) nothing is swapped: every swap is checked on the input the layer
saw, and the original layer is kept if the packed one errs or differs.
"""

from __future__ import annotations

import torch
from torch import nn

from .samepad import SizedSameConv2d, swap_checked

__all__ = ["PackedConv2d", "available", "prepack_convs"]

# Same products, maybe in another order: ~1e-7 relative. A wrong layout moves outputs by O(1).
CHECK_TOLERANCE = 1e-4

# Exact types only: a subclass may do more in its forward than one convolution. A
# SizedSameConv2d is a plain convolution at its own input size (and falls back outside it).
_PACKABLE = (nn.Conv2d, SizedSameConv2d)


def available() -> bool:
    """Whether this PyTorch build has oneDNN and the two operators inductor packs with."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and hasattr(ops, "_reorder_convolution_weight") and hasattr(ops, "_convolution_pointwise"))


class PackedConv2d(nn.Conv2d):
    """``conv`` with its weight packed for inputs of ``input_shape`` (N, C, H, W).

    It shares ``conv``'s weight and bias (same parameters, same state dict) and keeps ``conv``
    itself, unregistered, for everything the packed weight does not serve: another height or
    width, another dtype or device, autocast, an input that needs a gradient (the packed
    operator has no backward), or a trace for ONNX export or ``torch.compile``. Grad-CAM's graph starts at its target layer (``cam.GraphCut``),
    so the layers before it run packed in ``explain`` too."""

    def __init__(self, conv: nn.Conv2d, input_shape: tuple[int, ...]):
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("only convolutions with explicit zero padding can be packed")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self._original = (conv,)  # a tuple: not a submodule, so no second copy of the parameters
        self.input_hw = tuple(int(s) for s in input_shape[-2:])
        self._args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), *self._args, [int(s) for s in input_shape])

    def _serves(self, x: torch.Tensor) -> bool:
        # an export or a compile of an already served model traces the plain layer: the packed
        # weight is an opaque tensor neither ONNX nor dynamo can take
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return False
        return (x.dim() == 4 and tuple(x.shape[-2:]) == self.input_hw and x.dtype == torch.float32
                and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._serves(x):
            return self._original[0](x)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, bias, *self._args, "none", [], "")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed for {self.input_hw[0]}x{self.input_hw[1]}"


def prepack_convs(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Swap, in place, every convolution of ``model`` (exact ``nn.Conv2d`` or ``SizedSameConv2d``,
    called once in a forward of ``example`` on the CPU in float32) for a :class:`PackedConv2d`
    built for the input it saw. Each swap is checked on that input and skipped if the packed
    operator errs or its output differs. Returns the names of the swapped layers ([] when
    :func:`available` is False)."""
    if not available() or example.device.type != "cpu":
        return []

    def build(conv: nn.Module, x: torch.Tensor) -> PackedConv2d:
        if x.dtype != torch.float32:
            raise ValueError("only float32 inputs are packed")
        return PackedConv2d(conv, tuple(x.shape))

    return swap_checked(model, example, lambda m: type(m) in _PACKABLE, build, CHECK_TOLERANCE)
