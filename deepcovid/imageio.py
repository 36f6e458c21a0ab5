"""The one image loader used by training, inference, the CLI and the web app.

`load_image` turns a path, raw bytes, a PIL image or a numpy array into an `XRayImage`:
float32 pixels in [0, 1], shape (H, W, 3), with the source's full bit depth kept (16-bit PNG /
TIFF and DICOM are scaled by their real range, never squeezed through 8 bits first).
Every problem with the input is raised as `InvalidImageError` with a message meant for a person.

Formats: JPEG (EXIF orientation honoured), PNG 8/16 bit, BMP, TIFF 8/16 bit, WebP and DICOM
(by extension or by the 'DICM' preamble). DICOM policy:

* the modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) is applied, then the first
  VOI LUT or the first Window Center/Width (pydicom), and the result is scaled to [0, 1] by the
  output range of that LUT/window; without a VOI transform the data's own min/max is used;
* MONOCHROME1 is inverted so that bone is bright, as in MONOCHROME2;
* multi-frame files: only the first frame is decoded and used (a note says so);
* compressed transfer syntaxes need a pydicom decoder plugin; when none is installed the error
  names the packages to install.

Large images are reduced while loading: JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that is
enough (`Image.draft`), and everything is downscaled (INTER_AREA, aspect ratio kept) to a longest
side of at most ``max(max_side, target_size)`` *before* conversion to float.
Images with more than ``max_pixels`` source pixels are refused from their header, before decoding.
Pillow refuses on its own anything above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (~179 MP by default);
that limit is not raised by this module (it is process-global), so a larger ``max_pixels`` does
not lift it.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import BmpImagePlugin, MpoImagePlugin, PngImagePlugin, TiffImagePlugin  # noqa: F401
from PIL import WebPImagePlugin  # noqa: F401  (importing registers the plugins we open with)
from PIL.JpegImagePlugin import JpegImageFile

from deepcovid.errors import InvalidImageError

__all__ = [
    "MAX_PIXELS",
    "SUPPORTED_EXTENSIONS",
    "XRayImage",
    "is_supported",
    "load_image",
    "resize_square",
    "to_uint8",
]

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
PIL_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
SUPPORTED_EXTENSIONS: frozenset[str] = PIL_EXTENSIONS | DICOM_EXTENSIONS
MAX_PIXELS: int = 100_000_000

# Pillow plugins we let identify a file. Restricting them keeps exotic decoders (and formats we
# do not promise, e.g. GIF) out of reach. (Multi-picture camera JPEGs, 'MPO', open via JPEG.)
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "TIFF", "WEBP")
_SUPPORTED_TEXT = ", ".join(sorted(SUPPORTED_EXTENSIONS))
_EXIF_ORIENTATION = 0x0112


@dataclass
class XRayImage:
    """A decoded image.

    pixels: float32 (H, W, 3) in [0, 1]; grayscale replicated to 3 channels.
    original_size: (width, height) of the source as stored, before any downscale (for a JPEG
        with EXIF rotation these are the stored dimensions, so they may be swapped relative to
        ``pixels``).
    source_format: 'JPEG', 'PNG', 'BMP', 'TIFF', 'WEBP', 'DICOM', 'array', ... .
    bit_depth: bits per sample of the source (1, 8, 12, 16, 32, ...).
    notes: what the loader did beyond plain decoding (orientation, window, frames, ...).
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    source_format: str
    bit_depth: int
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of ``pixels``."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    def to_uint8_rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 copy for display and overlays."""
        return to_uint8(self.pixels)


# --------------------------------------------------------------------------------------------
# public helpers


