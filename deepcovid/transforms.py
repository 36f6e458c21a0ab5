"""Tensor-side preprocessing shared by training and inference.

Images reach this module already decoded and resized to the model's square input (see
``imageio.resize_square``), as uint8 or float tensors of shape (3, S, S). Training applies the
paper's Table 1 augmentations with torchvision transforms v2 on those tensors; evaluation and
inference only convert the colour space and normalise, deterministically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torchvision.transforms import v2

from .errors import ConfigError

COLOR_SPACES = ("rgb", "hsv")


@dataclass
class AugmentConfig:
    """The paper's Table 1 augmentations. Each is off when its value is 0 / False."""

    rotation: float = 20.0          # degrees, +-
    hflip: float = 0.5              # probability
    vflip: float = 0.5              # probability
    shift: int = 12                 # pixels, horizontal and vertical
    zoom: float = 0.0               # scale in [1 - zoom, 1 + zoom] (not in the paper; off by default)
    blur: float = 2.0               # max Gaussian sigma, pixels
    blur_p: float = 0.5             # probability of blurring at all
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown augmentation(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def off(cls) -> "AugmentConfig":
        return cls(**{f.name: 0 for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float RGB in [0,1] -> HSV in [0,1].

    Written here because torchvision only has the private ``_rgb2hsv``; the maths is the
    standard hexcone model, vectorised.
    """
    r, g, b = x.unbind(dim=-3)
    maxc, _ = x.max(dim=-3)
    minc, _ = x.min(dim=-3)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    dz = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / dz, (maxc - g) / dz, (maxc - b) / dz
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, v), dim=-3)


def normalize(x: torch.Tensor, mean, std, color_space: str = "rgb") -> torch.Tensor:
    """uint8 or [0,1] float (..., 3, H, W) -> the model's normalised float input."""
    if color_space not in COLOR_SPACES:
        raise ConfigError(f"color_space must be one of {COLOR_SPACES}, got {color_space!r}")
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    if color_space == "hsv":
        x = rgb_to_hsv(x)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


class RandomGaussianBlur:
    """Gaussian blur with a random sigma in (0.1, sigma_max], applied with probability ``p``.

    OpenCV instead of ``v2.GaussianBlur``: torchvision convolves uint8 images as float with a
    full 2-D kernel (about 40 ms for a 224 px image at sigma 2 on this CPU); cv2's separable
    uint8 blur takes well under 1 ms, and blur is one of the paper's per-image augmentations.
    """

    def __init__(self, sigma_max: float, p: float):
        self.sigma_max, self.p = float(sigma_max), float(p)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import cv2

        if torch.rand(()) >= self.p:
            return x
        sigma = float(torch.empty(()).uniform_(0.1, self.sigma_max))
        hwc = np.ascontiguousarray(x.permute(1, 2, 0).numpy())
        return torch.from_numpy(cv2.GaussianBlur(hwc, (0, 0), sigma)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(sigma_max={self.sigma_max}, p={self.p})"


class GrayAwareColorJitter:
    """``v2.ColorJitter`` that skips saturation and hue on grayscale images.

    Saturation and hue are identities on an image whose three channels are equal (almost every
    X-ray), but torchvision still pays an RGB->HSV->RGB round trip (about 12 ms per image).
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.full = v2.ColorJitter(brightness or None, contrast or None, saturation or None, hue or None)
        self.gray = v2.ColorJitter(brightness or None, contrast or None) if (brightness or contrast) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]):
            return self.gray(x) if self.gray is not None else x
        return self.full(x)

    def __repr__(self) -> str:
        return f"GrayAware{self.full!r}"


def build_augment(cfg: AugmentConfig, input_size: int) -> v2.Transform:
    """The paper's Table 1 augmentations on uint8 (3, S, S) tensors; returns uint8."""
    ops: list = []
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ops.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.rotation > 0 or cfg.shift > 0 or cfg.zoom > 0:
        frac = min(cfg.shift / float(input_size), 1.0)
        ops.append(v2.RandomAffine(degrees=cfg.rotation, translate=(frac, frac) if cfg.shift > 0 else None,
                                   scale=(1.0 - cfg.zoom, 1.0 + cfg.zoom) if cfg.zoom > 0 else None))
    if cfg.blur > 0 and cfg.blur_p > 0:
        ops.append(RandomGaussianBlur(cfg.blur, cfg.blur_p))
    if any(getattr(cfg, n) > 0 for n in ("brightness", "contrast", "saturation", "hue")):
        ops.append(GrayAwareColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    return v2.Compose(ops) if ops else v2.Identity()  # Compose refuses an empty list
