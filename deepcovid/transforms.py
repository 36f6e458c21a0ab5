"""Tensor-side preprocessing shared by training and inference.

Images reach this module already decoded and resized to the model's square input (see
``imageio.resize_square``), as uint8 or float tensors of shape (3, S, S). Training applies the
paper's Table 1 augmentations with torchvision transforms v2 on those tensors (torchvision
draws every random parameter; for uint8 images the resampling and the grey-level maps run in
OpenCV, the same pixels but for rounding ties, in a quarter of the time); evaluation and
inference only convert the colour space and normalise, deterministically.
"""

from __future__ import annotations

import math
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
    # Random erasing (Zhong et al., AAAI 2020; timm's --reprob): with this probability one random
    # rectangle, 2-33 % of the image with aspect 0.3-3.3, becomes black, as the affine's fill.
    # Not in the paper; off by default.
    erase: float = 0.0
    # One more Gaussian blur (max sigma, probability) for negative-class training images only
    # (label 0: NORMAL), before the others. Not in the paper; off by default. Aimed at the
    # sharpness cue: train/'s normals are far sharper than its pneumonias, and test/'s normals
    # that get called pneumonia are its blurriest (README, Results, "Sharpness").
    neg_blur: float = 0.0
    neg_blur_p: float = 0.0
    # A zoom in (scale drawn in [1, 1 + neg_zoom], about the centre) for negative-class training
    # images only, with probability neg_zoom_p, before the others. Not in the paper; off by
    # default. Aimed at the framing cue: zooming in on a normal raises the preset's p(pneumonia)
    # (test/'s normals at 1.3x: 57 % called pneumonia against 10 % as they are), and the
    # test/ normals called pneumonia are tightly framed. Measured at 0.3 / 0.5 over three seeds:
    # validation F1 up, test/ specificity down by 20 points (README, Results, "Framing").
    neg_zoom: float = 0.0
    neg_zoom_p: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown augmentation(s) {sorted(unknown)}; known: {sorted(names)}")
        # checked here, not by torchvision's ValueError once training has started
        for name in ("erase", "blur_p", "neg_blur_p", "neg_zoom_p"):
            if name in d and not 0 <= d[name] <= 1:
                raise ConfigError(f"augmentation {name} is a probability in [0, 1], got {d[name]!r}")
        if "neg_blur" in d and not d["neg_blur"] >= 0:
            raise ConfigError(f"augmentation neg_blur is a maximum sigma in pixels (0: off), got {d['neg_blur']!r}")
        if "neg_zoom" in d and not d["neg_zoom"] >= 0:
            raise ConfigError(f"augmentation neg_zoom is how far past 1 the zoom in goes (0: off), got {d['neg_zoom']!r}")
        return cls(**d)

    @property
    def neg_blur_on(self) -> bool:
        return self.neg_blur > 0 and self.neg_blur_p > 0

    @property
    def neg_zoom_on(self) -> bool:
        return self.neg_zoom > 0 and self.neg_zoom_p > 0

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


def check_clahe(clip_limit) -> float:
    """The CLAHE clip limit as a float: 0 is off, else a positive number (OpenCV's units)."""
    try:
        c = float(clip_limit or 0.0)
    except (TypeError, ValueError):
        c = math.nan
    if not math.isfinite(c) or c < 0:
        raise ConfigError(f"clahe (--clahe, the CLAHE clip limit) must be 0 (off) or a positive number, got {clip_limit!r}")
    return c


CLAHE_TILES = 8  # tiles per side of the contrast-limited equalisation grid (OpenCV's default)