def is_supported(path: str | os.PathLike) -> bool:
    """True for a supported extension, or for any other file that starts like DICOM
    ('DICM' at byte 128; DICOM files often have no or numeric extensions)."""
    p = Path(path)
    if p.suffix.lower() in SUPPORTED_EXTENSIONS:
        return True
    try:
        with open(p, "rb") as f:
            return _is_dicom_header(f.read(132))
    except OSError:
        return False


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8, rounded half up and saturated: one rule for the decoded
    cache, the inference input and the displayed image."""
    out = np.clip(pixels, 0.0, 1.0) * np.float32(255.0)
    out += np.float32(0.5)
    return out.astype(np.uint8)


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Squash the whole image to (size, size, C) float32 (no crop: an X-ray's edges matter).

    INTER_AREA when any side shrinks (anti-aliasing), INTER_LINEAR when only enlarging.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    pixels = np.asarray(pixels)
    if pixels.ndim not in (2, 3) or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {pixels.shape}")
    src = pixels.astype(np.float32, copy=False)
    h, w = src.shape[:2]
    if (h, w) == (size, size):
        return src.copy()
    interp = cv2.INTER_AREA if (size < h or size < w) else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(src), (int(size), int(size)), interpolation=interp)
    if src.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel axis
        out = out[:, :, None]
    return out


def load_image(
    source,
    *,
    target_size: int | None = None,
    max_side: int = 2048,
    max_pixels: int = MAX_PIXELS,
) -> XRayImage:
    """Load `source` (path, bytes, PIL image, numpy array or binary file object).

    target_size: the model's input size, a hint: JPEGs may then be decoded at reduced scale as
        long as both sides stay >= target_size.
    max_side: the result's longest side is at most ``max(max_side, target_size or 0)``.
    max_pixels: refuse sources with more pixels (width * height) than this, before decoding.

    Raises InvalidImageError for anything that is not a readable, supported image.
    """
    if target_size is not None and (isinstance(target_size, bool) or target_size < 1):
        raise ValueError(f"target_size must be a positive integer or None, got {target_size!r}")
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels!r}")
    opts = _Opts(limit=max(int(max_side), int(target_size or 0)), target_size=target_size,
                 max_pixels=int(max_pixels))

    if source is None:
        raise InvalidImageError("no image was given")
    if isinstance(source, np.ndarray):
        with _reading("the array"):
            return _load_array(source, opts)
    if isinstance(source, Image.Image):
        with _reading("the PIL image"):
            return _load_pil(source, "the PIL image", opts, owned=False, raw=None)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(source), "the uploaded data", opts)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), opts)
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "the file object"))
        with _reading(name):
            data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError(f"{name} must be opened in binary mode ('rb')")
        return _load_bytes(bytes(data), name, opts)
    raise InvalidImageError(
        f"cannot load an image from a {type(source).__name__}; expected a file path, bytes, "
        "a PIL image or a numpy array"
    )


# --------------------------------------------------------------------------------------------
# dispatch


@dataclass(frozen=True)
class _Opts:
    limit: int
    target_size: int | None
    max_pixels: int


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """The loader's contract is that only InvalidImageError escapes: decoders (Pillow, pydicom,
    zlib, libjpeg, ...) raise a zoo of exception types on malformed input."""
    try:
        yield
    except InvalidImageError:
        raise
    except MemoryError as e:
        raise InvalidImageError(f"not enough memory to decode {name}") from e
    except Exception as e:  # noqa: BLE001 - translated, see docstring
        raise InvalidImageError(
            f"cannot read {name}: the data is corrupt or not a supported image "
            f"({type(e).__name__}: {e})"
        ) from e


def _is_dicom_header(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _load_path(path: Path, opts: _Opts) -> XRayImage:
    name = str(path)
    try:
        if not path.exists():
            raise InvalidImageError(f"image file {name} does not exist")
        if path.is_dir():
            raise InvalidImageError(f"{name} is a directory, not an image file")
        if path.stat().st_size == 0:
            raise InvalidImageError(f"image file {name} is empty (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(132)
    except PermissionError as e:
        raise InvalidImageError(f"image file {name} cannot be read: permission denied") from e
    except OSError as e:
        raise InvalidImageError(f"image file {name} cannot be read: {e.strerror or e}") from e

    ext = path.suffix.lower()
    if _is_dicom_header(head) or ext in DICOM_EXTENSIONS:
        with _reading(name):
            return _load_dicom(path, name, opts)
    if ext not in PIL_EXTENSIONS:
        shown = f"'{path.suffix}'" if path.suffix else "(no extension, not DICOM)"
        raise InvalidImageError(
            f"unsupported format {shown} for {path.name}; supported: {_SUPPORTED_TEXT}"
        )
    return _load_pil_source(path, name, opts, raw=lambda: np.fromfile(path, dtype=np.uint8))


def _load_bytes(data: bytes, name: str, opts: _Opts) -> XRayImage:
    if not data:
        raise InvalidImageError(f"{name} is empty (0 bytes)")
    if _is_dicom_header(data[:132]):
        with _reading(name):
            return _load_dicom(io.BytesIO(data), name, opts)
    return _load_pil_source(io.BytesIO(data), name, opts,
                            raw=lambda: np.frombuffer(data, dtype=np.uint8))


# --------------------------------------------------------------------------------------------
# Pillow formats


def _load_pil_source(src, name: str, opts: _Opts, raw) -> XRayImage:
    with _reading(name):
        try:
            # We do our own, stricter size check right after open; Pillow's warning for
            # > MAX_IMAGE_PIXELS would only duplicate it.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # (a plugin Pillow was built without is simply not offered)
                im = Image.open(src, formats=[f for f in _PIL_FORMATS if f in Image.OPEN])
        except Image.DecompressionBombError as e:
            raise InvalidImageError(
                f"{name} is too large to decode safely (possible decompression bomb): {e}"
            ) from e
        except UnidentifiedImageError as e:
            raise InvalidImageError(
                f"cannot identify {name} as an image: it is not a valid JPEG, PNG, BMP, TIFF, "
                "WebP or DICOM file"
            ) from e
        with im:
            return _load_pil(im, name, opts, owned=True, raw=raw)


def _load_pil(im: Image.Image, name: str, opts: _Opts, *, owned: bool, raw) -> XRayImage:
    """`owned`: we opened `im` ourselves and may draft/seek it (never done to a caller's image).
    `raw`: callable giving the encoded bytes, for the OpenCV 16-bit colour path."""
    fmt = im.format or "PIL"
    w, h = im.size
    _check_size(w, h, opts.max_pixels, name)
    notes: list[str] = []

    n_frames = getattr(im, "n_frames", 1) or 1
    if n_frames > 1:
        if owned:
            im.seek(0)
        notes.append(f"used {'first' if owned else 'current'} of {n_frames} frames")

    if _is_16bit_colour(im):
        if raw is not None:
            arr = _decode_16bit_colour(raw(), name)
            notes.append("16-bit colour decoded with OpenCV (Pillow would reduce it to 8 bits)")
            return _finish(arr, 16, (w, h), fmt, notes, opts)
        notes.append("16-bit colour reduced to 8 bits by Pillow")

    if owned and isinstance(im, JpegImageFile):
        _draft_jpeg(im, opts, notes)
    try:
        im.load()
    except OSError as e:
        raise InvalidImageError(
            f"cannot decode {name}: the image data is truncated or corrupt ({e})"
        ) from e
    im = _exif_transpose(im, notes)
    arr, bit_depth = _pil_to_array(im, notes)
    return _finish(arr, bit_depth, (w, h), fmt, notes, opts)


def _check_size(w: int, h: int, max_pixels: int, name: str) -> None:
    if w <= 0 or h <= 0:
        raise InvalidImageError(f"{name} has zero width or height ({w}x{h})")
    if w * h > max_pixels:
        raise InvalidImageError(
            f"{name} is too large: {w}x{h} = {w * h:,} pixels exceeds the limit of "
            f"{max_pixels:,} (possible decompression bomb)"
        )


def _is_16bit_colour(im: Image.Image) -> bool:
    # Pillow has no 16-bit RGB mode: it decodes 'RGB;16' PNG/TIFF data to 8-bit RGB. The tile's
    # raw mode (before load) tells whether the file really holds 16-bit colour samples.
    if im.mode not in ("RGB", "RGBA") or not getattr(im, "tile", None):
        return False
    args = im.tile[0].args
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and ";16" in rawmode


def _decode_16bit_colour(data: np.ndarray, name: str) -> np.ndarray:
    # IMREAD_COLOR | IMREAD_ANYDEPTH: 3 channels (alpha dropped), 16 bits kept, EXIF applied.
    arr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if arr is None:
        raise InvalidImageError(f"cannot decode {name}: the image data is truncated or corrupt")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _draft_jpeg(im: JpegImageFile, opts: _Opts, notes: list[str]) -> None:
    # Ask libjpeg for the smallest DCT scale (1/2, 1/4, 1/8) that still leaves what we need:
    # both sides >= target_size when given, else a longest side >= the final limit.
    w, h = im.size
    if opts.target_size:
        req = (min(opts.target_size, w), min(opts.target_size, h))
    elif max(w, h) > opts.limit:
        s = opts.limit / max(w, h)
        req = (max(1, math.ceil(w * s)), max(1, math.ceil(h * s)))
    else:
        return
    if im.draft(im.mode, req) is not None and im.size != (w, h):
        notes.append(f"decoded JPEG at reduced scale {im.size[0]}x{im.size[1]}")


def _exif_transpose(im: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject a good image
        notes.append("ignored unreadable EXIF data")
        return im
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        im = ImageOps.exif_transpose(im)
        notes.append(f"applied EXIF orientation {orientation}")
    return im


def _pil_to_array(im: Image.Image, notes: list[str]) -> tuple[np.ndarray, int]:
    """Native-dtype array (H, W) or (H, W, 3) and the source bit depth."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im), 8
    if mode == "1":
        return np.asarray(im.convert("L")), 1
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False), 16  # also fixes big-endian
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            # Pillow (and callers) use 'I' for 16-bit grayscale too: keep the 16-bit scale.
            return arr.astype(np.uint16), 16
        return arr, 32
    if mode == "F":
        return np.asarray(im), 32
    if mode in ("LA", "La"):
        _note_alpha(np.asarray(im.getchannel("A")), notes)
        return np.asarray(im.getchannel("L")), 8
    if mode in ("RGBA", "RGBa", "RGBX"):
        rgba = np.asarray(im)
        if mode != "RGBX":
            _note_alpha(rgba[:, :, 3], notes)
        return rgba[:, :, :3], 8
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        rgb = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
        notes.append("converted palette image to RGB")
        if has_alpha:
            _note_alpha(rgb[:, :, 3], notes)
            rgb = rgb[:, :, :3]
        return rgb, 8
    # CMYK, YCbCr, LAB, HSV, ...: let Pillow convert.
    notes.append(f"converted {mode} to RGB")
    return np.asarray(im.convert("RGB")), 8


