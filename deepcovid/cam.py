"""Grad-CAM (through the grad-cam package) and activation maps, plus pure overlay functions.

Everything that touches a model's hooks is a context manager that removes its hooks on exit,
so an exception half-way through an explanation can never leave a hook behind:

* grad-cam's CAM objects (``with GradCAM(...) as cam``) hold the target-layer hooks;
* :class:`GraphCut` makes the target layer's output a fresh leaf tensor that requires grad, so
  the autograd graph (and the backward pass) only covers the layers after it;
* :class:`ActivationRecorder` captures the outputs of named layers during the same forward.

The CAM arithmetic itself is grad-cam's; this module only picks the class, builds the targets
and turns (S, S) maps into images.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from .errors import ConfigError, check_choice

CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")
SLOW_CAM_METHODS = frozenset({"scorecam"})
SLOW_CAM_MESSAGE = (
    "Score-CAM runs one extra forward pass per channel of the target layer (about 1,300 for "
    "efficientnet_lite0, 2,048 for ResNet-50): expect seconds to minutes per image on a CPU."
)

# 'jet', 'inferno', 'viridis', 'turbo', ... -> cv2.COLORMAP_*
COLORMAPS: dict[str, int] = {
    name[len("COLORMAP_"):].lower(): int(getattr(cv2, name)) for name in dir(cv2) if name.startswith("COLORMAP_")
}


def cam_class(method: str):
    """The grad-cam class implementing ``method`` (one of :data:`CAM_METHODS`)."""
    import pytorch_grad_cam as pgc

    classes = {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "hirescam": pgc.HiResCAM,
        "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM,
        "eigencam": pgc.EigenCAM,
        "scorecam": pgc.ScoreCAM,
    }
    key = check_cam_method(method)
    return classes[key]


def check_cam_method(method: str) -> str:
    return check_choice(method, CAM_METHODS, "CAM method")


def check_colormap(colormap: str) -> int:
    return COLORMAPS[check_choice(colormap, sorted(COLORMAPS), "colormap")]


# ---------------------------------------------------------------------------------------
# Targets. grad-cam calls ``target(output)`` with one sample's output (shape (num_outputs,)).
# ---------------------------------------------------------------------------------------

class LogitTarget:
    """``sign * logit`` of a single-logit (two-class) model.

    The positive class follows +logit, the other class -logit. Written here instead of using
    grad-cam's ``BinaryClassifierOutputTarget``, which returns the whole output tensor rather
    than a scalar (jacobgil/pytorch-grad-cam#428).
    """

    def __init__(self, sign: float):
        if sign not in (1, -1, 1.0, -1.0):
            raise ValueError("sign must be +1 or -1")
        self.sign = float(sign)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        logit = model_output[..., 0]
        return logit * self.sign

    def __repr__(self) -> str:
        return f"LogitTarget({'+' if self.sign > 0 else '-'}logit)"


def class_target(class_index: int, num_outputs: int, positive_index: int | None = None):
    """The grad-cam target for class ``class_index``.

    Single-logit models (``num_outputs == 1``): +logit for ``positive_index``, -logit for the
    other class. K outputs: grad-cam's ``ClassifierOutputTarget(class_index)``.
    """
    if num_outputs == 1:
        if positive_index is None:
            raise ValueError("a single-logit model needs positive_index")
        return LogitTarget(+1 if class_index == positive_index else -1)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return ClassifierOutputTarget(int(class_index))


class DeferredTarget:
    """A target for "the predicted class", decided from the model's own first output.

    This is what lets the predicted class be explained in the same forward pass that predicts
    it. Used as a context manager, it holds a forward hook on ``model`` that passes the first
    output seen inside the block (the prediction's forward) to ``decide(output_row) -> class
    index``; grad-cam then calls the target on that output before its backward. Later forwards
    (Score-CAM's masked inputs) reuse the decision; methods that never call their targets
    (Eigen-CAM) still get ``class_index`` set.
    """

    def __init__(self, model: nn.Module, decide, num_outputs: int, positive_index: int | None = None,
                 merge=None):
        """``merge``: maps the whole first output to the rows to decide from (the mean of an
        image's test-time views, when the batch holds them); None: the output as it is."""
        self._model = model
        self._decide = decide
        self._merge = merge
        self._num_outputs = num_outputs
        self._positive_index = positive_index
        self._handle = None
        self.class_index: int | None = None
        self._target = None

    def _hook(self, module, inputs, output):
        if self.class_index is None:
            out = (output[0] if isinstance(output, (tuple, list)) else output).detach()
            if self._merge is not None:
                out = self._merge(out)
            self.class_index = int(self._decide(out[0]))
            self._target = class_target(self.class_index, self._num_outputs, self._positive_index)
        return None

    def __enter__(self):
        self._handle = self._model.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        if self._target is None:
            raise RuntimeError("DeferredTarget called before the model's forward (use it as a context manager)")
        return self._target(model_output)


# ---------------------------------------------------------------------------------------
# Hooks, all as context managers.
# ---------------------------------------------------------------------------------------

class _HookSet:
    def __init__(self):
        self._handles: list = []

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._remove_hooks()
        return False


class InferenceView(nn.Module):
    """A model that is always in eval mode and has no parameter gradients, as grad-cam sees it.

    It runs the model's ``plain_forward`` where there is one, i.e. without the model's own
    test-time views: for a CAM of each view the caller passes the views as the batch (one CAM
    per view, ``merge_view_cams``), instead of the model averaging them out of sight.

    grad-cam walks the whole module tree twice a call: ``model.eval()`` when a CAM object is
    built and ``model.zero_grad()`` before each backward. For such a model both are no-ops, yet
    they cost about 3 ms an explanation (efficientnet_lite0, 2 cores; a bare forward is ~18 ms),
    so this view skips them. Putting it in training mode is an error, not a silent no-op.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.training or any(p.requires_grad for p in model.parameters()):
            raise ValueError("InferenceView needs a model in eval mode with requires_grad_(False)")
        self.inner = model
        self.training = False

    def forward(self, x):
        plain = getattr(self.inner, "plain_forward", None)
        return plain(x) if plain is not None else self.inner(x)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("an inference model cannot be put in training mode")
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


class GraphCut(_HookSet):
    """Start the autograd graph at ``layers``' outputs.

    A forward hook (registered with ``prepend=True``, so it runs before grad-cam's own hooks on
    the same layer) replaces each output by a detached float32 copy that requires grad. With
    no parameter requiring grad, nothing before the layer is recorded, and ``backward`` runs
    through the layers after it only: the cost of a CAM becomes one forward plus the backward
    of the model's tail. grad-cam's hooks see the replaced tensor, so activations and gradients
    are exactly those of the original layer output (float32 even under autocast, which
    grad-cam's OpenCV resizing needs).
    """

    def __init__(self, layers: Iterable[nn.Module]):
        super().__init__()
        self.layers = list(layers)

    @staticmethod
    def _hook(module, inputs, output):
        if not isinstance(output, torch.Tensor) or not torch.is_grad_enabled():
            return None
        return output.detach().float().requires_grad_(True)

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._hook, prepend=True))
        return self


def top_channels(activation: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` channels of a (C, h, w) activation with the highest mean, in that order, as a
    new contiguous (n, h, w) tensor: what an activation grid shows, ranked in one place for the
    recorder (inside the forward) and for ``activation_grid`` (given a whole activation)."""
    order = torch.argsort(activation.mean(dim=(1, 2)), descending=True)[:n]
    return activation.index_select(0, order)


class ActivationRecorder(_HookSet):
    """Record the outputs of ``root``'s sub-modules ``names`` (dotted paths) during a forward.

    Only the first forward inside the ``with`` block is kept (Score-CAM runs many more), as a
    detached copy, in ``outputs[name]``. With ``top=n`` only what an activation grid shows is
    copied: the ``n`` channels of the first image with the highest mean, in that order, as
    (n, h, w), and the layer's channel count goes to ``channels[name]`` (a copy of a few
    channels instead of the whole activation, inside every explained forward). An unknown name
    raises :class:`ConfigError`.
    """

    def __init__(self, root: nn.Module, names: Sequence[str], top: int | None = None):
        super().__init__()
        self.root = root
        self.names = list(names)
        self.modules = [resolve_layer(root, n) for n in self.names]
        self.top = top
        self.outputs: dict[str, torch.Tensor] = {}
        self.channels: dict[str, int] = {}

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if name in self.outputs:
                return None
            t = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(t, torch.Tensor):
                return None
            t = t.detach()
            if self.top is not None and t.dim() == 4:
                self.outputs[name] = top_channels(t[0], self.top)  # a copy: later in-place ops cannot touch it
                self.channels[name] = int(t.shape[1])
            else:
                self.outputs[name] = t.clone()
            return None

        return hook

    def __enter__(self):
        self.outputs, self.channels = {}, {}
        for name, module in zip(self.names, self.modules):
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self


def resolve_layer(root: nn.Module, name: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError as exc:
        raise ConfigError(f"the model has no layer {name!r}") from exc


def count_hooks(module: nn.Module) -> int:
    """Hooks registered on ``module`` and its sub-modules (for leak checks)."""
    n = 0
    for m in module.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            n += len(getattr(m, attr, {}) or {})
    return n


# ---------------------------------------------------------------------------------------
# Pure image functions.
# ---------------------------------------------------------------------------------------

def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size[:2]
    return int(h), int(w)


def merge_view_cams(cams: np.ndarray, tta: str) -> np.ndarray:
    """One image's (S, S) CAM from the CAMs of its test-time views (``models.tta_views`` order):
    each view's map is turned back onto the image, then averaged, as grad-cam's own
    ``aug_smooth`` does (so where the views disagree, the heat is lower)."""
    if tta == "hflip":
        if cams.shape[0] != 2:
            raise ValueError(f"hflip views need 2 CAMs, got {cams.shape[0]}")
        return (cams[0] + cams[1][:, ::-1]) / 2.0
    return cams[0]


def colorize(cam: np.ndarray, size, colormap: str = "jet") -> np.ndarray:
    """CAM in [0,1] (h, w) -> uint8 RGB (H, W, 3) colour map; ``size`` is (H, W) (an image's
    ``shape[:2]``) or an int for a square. Values outside [0, 1] are clipped."""
    table = _colour_table(colormap)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D, got shape {cam.shape}")
    h, w = _size_hw(size)
    # Negatives are clipped on the small map (bilinear interpolation of values >= 0 stays >= 0),
    # so at the original size, thousands of pixels a side for real X-rays, only two passes follow
    # the resize: round(x * 255) saturated to uint8, then one colour look-up straight to RGB.
    cam = np.maximum(cam, 0.0)
    resized = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR) if cam.shape != (h, w) else cam
    return cv2.applyColorMap(cv2.convertScaleAbs(resized, alpha=255.0), table)


def blend(image_uint8: np.ndarray, heatmap_uint8: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * heatmap``, both uint8 RGB of the same shape."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha (heat-map opacity) must be in [0, 1], got {alpha}")
    image = _as_rgb_uint8(image_uint8)
    if image.shape != heatmap_uint8.shape:
        raise ValueError(f"image {image.shape} and heat map {heatmap_uint8.shape} differ in shape")
    return cv2.addWeighted(image, 1.0 - alpha, heatmap_uint8, alpha, 0.0)


def overlay(image_uint8: np.ndarray, cam: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """The CAM resized to the image's own (H, W), colour-mapped and blended on it (uint8 RGB)."""
    image = _as_rgb_uint8(image_uint8)
    return blend(image, colorize(cam, image.shape[:2], colormap), alpha)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    return np.ascontiguousarray(image)


@functools.lru_cache(maxsize=16)
def _colour_table(colormap: str) -> np.ndarray:
    """An OpenCV colour map as a (256, 1, 3) user table in RGB order: one ``applyColorMap``
    colours every tile without a BGR->RGB pass."""
    ramp = np.arange(256, dtype=np.uint8)[:, None]
    return np.ascontiguousarray(cv2.cvtColor(cv2.applyColorMap(ramp, check_colormap(colormap)), cv2.COLOR_BGR2RGB))


_PAD, _HEADER = 2, 26


@functools.lru_cache(maxsize=64)
def _grid_canvas(label: str, n: int, th: int, tw: int) -> tuple[np.ndarray, int]:
    """The dark-grey canvas of an ``n``-tile grid with its title drawn, and its number of tile
    columns: the same for every image a model explains, so drawn once per layer."""
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    (text_w, _), _ = cv2.getTextSize(label, font, scale, 1)
    width = max(cols * (tw + _PAD) + _PAD, text_w + 8)
    canvas = np.full((_HEADER + rows * (th + _PAD) + _PAD, width, 3), 24, dtype=np.uint8)
    cv2.putText(canvas, label, (4, 18), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    canvas.setflags(write=False)
    return canvas, cols


def _nearest_index(src: int, dst: int) -> np.ndarray:
    # OpenCV's INTER_NEAREST rule, floor(x * src / dst), as cv2.resize computes it
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.intp), src - 1)


GRID_CHANNELS = 16  # tiles in an activation grid


def activation_grid(activation: torch.Tensor, layer_name: str, n_channels: int = GRID_CHANNELS, tile: int | None = None,
                    colormap: str = "viridis", channels: int | None = None) -> np.ndarray:
    """uint8 RGB grid of the ``n_channels`` most active channels (by mean activation) of a
    (C, h, w) activation, each min-max scaled on its own, under a title bar naming the layer.
    ``channels``: the layer's channel count, when ``activation`` holds only its top channels,
    already in order (``ActivationRecorder(top=...)``); they are then not ranked again.

    This runs for three layers on every explained image, so each step is one call over all
    tiles or a single-pass OpenCV call per tile (benchmarks/bench_inference.py, row e)."""
    a = activation.detach()
    if a.dim() == 4:
        a = a[0]
    if a.dim() != 3:
        raise ValueError(f"activation must be (C, h, w), got shape {tuple(a.shape)}")
    a = a.float().cpu()
    c, h, w = a.shape
    n = max(1, min(int(n_channels), c))
    if channels is None:
        maps = top_channels(a, n).numpy()  # (n, h, w), contiguous
    else:  # already the top channels, in order
        maps = a[:n].contiguous().numpy()
    lo, hi = maps.reshape(n, -1).min(1), maps.reshape(n, -1).max(1)
    u8 = np.empty((n, h, w), np.uint8)
    for k in range(n):  # x * 255/range - lo * 255/range, rounded and saturated in one pass
        scale = 255.0 / max(float(hi[k] - lo[k]), 1e-8)
        cv2.convertScaleAbs(maps[k], u8[k], scale, -float(lo[k]) * scale)
    if tile is None:
        tile = int(min(128, max(64, max(h, w))))
    th = tile
    tw = max(1, int(round(tile * w / h)))
    if (th, tw) != (h, w):
        if h < th:  # enlarge: nearest neighbour, by index
            u8 = u8[:, _nearest_index(h, th)][:, :, _nearest_index(w, tw)]
        else:  # shrink (maps over 128 px): area averaging
            u8 = np.stack([cv2.resize(m, (tw, th), interpolation=cv2.INTER_AREA) for m in u8])
    coloured = cv2.applyColorMap(np.ascontiguousarray(u8).reshape(n * th, tw), _colour_table(colormap))
    canvas, cols = _grid_canvas(f"{layer_name}  ({channels or c}x{h}x{w}, top {n} by mean)", n, th, tw)
    grid = canvas.copy()
    for k in range(n):
        r, col = divmod(k, cols)
        y0, x0 = _HEADER + _PAD + r * (th + _PAD), _PAD + col * (tw + _PAD)
        grid[y0:y0 + th, x0:x0 + tw] = coloured[k * th:(k + 1) * th]
    return grid