def equalize_clahe(image: np.ndarray, clip_limit: float) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a uint8 (S, S, 3) image,
    plane by plane (a grey image once, repeated), at the model's input size; 0 returns it as is.

    Part of a model's preprocessing when its checkpoint says so (``clahe`` in the metadata):
    training applies it to the decoded cache and inference to the resized image, the same
    function on the same uint8 pixels. Meant to even out exposure and contrast between X-ray
    sources (the train/test shift of the shared data set); measured under README, Results."""
    if not clip_limit:
        return image
    import cv2

    # A new CLAHE object per call: OpenCV's keeps working buffers between calls, and the decoded
    # cache is filled from several threads (one shared object corrupted 866 of 4,694 images in a
    # first, throwaway try).
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(CLAHE_TILES, CLAHE_TILES))
    if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]):
        return np.repeat(op.apply(np.ascontiguousarray(image[..., 0]))[..., None], 3, axis=2)
    return np.stack([op.apply(np.ascontiguousarray(image[..., c])) for c in range(image.shape[2])], axis=2)


def normalize(x: torch.Tensor, mean, std, color_space: str = "rgb") -> torch.Tensor:
    """uint8 or [0,1] float (..., 3, H, W) -> the model's normalised float input."""
    if color_space not in COLOR_SPACES:
        raise ConfigError(f"color_space must be one of {COLOR_SPACES}, got {color_space!r}")
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    if color_space == "hsv":
        x = rgb_to_hsv(x.float().div_(255.0) if x.dtype == torch.uint8 else x.float())
        return (x - m) / s
    # (x / 255 - m) / s as one scale and one shift, in place on the one new float tensor: this
    # runs for every training image and every batch, and three passes with two temporaries
    # cost twice as much
    scale = 1.0 / (s * 255.0) if x.dtype == torch.uint8 else 1.0 / s
    out = x.float().mul_(scale) if x.dtype == torch.uint8 else x.float().mul(scale)  # never write on the caller's
    return out.sub_(m / s)


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
        # plane by plane on the (C, H, W) memory: the same blur as on (H, W, C), without the two
        # transposing copies around it
        src = x.contiguous().numpy()
        out = np.empty_like(src)
        for k in range(src.shape[0]):
            cv2.GaussianBlur(src[k], (0, 0), sigma, dst=out[k])
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(sigma_max={self.sigma_max}, p={self.p})"


class RandomAffineUint8(v2.RandomAffine):
    """``v2.RandomAffine`` (nearest, zero fill, about the centre) whose kernel for plain uint8
    (C, H, W) tensors is OpenCV's ``warpAffine``; torchvision still draws the parameters.

    torchvision resamples a uint8 tensor by converting it to float, building a float grid and
    running ``grid_sample`` with an extra mask channel for the fill: about 1 ms per 224 px image
    on this CPU, the largest share of the training pipeline's per-image cost
    (benchmarks/bench_training.py, pipeline components). ``warpAffine`` with the same inverse
    matrix, moved from torchvision's centred coordinates to pixel indices, samples the same
    pixels in a sixth of that: only a coordinate within OpenCV's fixed-point step (1/1024 px) of
    a rounding tie can pick the neighbouring pixel, about 2e-5 of the pixels of the preset's
    augmentation (tests/test_data.py compares the two). The matrix is torchvision's own (a
    private helper: the test against ``v2.RandomAffine`` catches a change there)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # torchvision keeps the mode as given or as its string value
        self._cv2_ok = (self.interpolation in ("nearest", v2.InterpolationMode.NEAREST) and self.center is None
                        and self.fill in (0, None))

    def transform(self, inpt, params):
        if not (self._cv2_ok and type(inpt) is torch.Tensor and inpt.dtype == torch.uint8 and inpt.dim() == 3):
            return super().transform(inpt, params)
        import cv2
        from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

        c, h, w = inpt.shape
        m = _get_inverse_affine_matrix([0.0, 0.0], params["angle"], [float(t) for t in params["translate"]],
                                       params["scale"], list(params["shear"]))
        # torchvision: input = M @ (output - (w-1)/2, output - (h-1)/2) + ((w-1)/2, (h-1)/2), in pixels
        cx, cy = (w - 1) * 0.5, (h - 1) * 0.5
        inv = np.array([[m[0], m[1], m[2] + cx - m[0] * cx - m[1] * cy],
                        [m[3], m[4], m[5] + cy - m[3] * cx - m[4] * cy]], dtype=np.float64)
        src = inpt.contiguous().numpy()
        out = np.empty_like(src)
        for k in range(c):
            cv2.warpAffine(src[k], inv, (w, h), dst=out[k], flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return torch.from_numpy(out)


def _is_gray(x: torch.Tensor) -> bool:
    return bool(torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))


class GrayAwareColorJitter:
    """``v2.ColorJitter`` that skips saturation and hue on grayscale images.

    Saturation and hue are identities on an image whose three channels are equal (almost every
    X-ray), but torchvision still pays an RGB->HSV->RGB round trip (about 12 ms per image).
    On a grey uint8 image, brightness and contrast are maps of the grey level alone: both are
    applied as one 256-entry table (``cv2.LUT``), built by torchvision's own kernels on the 256
    levels, with the contrast's mean taken as torchvision takes it (its grayscale of the image,
    floored, averaged by ``torch.mean``). Same pixels as ``v2.ColorJitter`` with the same draws
    (tests/test_data.py), in about 0.25 ms instead of 0.6 ms per 224 px image.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.full = v2.ColorJitter(brightness or None, contrast or None, saturation or None, hue or None)
        self.gray = v2.ColorJitter(brightness or None, contrast or None) if (brightness or contrast) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        one_plane = x.dim() == 3 and x.shape[0] == 1 and x.dtype == torch.uint8  # a grey image's plane
        if not one_plane and not _is_gray(x):
            return self.full(x)
        if self.gray is None:
            return x
        if x.dtype != torch.uint8 or x.dim() != 3:
            return self.gray(x)
        return self._gray_uint8(x, self.gray.make_params([x]))

    @staticmethod
    def _gray_uint8(x: torch.Tensor, params: dict) -> torch.Tensor:
        import cv2
        from torchvision.transforms.v2 import functional as F

        levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256)
        table = levels.expand(3, 1, 256)  # the grey levels as a 3-channel "image" for torchvision's kernels
        plane = x[0].contiguous().numpy()
        for fn_id in params["fn_idx"].tolist():
            if fn_id == 0 and params["brightness_factor"] is not None:
                table = F.adjust_brightness(table, params["brightness_factor"])
            elif fn_id == 1 and params["contrast_factor"] is not None:
                # torchvision's mean: its grayscale (0.2989 R + 0.587 G + 0.114 B, floored) of
                # the current image, by ``torch.mean``; on a grey image a map of the level
                gray_of_level = np.ascontiguousarray(F.rgb_to_grayscale(table.float()).floor_().view(256).numpy())
                mean = torch.mean(torch.from_numpy(cv2.LUT(plane, gray_of_level))[None], dim=(-3, -2, -1), keepdim=True)
                factor = float(params["contrast_factor"])
                table = table.mul(factor).add_(mean.view(1, 1, 1), alpha=1.0 - factor).clamp_(0, 255).to(torch.uint8)
        lut = np.ascontiguousarray(table[0, 0].numpy())
        out = cv2.LUT(plane, lut)
        return torch.from_numpy(out)[None].expand(x.shape[0], -1, -1).contiguous()

    def __repr__(self) -> str:
        return f"GrayAware{self.full!r}"