def _note_alpha(alpha: np.ndarray, notes: list[str]) -> None:
    # Alpha is dropped (colour kept as stored). Say so when it actually hid something.
    if alpha.size and int(alpha.min()) < 255:
        notes.append("dropped alpha channel (image had transparent pixels)")
    else:
        notes.append("dropped alpha channel")


# --------------------------------------------------------------------------------------------
# numpy arrays


def _load_array(arr: np.ndarray, opts: _Opts) -> XRayImage:
    name = "the array"
    shape = arr.shape
    if arr.ndim == 3 and shape[2] in (1, 3, 4):
        pass
    elif arr.ndim != 2:
        raise InvalidImageError(
            f"unsupported array shape {shape}: expected (H, W), (H, W, 1), (H, W, 3) or "
            "(H, W, 4), channels last"
        )
    if arr.dtype.kind not in "biuf":
        raise InvalidImageError(
            f"unsupported array dtype {arr.dtype}: expected bool, integer or float pixels"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise InvalidImageError(f"{name} has zero width or height (shape {shape})")
    h, w = shape[:2]
    _check_size(w, h, opts.max_pixels, name)
    notes: list[str] = []
    if arr.ndim == 3 and shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and shape[2] == 4:
        _note_alpha_any(arr[:, :, 3], notes)
        arr = arr[:, :, :3]
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidImageError(f"{name} contains NaN or infinite values")
    if arr.dtype == np.bool_:
        arr, bits = arr.astype(np.uint8) * np.uint8(255), 1
    else:
        bits = arr.dtype.itemsize * 8
    return _finish(arr, bits, (w, h), "array", notes, opts)


def _note_alpha_any(alpha: np.ndarray, notes: list[str]) -> None:
    if alpha.dtype == np.uint8:
        _note_alpha(alpha, notes)
    else:
        notes.append("dropped alpha channel")


# --------------------------------------------------------------------------------------------
# common tail: downscale in the native dtype, then scale to float32 [0, 1], 3 channels


def _downscale(arr: np.ndarray, limit: int, notes: list[str]) -> np.ndarray:
    h, w = arr.shape[:2]
    if max(h, w) <= limit:
        return arr
    s = limit / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    # cv2.resize works on these dtypes; others go through float64 (exact for <= 32-bit ints).
    native = arr.dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64)
    src = np.ascontiguousarray(arr if native else arr.astype(np.float64))
    out = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
    if not native:
        out = np.rint(out).astype(arr.dtype) if arr.dtype.kind in "iu" else out.astype(arr.dtype)
    notes.append(f"downscaled from {w}x{h} to {size[0]}x{size[1]}")
    return out


