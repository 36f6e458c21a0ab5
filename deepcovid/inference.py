"""Predictions and explanations from a checkpoint.

``Predictor.from_checkpoint(...)`` rebuilds the model from a self-describing checkpoint and
takes every preprocessing constant (input size, mean, std, colour space) from its metadata.
``predict`` is the fast path (``torch.inference_mode``, no hooks). ``explain`` returns the same
prediction plus a CAM, a heat map and an overlay at the original image's size, and optionally
activation maps - all from ONE forward and ONE backward:

* the probabilities are read from the forward grad-cam runs (``cam.outputs``);
* the class to explain is decided from that same output (``cam.DeferredTarget``);
* activation maps are captured by forward hooks during that forward (``ActivationRecorder``);
* no parameter requires grad, and ``cam.GraphCut`` makes the target layer's output a leaf
  that requires grad, so the autograd graph only spans the model's tail (target layer ->
  head) and the backward is tiny.

Hooks are only ever registered inside ``with`` blocks, and every model call runs under one
lock, so concurrent ``predict``/``explain`` calls from several threads never see each other's
hooks or gradients.

Speed options (``Predictor(..., precision=..., backend=...)``, CLI ``--precision``/``--backend``;
the rewrites below are composed by ``serving.serve``):

* the model and its inputs are always ``channels_last`` on CPU and CUDA (oneDNN's fast layout;
  the same numbers as NCHW to float rounding);
* every BatchNorm is folded into the convolution before it (``bnfold``; ``fold_bn=False`` keeps
  them), except where the CAM and activation layers read, so their maps are the checkpoint's;
  predictions and explanations both run the folded model (the same numbers to float rounding);
* timm's TensorFlow 'same' convolutions (the Lite models') become plain convolutions for the
  checkpoint's input size, without their padding copy (``samepad``; ``unpad_same=False`` keeps
  them; the same outputs);
* on a CPU, in float32 with the eager backend, every convolution's weight is packed once into
  oneDNN's blocked layout, as ``torch.compile`` with freezing does, instead of being reordered
  on every call (``prepack``; ``prepack=False`` keeps them as they are; the same outputs);
* ``precision``: ``"auto"`` (default) and ``"fp32"``: float32 on every device, on CUDA with
  TF32 off, so a GPU gives the CPU's probabilities (``auto`` autocast on CUDA until 2026-11-26:
  on an H100 its probabilities were 0.022 from the CPU's, TF32 float32's 1.3e-3); ``"bf16"``
  (``torch.autocast`` to bfloat16 for ``predict``, CPU or CUDA; probabilities within ~1e-2 of
  fp32). ``explain`` always runs in float32: bfloat16 backbone features moved the normalised
  Grad-CAM too much (correlation with the fp32 CAM down to ~0.56 on real X-rays);
* ``backend``: ``"eager"`` (default), ``"compile"`` (``torch.compile`` with inductor freezing,
  compiled once at construction: tens of seconds, needs a C++ compiler) or ``"onnx"`` (the eval
  model exported to ONNX and run by an onnxruntime CPU session; fp32 and CPU only). Backends
  only change ``predict``/``predict_batch``/``predict_tensor``: ``explain`` needs hooks and
  autograd and always runs the eager model.

See ``benchmarks/bench_inference.py`` for the measured speed and agreement of each variant.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import cam as camlib
from .cam import CAM_METHODS, SLOW_CAM_MESSAGE, SLOW_CAM_METHODS  # noqa: F401  (re-exported)
from .device import PRECISIONS, available_threads, resolve_device  # noqa: F401  (re-exported)
from .errors import ConfigError, check_choice
from .serving import ieee_float32, serve  # noqa: F401  (ieee_float32 re-exported)

__all__ = [
    "CAM_METHODS", "SLOW_CAM_METHODS", "SLOW_CAM_MESSAGE", "Prediction", "Explanation", "Predictor",
    "PreparedImage", "available_threads", "resolve_device", "PRECISIONS", "BACKENDS", "check_precision",
    "check_backend",
]

BACKENDS = ("eager", "compile", "onnx")


@dataclass
class Prediction:
    probabilities: dict[str, float]   # every class, sums to 1
    label: str                        # at the stored threshold (2 classes) / argmax (K classes)
    threshold: float | None           # stored threshold (None for K > 2)
    positive_class: str | None
    checkpoint: dict                  # {"arch", "run", "val_f1", "path"}
    notes: list[str]                  # image loader notes

    @property
    def probability(self) -> float:
        """The positive class's probability (2 classes), else the top probability."""
        if self.positive_class is not None and self.positive_class in self.probabilities:
            return float(self.probabilities[self.positive_class])
        return float(max(self.probabilities.values()))

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in ("probabilities", "label", "threshold", "positive_class",
                                              "checkpoint", "notes")}