class GrayPlaneCompose(v2.Compose):
    """``v2.Compose`` that runs a grey uint8 image (three equal planes: almost every X-ray) as
    its one plane and repeats the result: the same pixels as the three-plane run, since every
    augmentation here treats planes alike (flips, the affine and the blur plane by plane, the
    jitter as a table of the grey level), for a third of the resampling and blurring."""

    def forward(self, *inputs):
        x = inputs[0] if len(inputs) == 1 else None
        if (type(x) is torch.Tensor and x.dtype == torch.uint8 and x.dim() == 3 and x.shape[0] == 3
                and _is_gray(x)):
            return super().forward(x[:1]).expand(3, -1, -1).contiguous()
        return super().forward(*inputs)


ERASE_SCALE = (0.02, 0.33)  # share of the image a random erasing covers (torchvision's defaults)
ERASE_RATIO = (0.3, 3.3)    # its aspect ratio, drawn log-uniformly


def build_negative_augment(cfg: AugmentConfig):
    """The extra augmentation of negative-class (label 0) training images (``neg_zoom``, then
    ``neg_blur``), or None."""
    ops: list = []
    if cfg.neg_zoom_on:
        ops.append(v2.RandomApply([RandomAffineUint8(degrees=0, scale=(1.0, 1.0 + cfg.neg_zoom))], p=cfg.neg_zoom_p))
    if cfg.neg_blur_on:
        ops.append(RandomGaussianBlur(cfg.neg_blur, cfg.neg_blur_p))
    return None if not ops else ops[0] if len(ops) == 1 else v2.Compose(ops)