def _to_unit_float(arr: np.ndarray, notes: list[str]) -> np.ndarray:
    """float32 in [0, 1]: uint8 / 255, uint16 / 65535; floats already in [0, 1] are kept;
    anything else (other floats, signed or 32/64-bit integers) is min-max scaled."""
    if arr.dtype == np.uint8:
        return np.multiply(arr, np.float32(1 / 255), dtype=np.float32)
    if arr.dtype == np.uint16:
        return np.multiply(arr, np.float32(1 / 65535), dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return arr.astype(np.float32, copy=False)
    notes.append(f"scaled by data min/max ({lo:g}..{hi:g})")
    return _minmax(arr, lo, hi)


def _minmax(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = arr.astype(np.float32)
    if hi <= lo:  # constant image: no contrast to stretch
        out[...] = 0.0
        return out
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _to_rgb(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return np.repeat(x[:, :, None], 3, axis=2)
    return np.ascontiguousarray(x)


def _finish(arr, bit_depth, original_size, fmt, notes, opts: _Opts) -> XRayImage:
    arr = _downscale(arr, opts.limit, notes)
    pixels = _to_rgb(_to_unit_float(arr, notes))
    return XRayImage(pixels=pixels, original_size=(int(original_size[0]), int(original_size[1])),
                     source_format=fmt, bit_depth=int(bit_depth), notes=notes)


# --------------------------------------------------------------------------------------------
# DICOM


def _load_dicom(src, name: str, opts: _Opts) -> XRayImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import (apply_color_lut, apply_modality_lut, apply_voi,
                                apply_windowing, get_decoder, pixel_array)

    try:
        ds = pydicom.dcmread(src, force=False)
    except InvalidDicomError as e:
        # pydicom's advice "Use force=True" is for programmers, not for the person reading this.
        detail = str(e).split(" Use force=True")[0]
        raise InvalidImageError(f"{name} is not a valid DICOM file: {detail}") from e
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InvalidImageError(
            f"DICOM file {name} has no pixel data (it may be a report or other non-image object)"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(cols, rows, opts.max_pixels, name)
    notes: list[str] = []

    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None:
        raise InvalidImageError(f"DICOM file {name} does not declare its transfer syntax")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise InvalidImageError(
            f"DICOM file {name} uses transfer syntax {ts} ({ts.name}), which pydicom cannot decode"
        ) from e
    if ts.is_compressed and not decoder.is_available:
        raise InvalidImageError(
            f"DICOM file {name} is compressed ({ts.name}) and no decoder for it is installed. "
            f"Install one of: {_install_hint(decoder.missing_dependencies)}"
        )

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        arr = pixel_array(ds, index=0)  # decodes only the first frame
    except (RuntimeError, NotImplementedError) as e:
        hint = _install_hint(decoder.missing_dependencies) if ts.is_compressed else ""
        raise InvalidImageError(
            f"cannot decode the pixel data of DICOM file {name} ({ts.name}): it is corrupt or "
            "needs another decoder" + (f" (try installing one of: {hint})" if hint else "")
            + f". Details: {e}"
        ) from e
    if frames > 1:
        notes.append(f"used first of {frames} frames")

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    arr = _downscale(arr, opts.limit, notes)

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        pixels = _dicom_grayscale(arr, ds, notes, apply_modality_lut, apply_voi, apply_windowing)
        if photometric == "MONOCHROME1":
            pixels = np.subtract(np.float32(1.0), pixels, dtype=np.float32)
            notes.append("inverted MONOCHROME1 so that bone is bright")
        pixels = _to_rgb(pixels)
    elif photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        notes.append("applied palette colour LUT")
        pixels = _to_rgb(_to_unit_float(rgb, notes))
    elif arr.ndim == 3 and arr.shape[2] == 3:  # RGB, or YBR_* converted to RGB by pydicom
        if arr.dtype.kind in "iu":
            hi = float(2 ** bits_stored - 1)
            pixels = _minmax(arr, 0.0, hi)
        else:
            pixels = _to_unit_float(arr, notes)
    else:
        raise InvalidImageError(
            f"DICOM file {name} has an unsupported photometric interpretation '{photometric}'"
        )
    return XRayImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32),
                     original_size=(cols, rows), source_format="DICOM",
                     bit_depth=bits_stored, notes=notes)


def _dicom_grayscale(arr, ds, notes, apply_modality_lut, apply_voi, apply_windowing):
    """Modality LUT, then VOI LUT or window, scaled to [0, 1] by that transform's output range.

    pydicom returns windowed values in the output range of the stored data (e.g. 0..4095), not
    in [0, 1], and a VOI LUT returns its table entries; so the range is found by pushing the
    extreme inputs through the same pydicom function rather than re-deriving its rules here.
    """
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        notes.append(f"applied modality rescale (slope {ds.get('RescaleSlope', 1)}, "
                     f"intercept {ds.get('RescaleIntercept', 0)})")
    elif ds.get("ModalityLUTSequence"):
        notes.append("applied modality LUT")
    arr = apply_modality_lut(arr, ds)

    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        n_entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
        lut_out = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds, index=0)
        lo, hi = float(lut_out.min()), float(lut_out.max())
        out = apply_voi(arr, ds, index=0)
        notes.append("applied VOI LUT")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        with np.errstate(over="ignore"):  # SIGMOID at +-1e300 overflows exp() to its limits
            lo, hi = (float(v) for v in apply_windowing(np.array([-1e300, 1e300]), ds, index=0))
        out = apply_windowing(arr, ds, index=0)
        wc, ww = ds["WindowCenter"], ds["WindowWidth"]
        c = wc.value[0] if wc.VM > 1 else wc.value
        w = ww.value[0] if ww.VM > 1 else ww.value
        notes.append(f"applied VOI window (center {c}, width {w})")
    else:
        out = arr
        lo, hi = float(arr.min()), float(arr.max())
        notes.append("no VOI window in file; scaled by pixel min/max")
    return _minmax(out, lo, hi)


def _install_hint(missing: list[str]) -> str:
    # pydicom lists plugin requirements like "pylibjpeg - requires pylibjpeg>=2.0 and
    # pylibjpeg-libjpeg>=2.1"; turn them into pip commands (version pins dropped: '>=' would be
    # a shell redirect when pasted), and gdcm's pip name is python-gdcm, which nobody guesses.
    hints = []
    for item in missing:
        reqs = item.split("requires", 1)[-1].split(" and ")
        names = [re.split(r"[<>=!~ ]", r.strip(), maxsplit=1)[0] for r in reqs]
        names = ["python-gdcm" if n == "gdcm" else n for n in names if n and n != "numpy"]
        if names:
            hints.append(f"`pip install {' '.join(names)}`")
    return " or ".join(hints) if hints else "a pydicom pixel data plugin (pylibjpeg, python-gdcm)"