@dataclass
class Explanation(Prediction):
    cam: np.ndarray            # float32 (S, S) in [0, 1], model input resolution
    heatmap: np.ndarray        # uint8 RGB (H, W, 3), the CAM colour-mapped at the original image's size
    overlay: np.ndarray        # uint8 RGB (H, W, 3), heat map blended on the original image
    cam_method: str
    target_class: str
    activations: list[tuple[str, np.ndarray]]  # (layer name, uint8 RGB grid); [] when not asked


@dataclass
class PreparedImage:
    """A decoded image and the model input made from it."""

    image: Any                 # imageio.XRayImage
    tensor: torch.Tensor       # (1, 3, S, S) float32, normalised, on the CPU

    @property
    def notes(self) -> list[str]:
        return list(getattr(self.image, "notes", None) or [])


def check_precision(precision: str) -> str:
    return check_choice(precision, PRECISIONS, "precision")


def check_backend(backend: str) -> str:
    return check_choice(backend, BACKENDS, "backend")


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32)."""
    if precision in ("fp32", "auto"):
        return None
    # bf16
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    raise ConfigError(f"precision 'bf16' is not supported on device {device}; use precision 'auto' or 'fp32'")


class Predictor:
    """A model plus its checkpoint metadata, ready to predict and explain single images."""

    def __init__(self, model: torch.nn.Module, meta: dict, *, device: str | torch.device = "auto",
                 path: str | os.PathLike | None = None, num_threads: int | None = None,
                 cam_layers: Sequence[str] | None = None, precision: str = "auto", backend: str = "eager",
                 channels_last: bool | None = None, fold_bn: bool = True, unpad_same: bool = True,
                 prepack: bool = True, fuse_act: bool = True):
        """``cam_layers``: dotted backbone layer names to explain (default: the registry's).
        ``precision``: one of :data:`PRECISIONS`; ``backend``: one of :data:`BACKENDS` (see the
        module docstring). ``channels_last``: None (default) = on for CPU and CUDA; False keeps
        NCHW (the benchmark's baseline). ``fold_bn``: fold BatchNorm into the convolutions
        (default; ``False`` serves the checkpoint's BatchNorm layers as they are, the benchmark's
        baseline). ``unpad_same``: TensorFlow 'same' convolutions as plain ones for the
        checkpoint's input size (``samepad``; the same outputs, no padding copy; default).
        ``prepack``: on a CPU, in float32 with the eager backend, each convolution's weight packed
        once into oneDNN's layout (``prepack``; the same outputs; default). ``fuse_act``: with
        packed weights, each ReLU/ReLU6 that follows a packed convolution applied by that
        convolution (``prepack.fuse_activations``; the same outputs; default).
        The model is changed in place."""
        from .models import get_spec

        self.precision = check_precision(precision)
        self.backend = check_backend(backend)

        self.meta = dict(meta)
        self.classes: list[str] = list(meta["classes"])
        if len(self.classes) < 2:
            raise ConfigError("a checkpoint needs at least two classes")
        self.arch: str = meta["arch"]
        # An ensemble carries its own spec (its members' CAM and activation layers).
        self.spec = getattr(model, "spec", None) if self.arch == "ensemble" else get_spec(self.arch)
        self.input_size: int = int(meta["input_size"])
        self.mean = tuple(float(v) for v in meta["mean"])
        self.std = tuple(float(v) for v in meta["std"])
        self.color_space: str = meta.get("color_space", "rgb") or "rgb"
        from .transforms import check_clahe

        self.clahe = check_clahe(meta.get("clahe"))  # absent in checkpoints from before it existed
        self.num_outputs = 1 if len(self.classes) == 2 else len(self.classes)
        if len(self.classes) == 2:
            pos = meta.get("positive_class") or self.classes[-1]
            if pos not in self.classes:
                raise ConfigError(f"positive_class {pos!r} is not one of {self.classes}")
            self.positive_class: str | None = pos
            self.positive_index: int | None = self.classes.index(pos)
            t = meta.get("threshold")
            self.threshold: float | None = 0.5 if t is None else float(t)
        else:
            self.positive_class = None
            self.positive_index = None
            self.threshold = None
        vm = meta.get("val_metrics") or {}
        self.path = str(path) if path is not None else None
        self.identity = {
            "arch": self.arch,
            "run": meta.get("run") or (Path(self.path).parent.name if self.path else None),
            "val_f1": None if vm.get("f1") is None else float(vm["f1"]),
            "path": self.path,
        }

        self.device = resolve_device(device)
        self.amp_dtype = _amp_dtype(self.precision, self.device)
        # Explanations are float32 whatever the precision: bfloat16 features change the Grad-CAM
        # far more than the probabilities (CAM correlation down to ~0.56 vs fp32 on real X-rays,
        # see benchmarks/bench_inference.py). The benchmark sets this to measure exactly that.
        self.explain_amp_dtype = None
        if self.backend == "onnx" and (self.device.type != "cpu" or self.amp_dtype is not None):
            raise ConfigError("backend 'onnx' runs float32 on the CPU only; use device 'cpu' with precision "
                              "'auto' or 'fp32', or another backend")
        if self.device.type == "cpu":
            free = available_threads()
            torch.set_num_threads(max(1, min(int(num_threads or free), free)))
        model = model.eval()
        model.requires_grad_(False)  # inference never needs parameter gradients (see GraphCut)
        self.cam_layer_names: tuple[str, ...] = tuple(cam_layers or self.spec.cam_layers)
        self.activation_layer_names: tuple[str, ...] = tuple(self.spec.activation_layers)
        self.fold_bn = bool(fold_bn)
        # channels_last: oneDNN's (and cuDNN's) fast layout; same numbers as NCHW.
        self.channels_last = self.device.type in ("cpu", "cuda") if channels_last is None else bool(channels_last)
        # packed weights serve float32 eager calls only (on a CPU: ``serve`` checks the device)
        serves_packed = self.backend == "eager" and self.amp_dtype is None
        model, report = serve(model, self._rewrite_example(model), self.device, keep=self._kept_layers,
                              fold_bn=self.fold_bn, unpad_same=unpad_same, channels_last=self.channels_last,
                              prepack=prepack and serves_packed, fuse_act=fuse_act)
        self.fold_report = report.fold
        self.unpadded: list[str] = report.unpadded
        self.prepacked: list[str] = report.prepacked
        self.fused_acts: list[tuple[str, str]] = report.fused
        # after every rewrite: a folded convolution may since have been swapped (samepad, prepack)
        self._folded_convs = {id(model.get_submodule(c)) for c, _ in (self.fold_report.pairs if self.fold_bn else ())}
        self.model = model
        self._lock = threading.RLock()
        self._cam_layers = [camlib.resolve_layer(self.model.backbone, n) for n in self.cam_layer_names]
        self._cam_view = camlib.InferenceView(self.model)
        # The checkpoint's test-time augmentation: the model applies it in predictions; explanations
        # pass the views to grad-cam as a batch (see _run_cam).
        self.tta: str = getattr(model, "tta", "none")
        self._compiled = None
        self._onnx = None
        if self.backend == "compile":
            self._build_compiled()
        elif self.backend == "onnx":
            self._build_onnx()

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, spec: str | os.PathLike = "best", checkpoints_dir: str | os.PathLike = "checkpoints",
                        device: str | torch.device = "auto", num_threads: int | None = None,
                        cam_layers: Sequence[str] | None = None, precision: str = "auto",
                        backend: str = "eager", channels_last: bool | None = None,
                        fold_bn: bool = True, unpad_same: bool = True, prepack: bool = True,
                        fuse_act: bool = True) -> "Predictor":
        """``spec``: a .safetensors file, a run folder, or 'best' (highest val F1 under ``checkpoints_dir``).
        ``precision`` (:data:`PRECISIONS`) and ``backend`` (:data:`BACKENDS`): see the module docstring."""
        from .checkpoint import load_checkpoint

        check_precision(precision)  # bad flags fail before the checkpoint is read
        check_backend(backend)
        loaded = load_checkpoint(spec, checkpoints_dir)
        model = loaded.build_model()
        return cls(model, loaded.meta, device=device, path=loaded.path, num_threads=num_threads,
                   cam_layers=cam_layers, precision=precision, backend=backend, channels_last=channels_last,
                   fold_bn=fold_bn, unpad_same=unpad_same, prepack=prepack, fuse_act=fuse_act)

    def _kept_layers(self, model: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
        """The layers Grad-CAM and the activation maps read, whose outputs the rewrites keep."""
        return tuple(camlib.resolve_layer(model.backbone, n) for n in (*self.cam_layer_names, *self.activation_layer_names))

    def _rewrite_example(self, model: torch.nn.Module) -> torch.Tensor:
        """The input the serving rewrites check themselves on: seeded noise at the checkpoint's
        size, on the model's device (not zeros, under which a wrong padding would not show)."""
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(1, 3, self.input_size, self.input_size, generator=gen)
        return example.to(next(model.parameters()).device)

    # --- fast predict backends --------------------------------------------------------------
    def _example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, 3, self.input_size, self.input_size)

    def _build_compiled(self) -> None:
        """``torch.compile`` (inductor, weights frozen into the graph), compiled now on a dummy
        batch so that a missing compiler fails here, not on the first image."""
        try:
            self._compiled = torch.compile(self.model, options={"freezing": True})
            self.predict_tensor(self._example_input())
        except Exception as exc:
            self._compiled = None
            raise ConfigError(f"backend 'compile' failed ({type(exc).__name__}: {str(exc).strip()[:300]}); "
                              "use backend 'eager' or 'onnx'") from exc

    def _build_onnx(self) -> None:
        """Export the eval model (fp32, dynamic batch) to ONNX in memory; one onnxruntime CPU session."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ConfigError("backend 'onnx' needs the onnxruntime package (pip install onnxruntime onnx); "
                              "or use backend 'eager'") from exc
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(self.model, (self._example_input(),), buf, dynamo=False,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        except Exception as exc:
            raise ConfigError(f"backend 'onnx': exporting {self.arch} failed ({type(exc).__name__}: "
                              f"{str(exc).strip()[:300]}); use backend 'eager'") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._onnx = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    # --- preprocessing --------------------------------------------------------------------
    def prepare(self, image) -> PreparedImage:
        """Decode ``image`` (anything ``imageio.load_image`` accepts, or an ``XRayImage``) and
        build the normalised model input from the checkpoint's own preprocessing config."""
        from . import imageio

        xray_cls = getattr(imageio, "XRayImage", None)
        xi = image if (xray_cls is not None and isinstance(image, xray_cls)) else imageio.load_image(image)
        return PreparedImage(xi, self._to_tensor(xi.pixels))

    def _to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        from . import imageio
        from .transforms import normalize

        sq = imageio.resize_square(pixels, self.input_size)
        if self.clahe:  # on the uint8 pixels training equalised (data.decode_for_training)
            from .transforms import equalize_clahe

            x = torch.from_numpy(equalize_clahe(imageio.to_uint8(sq), self.clahe))
        else:
            x = torch.from_numpy(np.ascontiguousarray(sq, dtype=np.float32))
        x = x.permute(2, 0, 1)
        return normalize(x, self.mean, self.std, self.color_space).unsqueeze(0).contiguous()

    def preprocess(self, image) -> torch.Tensor:
        """(1, 3, S, S) float32 model input for ``image``."""
        return self.prepare(image).tensor

    # --- helpers ----------------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return x.to(self.device, non_blocking=self.device.type == "cuda", memory_format=torch.channels_last)
        return x.to(self.device)

    def _autocast(self, explain: bool = False):
        """Autocast for ``predict`` (``amp_dtype``), or for ``explain`` (``explain_amp_dtype``);
        without one, IEEE float32 (see ``ieee_float32``)."""
        dtype = self.explain_amp_dtype if explain else self.amp_dtype
        if dtype is not None:
            return torch.autocast(self.device.type, dtype=dtype)
        return ieee_float32(self.device)

    def _probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """(B, num_outputs) logits -> (B, K) probabilities in ``classes`` order."""
        logits = logits.detach().to("cpu", torch.float64)  # float64: probabilities sum to 1 exactly
        if self.num_outputs == 1:
            p = torch.sigmoid(logits[:, 0])
            probs = torch.empty(logits.shape[0], 2, dtype=torch.float64)
            probs[:, self.positive_index] = p
            probs[:, 1 - self.positive_index] = 1.0 - p
        else:
            probs = torch.softmax(logits, dim=1)
        return probs.numpy()

    def _decide(self, probs_row: np.ndarray) -> int:
        if self.num_outputs == 1:
            return self.positive_index if probs_row[self.positive_index] >= self.threshold else 1 - self.positive_index
        return int(np.argmax(probs_row))

    def _decide_from_output(self, output_row: torch.Tensor) -> int:
        return self._decide(self._probabilities(output_row.reshape(1, -1))[0])

    def _prediction(self, probs_row: np.ndarray, notes: list[str]) -> Prediction:
        probabilities = {c: float(p) for c, p in zip(self.classes, probs_row)}
        return Prediction(
            probabilities=probabilities,
            label=self.classes[self._decide(probs_row)],
            threshold=self.threshold,
            positive_class=self.positive_class,
            checkpoint=dict(self.identity),
            notes=list(notes),
        )

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise ConfigError(f"unknown class {name!r}; this checkpoint's classes are: {', '.join(self.classes)}")
        return self.classes.index(name)

    # --- the fast path ----------------------------------------------------------------------
    def predict_tensor(self, x: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) inputs -> (B, K) probabilities, in inference mode (on ``backend``)."""
        with self._lock:
            if self._onnx is not None:
                xn = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
                logits = torch.from_numpy(self._onnx.run(None, {"input": xn})[0])
            else:
                model = self._compiled if self._compiled is not None else self.model
                with torch.inference_mode(), self._autocast():
                    logits = model(self._to_device(x))
        return self._probabilities(logits)

    def predict(self, image) -> Prediction:
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image)
        probs = self.predict_tensor(prepared.tensor)
        return self._prediction(probs[0], prepared.notes)

    def predict_batch(self, images: Sequence, batch_size: int = 16) -> list[Prediction]:
        """Predictions for several images, ``batch_size`` per forward."""
        prepared = [im if isinstance(im, PreparedImage) else self.prepare(im) for im in images]
        out: list[Prediction] = []
        for i in range(0, len(prepared), max(1, int(batch_size))):
            chunk = prepared[i:i + batch_size]
            probs = self.predict_tensor(torch.cat([p.tensor for p in chunk], dim=0))
            out.extend(self._prediction(row, p.notes) for row, p in zip(probs, chunk))
        return out

    # --- explanations ------------------------------------------------------------------------
    def _activation_names(self, activations) -> list[str]:
        if activations is False or activations is None:
            return []
        if activations is True:
            return list(self.activation_layer_names)
        if isinstance(activations, str):
            names = [activations]
        else:
            names = [str(n) for n in activations]
        for n in names:
            camlib.resolve_layer(self.model.backbone, n)
        return names

    def explain(self, image, *, cam_method: str = "gradcam", target_class: str | None = None,
                alpha: float = 0.5, colormap: str = "jet", activations=False) -> Explanation:
        """Prediction + CAM + heat map/overlay at the original size (+ activation grids).

        ``target_class``: a class name, or None for the predicted class. ``activations``: False,
        True (the backbone's registered activation layers) or a list of layer names.
        """
        method = camlib.check_cam_method(cam_method)
        camlib.check_colormap(colormap)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"alpha (heat-map opacity) must be in [0, 1], got {alpha}")
        target_index = None if target_class is None else self.class_index(target_class)
        act_names = self._activation_names(activations)
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image)

        cam_map, logits, chosen, recorded, channels = self._run_cam(prepared.tensor, method, target_index, act_names)

        probs = self._probabilities(logits)[0]
        pred = self._prediction(probs, prepared.notes)
        original = prepared.image.to_uint8_rgb()
        heat = camlib.colorize(cam_map, original.shape[:2], colormap)
        over = camlib.blend(original, heat, alpha)
        grids = self._activation_grids(recorded, channels, act_names)
        return Explanation(
            **pred.to_dict(),
            cam=cam_map,
            heatmap=heat,
            overlay=over,
            cam_method=method,
            target_class=self.classes[chosen],
            activations=grids,
        )

    def _activation_grids(self, recorded: dict, channels: dict, names: list[str]) -> list[tuple[str, np.ndarray]]:
        # Drawn one after the other: in worker threads, the grids' few torch ops each start an
        # OpenMP team whose spinning threads slowed the model's own forward passes 1.7x (measured
        # with benchmarks/bench_inference.py on this 2-core machine).
        return [(n, camlib.activation_grid(recorded[n], self._layer_label(n), channels=channels.get(n)))
                for n in names if n in recorded]

    def _layer_label(self, name: str) -> str:
        """A layer's title on its grid; a convolution whose BatchNorm was folded into it now
        outputs the normalised map, and one with its activation fused the activated map: each
        says so."""
        layer = camlib.resolve_layer(self.model.backbone, name)
        added = ["+BatchNorm, folded"] if id(layer) in self._folded_convs else []
        act = getattr(layer, "fused_act", None)  # a PackedConv2d knows what it applies
        if act is not None:
            added.append(f"+{type(act).__name__}, fused")
        return f"{name} ({'; '.join(added)})" if added else name

    def _run_cam(self, x: torch.Tensor, method: str, target_index: int | None, act_names: list[str]):
        """One forward + one backward, under the lock: (cam (S,S), logits (1,K'), class index,
        activations (each layer's top grid channels), each layer's channel count).

        With test-time augmentation the image's views go through grad-cam as one batch (the
        model's plain forward, see ``InferenceView``), each view explained for the class their
        mean decides; the logits are that mean, exactly as ``predict`` computes it, the CAM the
        mean of the views' CAMs turned back onto the image, the activation maps the image's own."""
        from .models import merge_tta, tta_views

        cam_cls = camlib.cam_class(method)
        merge = functools.partial(merge_tta, tta=self.tta, num_outputs=self.num_outputs)
        if target_index is None:
            target = camlib.DeferredTarget(self._cam_view, self._decide_from_output, self.num_outputs,
                                           self.positive_index, merge=merge)
        else:
            target = camlib.class_target(target_index, self.num_outputs, self.positive_index)
        with self._lock, torch.inference_mode(False), torch.enable_grad(), self._autocast(explain=True):
            xd = tta_views(self._to_device(x), self.tta)
            with contextlib.ExitStack() as stack:
                if isinstance(target, camlib.DeferredTarget):
                    stack.enter_context(target)
                stack.enter_context(camlib.GraphCut(self._cam_layers))
                recorder = stack.enter_context(camlib.ActivationRecorder(self.model.backbone, act_names,
                                                                         top=camlib.GRID_CHANNELS))
                cam = stack.enter_context(cam_cls(model=self._cam_view, target_layers=self._cam_layers))
                try:
                    grayscale = cam(input_tensor=xd, targets=[target] * xd.shape[0])
                except IndexError as exc:
                    # grad-cam's __exit__ swallows IndexError; re-raise as something it lets through.
                    raise RuntimeError(f"{method} failed: {exc}") from exc
                logits = merge(cam.outputs.detach().float()).cpu()
                cam.outputs = None  # drop the retained graph now
            recorded = {k: v.float().cpu() for k, v in recorder.outputs.items()}
            channels = dict(recorder.channels)
        chosen = target_index if target_index is not None else target.class_index
        cam_map = np.ascontiguousarray(camlib.merge_view_cams(grayscale, self.tta), dtype=np.float32)
        return np.clip(cam_map, 0.0, 1.0), logits, int(chosen), recorded, channels