def build_augment(cfg: AugmentConfig, input_size: int) -> v2.Transform:
    """The paper's Table 1 augmentations on uint8 (3, S, S) tensors; returns uint8."""
    ops: list = []
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ops.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.rotation > 0 or cfg.shift > 0 or cfg.zoom > 0:
        frac = min(cfg.shift / float(input_size), 1.0)
        ops.append(RandomAffineUint8(degrees=cfg.rotation, translate=(frac, frac) if cfg.shift > 0 else None,
                                        scale=(1.0 - cfg.zoom, 1.0 + cfg.zoom) if cfg.zoom > 0 else None))
    if cfg.blur > 0 and cfg.blur_p > 0:
        ops.append(RandomGaussianBlur(cfg.blur, cfg.blur_p))
    if any(getattr(cfg, n) > 0 for n in ("brightness", "contrast", "saturation", "hue")):
        ops.append(GrayAwareColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if cfg.erase > 0:
        ops.append(v2.RandomErasing(p=cfg.erase, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0))
    return GrayPlaneCompose(ops) if ops else v2.Identity()  # Compose refuses an empty list


class BatchAugment:
    """``build_augment``'s augmentations for a whole uint8 (B, 3, S, S) batch where it lives
    (the GPU), with parameters drawn per image: flips, rotation, shift and zoom as one affine
    resampling (nearest, zero fill, as ``v2.RandomAffine``), then the Gaussian blur (reflected
    border, as OpenCV's), then brightness and contrast in a random order per batch (as
    ``v2.ColorJitter`` draws it per call). Returns float in [0, 1], as ``normalize`` takes it.

    Written here because torchvision's v2 transforms draw one set of parameters per call, i.e.
    one for the whole batch, and a batch-wide augmentation is a different (weaker) recipe; Kornia
    would do it but is one more dependency for a few tensor ops. Saturation and hue change only
    colour images (X-rays are grey, where they are identities); those rare images go through
    ``v2.ColorJitter`` one at a time, so they keep torchvision's definition.
    """

    def __init__(self, cfg: AugmentConfig, input_size: int):
        self.cfg, self.size = cfg, int(input_size)
        # Brightness and contrast run batched below; only saturation and hue are left for this.
        self.colour = (v2.ColorJitter(saturation=cfg.saturation or None, hue=cfg.hue or None)
                       if (cfg.saturation or cfg.hue) else None)

    def _uniform(self, n: int, lo: float, hi: float, device) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(lo, hi)

    def _geometry(self, x: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """``negatives`` (B,) bool: the label-0 rows, which ``neg_zoom`` may zoom in on too (one
        resampling: its scale multiplies ``zoom``'s)."""
        import torch.nn.functional as F

        c, b, dev = self.cfg, x.shape[0], x.device
        neg_zoom = negatives is not None and c.neg_zoom_on
        if not (c.hflip or c.vflip or c.rotation or c.shift or c.zoom or neg_zoom):
            return x
        one = torch.ones(b, device=dev)
        fx = torch.where(torch.rand(b, device=dev) < c.hflip, -one, one)
        fy = torch.where(torch.rand(b, device=dev) < c.vflip, -one, one)
        ang = torch.deg2rad(self._uniform(b, -c.rotation, c.rotation, dev))
        scale = self._uniform(b, 1 - c.zoom, 1 + c.zoom, dev) if c.zoom else one
        if neg_zoom:
            on = (torch.rand(b, device=dev) < c.neg_zoom_p) & negatives
            scale = scale * torch.where(on, self._uniform(b, 1.0, 1.0 + c.neg_zoom, dev), one)
        frac = min(c.shift / float(self.size), 1.0)
        # Whole-pixel shifts, as RandomAffine rounds them; in affine_grid's [-1, 1] units.
        t = (self._uniform(2 * b, -frac * self.size, frac * self.size, dev).round() * (2.0 / self.size)).view(2, b)
        # affine_grid maps each output pixel back to where it samples the input: the inverse of
        # "rotate and scale about the centre, then shift", followed by the flips (applied first).
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (B, 2, 2)
        shift = -(inv @ t.T.unsqueeze(-1)).squeeze(-1)                                 # (B, 2)
        flip = torch.stack([fx, fy], 1).unsqueeze(-1)
        theta = torch.cat([inv * flip, (shift * flip.squeeze(-1)).unsqueeze(-1)], 2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def _blur(self, x: torch.Tensor, sigma_max: float | None = None, p: float | None = None,
              only: torch.Tensor | None = None) -> torch.Tensor:
        """The Gaussian blur (``blur``, ``blur_p`` unless given), on the rows ``only`` marks."""
        import torch.nn.functional as F

        c, (b, ch, h, w), dev = self.cfg, x.shape, x.device
        sigma_max = c.blur if sigma_max is None else sigma_max
        p = c.blur_p if p is None else p
        if not (sigma_max > 0 and p > 0):
            return x
        on = torch.rand(b, device=dev) < p
        if only is not None:
            on &= only
        sigma = self._uniform(b, 0.1, sigma_max, dev)
        r = max(1, int(math.ceil(3 * sigma_max)))  # OpenCV's uint8 kernel spans about +-3 sigma
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=dev, dtype=x.dtype)[None] / sigma[:, None]) ** 2)
        k = k / k.sum(1, keepdim=True)
        delta = torch.zeros_like(k)
        delta[:, r] = 1
        k = torch.where(on[:, None], k, delta).repeat_interleave(ch, 0)  # one kernel per image and channel
        y = F.pad(x.reshape(1, b * ch, h, w), (r, r, r, r), mode="reflect")  # OpenCV's BORDER_REFLECT_101
        y = F.conv2d(y, k.view(b * ch, 1, 1, -1), groups=b * ch)
        y = F.conv2d(y, k.view(b * ch, 1, -1, 1), groups=b * ch)
        return y.view(b, ch, h, w)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        c, b, dev = self.cfg, x.shape[0], x.device
        gray = (x[:, 0] == x[:, 1]).flatten(1).all(1) & (x[:, 1] == x[:, 2]).flatten(1).all(1)
        ops = []
        if c.brightness:
            ops.append("b")
        if c.contrast:
            ops.append("c")
        for i in torch.randperm(len(ops)).tolist():
            if ops[i] == "b":
                f = self._uniform(b, max(0.0, 1 - c.brightness), 1 + c.brightness, dev).view(b, 1, 1, 1)
                x = (x * f).clamp_(0, 255)
            else:
                f = self._uniform(b, max(0.0, 1 - c.contrast), 1 + c.contrast, dev).view(b, 1, 1, 1)
                lum = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean((1, 2)).view(b, 1, 1, 1)
                x = (f * x + (1 - f) * lum).clamp_(0, 255)
        if self.colour is not None and not bool(gray.all()):
            x = x.clone()
            for i in torch.nonzero(~gray).flatten().tolist():
                x[i] = self.colour(x[i] / 255.0) * 255.0
        return x

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels`` (B,) are needed only for ``neg_blur`` and ``neg_zoom``, which act on the
        label-0 images only."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"BatchAugment takes (B, 3, S, S) batches, got {tuple(x.shape)}")
        x = x.float()
        c = self.cfg
        negatives = None
        if c.neg_blur_on or c.neg_zoom_on:
            if labels is None:
                raise ValueError("BatchAugment with neg_blur or neg_zoom needs the batch's labels")
            negatives = labels.to(x.device) == 0
        if c.neg_blur_on:
            x = self._blur(x, c.neg_blur, c.neg_blur_p, only=negatives)
        # [0, 1] float: what ``normalize`` takes (it divides only uint8 by 255)
        return self._erase(self._jitter(self._blur(self._geometry(x, negatives)))).div_(255.0)

    def _erase(self, x: torch.Tensor) -> torch.Tensor:
        # ``v2.RandomErasing``'s draw, per image: area and log-aspect uniform, the rectangle
        # uniform where it fits. torchvision redraws up to ten times when it does not fit; here
        # its sides are clipped to the image instead, which a redraw would rarely need at these
        # scales (a side longer than the image needs an aspect beyond 3 and a large area).
        c, (b, _, h, w), dev = self.cfg, x.shape, x.device
        if not c.erase > 0:
            return x
        on = torch.rand(b, device=dev) < c.erase
        area = self._uniform(b, *ERASE_SCALE, dev) * (h * w)
        ratio = torch.exp(self._uniform(b, math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), dev))
        eh = torch.sqrt(area * ratio).round().clamp_(1, h)
        ew = torch.sqrt(area / ratio).round().clamp_(1, w)
        top = (torch.rand(b, device=dev) * (h - eh + 1)).floor()
        left = (torch.rand(b, device=dev) * (w - ew + 1)).floor()
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        box = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
               & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)) & on.view(b, 1, 1))
        return x.masked_fill(box.unsqueeze(1), 0.0)

    def __repr__(self) -> str:
        return f"BatchAugment({self.cfg})"
