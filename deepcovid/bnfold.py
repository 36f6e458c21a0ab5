"""Fold BatchNorm into the convolution before it, for serving.

In eval mode a BatchNorm layer is a fixed per-channel affine map, so ``bn(conv(x))`` equals one
convolution with rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval`` does
the arithmetic). On a CPU the BatchNorm pass over every activation is a large share of an
eager forward of a small network: folding made EfficientNet-Lite0's channels_last forward
1.2-1.3x faster on this project's 2-core CPU, and ``Predictor.predict`` 1.8-2x (where the
unfolded BatchNorm ran on channels_last inputs), with probabilities within 1e-6 of the unfolded
model's on real X-rays (``benchmarks/bench_inference.py``). ``torch.compile`` with freezing and
ONNX Runtime fold BatchNorm too, but only for the prediction; this keeps the eager model, so
``explain`` (hooks and autograd) gets the speed as well.

Why our own pass rather than a library's: ``torch.ao.quantization.fuse_modules`` needs the
pairs named by hand and exact ``nn.BatchNorm2d`` modules (timm's EfficientNets use
``BatchNormAct2d``, BatchNorm plus activation in one module), and ``torch.fx`` fusion traces
the model into a new module whose layer names no longer match the ones Grad-CAM hooks. So the
pairs are found by watching one forward: a BatchNorm whose input is exactly the output tensor of
a Conv2d, each called once. The folded model is then checked against the original's output on
the same input, and everything is put back if they differ (a convolution's output used by
something besides its BatchNorm would be caught there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["FoldReport", "find_pairs", "fold_batchnorm", "relative_error"]

# How far the folded model's outputs may move from the original's, relative to their size.
# Folding changes only float rounding (~1e-6 here); a wrong fold moves outputs by O(1).
CHECK_TOLERANCE = 1e-3

# Exact types only: a subclass may do more in its forward than the fold carries over. timm's
# Conv2dSame (TensorFlow 'same' padding, in the tf_ EfficientNets) pads its input, then convolves
# with its own weight and bias, so a folded weight and bias carry over; BatchNormAct2d is
# BatchNorm followed by its dropout and activation (ActAfterFold keeps those).
_CONVS = (nn.Conv2d, Conv2dSame)
_BATCHNORMS = (nn.BatchNorm2d, BatchNormAct2d)


class ActAfterFold(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation moved into the conv:
    its dropout and activation, under the same attribute names."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@dataclass
class FoldReport:
    """``pairs``: the (conv, BatchNorm) names folded; ``kept``: pairs left alone because a layer
    in ``keep`` is one of them; ``reverted``: why nothing was folded, if the check failed."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    reverted: str | None = None


def _after_fold(bn: nn.Module) -> nn.Module:
    """The module that replaces ``bn`` (one of ``_BATCHNORMS``) once folded."""
    return ActAfterFold(bn.drop, bn.act) if type(bn) is BatchNormAct2d else nn.Identity()


def find_pairs(model: nn.Module, x: torch.Tensor, first, second) -> tuple[list[tuple[str, str]], object]:
    """(name, name) pairs of sub-modules where one for which ``second(module)`` holds takes as its
    input exactly the output tensor of one for which ``first(module)`` holds, untouched in
    between (no in-place change: its version counter is the same), each called once, from one
    forward of ``x``; also returns that forward's output (the rewrite's check reference)."""
    # id -> (name, output, its version then); holding the tensor keeps its id unique
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def after_first(name):
        def hook(_module, _inp, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out, out._version)
        return hook

    def before_second(name):
        def hook(_module, inp):
            calls[name] = calls.get(name, 0) + 1
            hit = outputs.get(id(inp[0])) if inp else None
            if hit is not None and hit[1] is inp[0] and hit[2] == inp[0]._version:
                pairs.append((hit[0], name))
        return hook

    handles = []
    try:
        for name, m in model.named_modules():
            if first(m):
                handles.append(m.register_forward_hook(after_first(name)))
            elif second(m):
                handles.append(m.register_forward_pre_hook(before_second(name)))
        with torch.no_grad():  # not inference_mode: version counters are kept
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    # A module called twice (shared weights) would change both uses; leave it alone.
    return [(a, b) for a, b in pairs if calls.get(a) == 1 and calls.get(b) == 1], out


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def relative_error(got, want) -> float:
    """The largest absolute difference between two model outputs (tensors, or tuples and lists
    of them), relative to the reference's size (at least 1); infinite if their structures differ."""
    got, want = _flat(got), _flat(want)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    return max((float((g.float() - w.float()).abs().max()) / max(1.0, float(w.float().abs().max()))
                for g, w in zip(got, want)), default=float("inf"))


def _set(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf)
    setattr(owner, leaf, module)
    return old


def fold_batchnorm(model: nn.Module, example: torch.Tensor, keep: tuple[nn.Module, ...] = ()) -> FoldReport:
    """Fold, in place, every eval-mode BatchNorm into the Conv2d that feeds it.

    ``example``: an input the model accepts (its values do not matter). ``keep``: modules whose
    outputs must stay as they are (the layers Grad-CAM and the activation maps read): a pair
    with either of them in ``keep`` is not folded. Returns what was done; on a failed check the
    model is exactly as it was."""
    if any(m.training for m in model.modules()):
        raise ValueError("fold_batchnorm needs a model in eval mode (all of its modules)")
    keep_ids = {id(m) for m in keep}
    candidates, reference = find_pairs(model, example, lambda m: type(m) in _CONVS,
                                       lambda m: type(m) in _BATCHNORMS)
    report = FoldReport()
    replaced: list[tuple[str, nn.Module]] = []

    def put_back() -> None:
        for name, old in reversed(replaced):
            _set(model, name, old)

    try:
        with torch.no_grad():
            for conv_name, bn_name in candidates:
                conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
                if id(conv) in keep_ids or id(bn) in keep_ids:
                    report.kept.append((conv_name, bn_name))
                    continue
                if bn.running_mean is None or bn.running_var is None:
                    continue
                fused = fuse_conv_bn_eval(conv, bn)
                fused.weight.requires_grad_(conv.weight.requires_grad)
                fused.bias.requires_grad_(conv.weight.requires_grad)
                replaced.append((conv_name, _set(model, conv_name, fused)))
                replaced.append((bn_name, _set(model, bn_name, _after_fold(bn))))
                report.pairs.append((conv_name, bn_name))
            if not report.pairs:
                return report
            got = model(example)
    except BaseException:  # never leave a half-folded model behind
        put_back()
        raise
    worst = relative_error(got, reference)
    if not worst <= CHECK_TOLERANCE:
        put_back()
        report.reverted = (f"folded outputs differ from the original's by {worst:.3g} (relative); "
                           "BatchNorm left unfolded")
        report.pairs = []
    return report
