"""A frozen model rewritten to run fast, with the same outputs: the rewrites composed.

``serve`` applies, in place and in the one order that works, the rewrites the ``Predictor``
serves a checkpoint with and the feature cache extracts frozen layers with:

1. BatchNorm folded into the convolution before it (``bnfold``);
2. TensorFlow 'same' convolutions as plain ones at the example's size (``samepad``);
3. the model moved to its device, ``channels_last`` on CPU and CUDA;
4. on a CPU, in float32, each convolution's weight packed once for oneDNN (``prepack``);
5. each ReLU/ReLU6 after a packed convolution applied by it (``prepack.fuse_activations``).

Each rewrite checks the model's output on ``example`` and undoes itself on a difference, so the
result computes what the model did (to float rounding). Packing is last: a packed weight is tied
to the device, dtype and layout it was packed for. ``keep``: modules whose outputs must stay the
checkpoint's (the layers Grad-CAM and the activation maps read), left out of steps 1 and 5;
a function of the model, asked again before each of those steps, as steps 2 and 4 replace layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from .bnfold import FoldReport

__all__ = ["ServeReport", "ieee_float32", "serve"]


@contextlib.contextmanager
def ieee_float32(device: torch.device):
    """float32 that means float32 on CUDA too. cuDNN runs float32 convolutions as TF32 by default
    (a 10-bit mantissa): on an H100 that moved a ResNet50's probabilities by 1.3e-3 from the
    CPU's; with TF32 off they agreed to 1e-6 (16 X-rays, `deepcovid predict`'s six decimals).
    Process-wide switches, so they are set only inside the predictor's lock and restored after.
    """
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class ServeReport:
    """What ``serve`` did: ``fold`` (None when folding was off), and the names of the layers
    unpadded, packed, and (convolution, activation) fused."""

    fold: FoldReport | None = None
    unpadded: list[str] = field(default_factory=list)
    prepacked: list[str] = field(default_factory=list)
    fused: list[tuple[str, str]] = field(default_factory=list)


def serve(model: nn.Module, example: torch.Tensor, device: torch.device, *,
          keep: Callable[[nn.Module], tuple[nn.Module, ...]] = lambda model: (),
          fold_bn: bool = True, unpad_same: bool = True, channels_last: bool = True, prepack: bool = True,
          fuse_act: bool = True) -> tuple[nn.Module, ServeReport]:
    """(the model on ``device``, what was done). ``model`` must be in eval mode; it is changed in
    place. ``example``: an input it takes, on the model's current device (its values do not
    matter beyond being typical; not all zeros, under which a wrong padding would not show).
    ``channels_last``: the layout the model will be called with (CPU and CUDA run it fastest).
    ``prepack``: whether the caller runs the model in float32 without autocast, on the eager
    model; packing then happens on a CPU only. ``fuse_act`` applies to packed layers only."""
    # imported here: they load timm, which importing the web app must not (see app.py)
    from .bnfold import fold_batchnorm
    from .prepack import fuse_activations, prepack_convs
    from .samepad import unpad_same_convs

    report = ServeReport()
    if fold_bn:
        with ieee_float32(example.device):  # TF32 rounding would blur the fold's own check
            report.fold = fold_batchnorm(model, example, keep=keep(model))
    if unpad_same:
        with ieee_float32(example.device):
            report.unpadded = unpad_same_convs(model, example)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout)  # explicit: the model may come in either layout
    if prepack and device.type == "cpu":
        served_example = example.to(device, memory_format=layout)
        report.prepacked = prepack_convs(model, served_example)
        if fuse_act and report.prepacked:
            report.fused = fuse_activations(model, served_example, keep=keep(model))
    return model, report
