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

The packed operator also applies a ReLU or ReLU6 to its output in the same pass (oneDNN's
post-op, the fusion inductor makes too). ``fuse_activations`` moves each activation module that
reads only a packed convolution's output into that convolution and checks the whole model's
output; it is exact (a clamp), so the results do not change, and it saved about 7 % of Lite0's
forward here (31 of its 49 convolutions). A SiLU or GELU is not fused: oneDNN's versions are
approximations.
"""

from __future__ import annotations

import torch
from torch import nn

from .bnfold import find_pairs, relative_error
from .samepad import SizedSameConv2d, swap_checked

__all__ = ["PackedConv2d", "available", "fuse_activations", "post_op", "prepack_convs"]

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
        self.input_shape = [int(s) for s in input_shape]
        self.input_hw = tuple(self.input_shape[-2:])
        self._args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        self._post_op: tuple[str, list[float]] = ("none", [])
        self._act: tuple[nn.Module, ...] = ()  # the activation fused into this layer, if any (unregistered)
        self.packed = self._pack()

    def _pack(self) -> torch.Tensor:
        # the bias as the operator takes it, made once: a detach a call cost more than the check
        self._packed_bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._reorder_convolution_weight(self.weight.detach(), *self._args, self.input_shape)

    # The packed weight is an opaque oneDNN tensor that can be neither copied nor pickled: a copy
    # (copy.deepcopy, pickle) carries the plain weight and packs its own.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("packed", None)
        state.pop("_packed_bias", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.packed = self._pack()

    @property
    def fused_act(self) -> nn.Module | None:
        """The activation this layer applies to its output (``fuse_activations``), or None."""
        return self._act[0] if self._act else None

    def fuse(self, act: nn.Module | None) -> None:
        """Apply ``act`` (one :func:`post_op` takes) to this layer's output from now on, as
        oneDNN's post-op on the packed path and as the module itself on the original's; None
        undoes it."""
        if act is None:
            self._post_op, self._act = ("none", []), ()
            return
        op = post_op(act)
        if op is None:
            raise ValueError(f"{type(act).__name__} has no exact oneDNN post-op")
        self._post_op, self._act = op, (act,)

    def _serves(self, x: torch.Tensor) -> bool:
        # Runs before every packed convolution, so the cheapest tests go first: ~4 us a layer
        # instead of ~6 us before they were reordered (EfficientNet-Lite0 has 49 of them).
        if not (x.is_cpu and x.dtype == torch.float32 and x.dim() == 4 and x.shape[2] == self.input_hw[0]
                and x.shape[3] == self.input_hw[1]):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return False
        # An export or a compile of an already served model traces the plain layer: the packed
        # weight is an opaque tensor neither ONNX nor dynamo can take. ONNX's TorchScript export
        # runs under jit tracing and its dynamo export under torch.export (is_compiling), so
        # torch.onnx.is_in_onnx_export (an import on every call) adds nothing.
        return not (torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._serves(x):
            y = self._original[0](x)
            return self._act[0](y) if self._act else y
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, self._packed_bias, *self._args,
                                                       *self._post_op, "")

    def extra_repr(self) -> str:
        fused = f", +{type(self._act[0]).__name__}" if self._act else ""
        return f"{super().extra_repr()}, packed for {self.input_hw[0]}x{self.input_hw[1]}{fused}"


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


def post_op(act: nn.Module) -> tuple[str, list[float]] | None:
    """The oneDNN post-op (``_convolution_pointwise``'s attr and scalars) computing ``act``
    exactly, or None. Only clamps: the same comparison in either place, so the same numbers
    (SiLU and GELU would round differently)."""
    if type(act) is nn.ReLU:
        return ("relu", [])
    if type(act) in (nn.ReLU6, nn.Hardtanh):
        return ("hardtanh", [float(act.min_val), float(act.max_val)])
    return None


def fuse_activations(model: nn.Module, example: torch.Tensor, keep: tuple[nn.Module, ...] = ()) -> list[tuple[str, str]]:
    """Move, in place, each ReLU or ReLU6 module that takes exactly the output of a
    :class:`PackedConv2d` into that layer, as its oneDNN post-op (the module itself is replaced
    by ``nn.Identity``). A separate activation is one more pass over every activation map: on
    this project's 2-core CPU fusing it made the packed EfficientNet-Lite0 forward about 1.07x
    faster (README "Speed"). ``keep``: modules whose outputs must stay as they are (the layers
    Grad-CAM and the activation maps read). The fused model is checked against the original's
    output on ``example``; on a difference everything is put back. Returns the (convolution,
    activation) names fused."""
    keep_ids = {id(m) for m in keep}
    pairs, reference = find_pairs(model, example, lambda m: isinstance(m, PackedConv2d),
                                  lambda m: post_op(m) is not None)
    done: list[tuple[str, str]] = []

    def put_back() -> None:
        for conv_name, act_name in reversed(done):
            conv = model.get_submodule(conv_name)
            model.set_submodule(act_name, conv.fused_act)
            conv.fuse(None)

    try:
        for conv_name, act_name in pairs:
            conv, act = model.get_submodule(conv_name), model.get_submodule(act_name)
            if id(conv) in keep_ids or id(act) in keep_ids or conv.fused_act is not None:
                continue
            conv.fuse(act)
            model.set_submodule(act_name, nn.Identity())
            done.append((conv_name, act_name))
        if not done:
            return []
        with torch.no_grad():
            got = model(example)
    except BaseException:  # never leave a half-fused model behind
        put_back()
        raise
    if not relative_error(got, reference) <= CHECK_TOLERANCE:
        put_back()
        return []
    return done
