"""Tests for deepcovid.imageio: every format, DICOM windowing, bad input, large images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from deepcovid.errors import InvalidImageError  # noqa: E402
from deepcovid.imageio import (  # noqa: E402
    MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    XRayImage,
    is_supported,
    load_image,
    resize_square,
)

REAL_DATA = Path("/work/shared/data/chest_xray/train")


# ------------------------------------------------------------------------------------------
# helpers


def gradient8(h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth 2-D gradient, uint8, covering 0..255."""
    y, x = np.mgrid[0:h, 0:w]
    return np.round(255 * (0.7 * x / (w - 1) + 0.3 * y / (h - 1))).astype(np.uint8)


def gradient16(h: int = 256, w: int = 256) -> np.ndarray:
    """Ramp over 0..65535 (every 16-bit value exactly once for 256x256)."""
    ramp = np.arange(h * w, dtype=np.float64) * (65535 / (h * w - 1))
    return ramp.round().astype(np.uint16).reshape(h, w)


def rgb3(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, :, None], 3, axis=2)


def check_pixels(img: XRayImage, h: int, w: int) -> None:
    assert isinstance(img, XRayImage)
    assert img.pixels.shape == (h, w, 3)
    assert img.pixels.dtype == np.float32
    assert float(img.pixels.min()) >= 0.0
    assert float(img.pixels.max()) <= 1.0


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_huge_bilevel_png(path: Path, side: int) -> None:
    """A complete, valid 1-bit PNG of side x side pixels; all-zero rows compress to ~100 KB."""
    block = bytes(1 + (side + 7) // 8) * 1000
    comp = zlib.compressobj(6)
    idat = b"".join([comp.compress(block) for _ in range(side // 1000)] + [comp.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))


def make_dicom(path: Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
               bits_stored: int = 12, frames: int | None = None,
               window: tuple[float, float] | None = None,
               rescale: tuple[float, float] | None = None,
               transfer_syntax=ExplicitVRLittleEndian, pixel_bytes: bytes | None = None,
               rows_cols: tuple[int, int] | None = None) -> Path:
    """An uncompressed DICOM file (or one with `pixel_bytes` as its raw PixelData)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "TEST"
    if pixels is not None or pixel_bytes is not None:
        if pixels is not None:
            shape = pixels.shape[1:] if frames else pixels.shape
            rows, cols = shape[:2]
            samples = shape[2] if len(shape) == 3 else 1
        else:
            (rows, cols), samples = rows_cols or (8, 8), 1
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = photometric
        if samples == 3:
            ds.PlanarConfiguration = 0
        bits_alloc = 8 if (pixels is not None and pixels.dtype == np.uint8) else 16
        ds.BitsAllocated = bits_alloc
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        if frames:
            ds.NumberOfFrames = frames
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        if rescale:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
            ds.RescaleType = "US"
        if pixel_bytes is not None:
            ds.PixelData = pixel_bytes
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
            ds["PixelData"].VR = "OB" if bits_alloc == 8 else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------
# format round-trips


def _save(fmt: str, path: Path) -> tuple[Path, np.ndarray, float, float]:
    """Write a known image in `fmt`; return (path, expected float RGB, max tol, mean tol)."""
    g = gradient8()
    exp = rgb3(g.astype(np.float32) / 255)
    if fmt == "jpeg":
        Image.fromarray(g).save(path := path / "a.jpg", quality=95)
        return path, exp, 0.04, 0.01
    if fmt == "png8":
        Image.fromarray(g).save(path := path / "a.png")
        return path, exp, 1e-6, 1e-7
    if fmt == "png16":
        g16 = gradient16(48, 64)
        Image.fromarray(g16).save(path := path / "a.png")
        return path, rgb3(g16.astype(np.float32) / 65535), 1e-6, 1e-7
    if fmt == "png_rgb":
        rgb = np.stack([g, 255 - g, np.full_like(g, 77)], axis=2)
        Image.fromarray(rgb).save(path := path / "a.png")
        return path, rgb.astype(np.float32) / 255, 1e-6, 1e-7
    if fmt == "png_rgba":
        rgb = np.stack([g, 255 - g, np.full_like(g, 77)], axis=2)
        alpha = np.full_like(g, 255)
        alpha[:10] = 0  # transparent rows keep their stored colour (alpha is dropped)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path := path / "a.png")
        return path, rgb.astype(np.float32) / 255, 1e-6, 1e-7
    if fmt == "png_la":
        Image.fromarray(np.dstack([g, np.full_like(g, 128)]), "LA").save(path := path / "a.png")
        return path, exp, 1e-6, 1e-7
    if fmt == "png_palette":
        # palette entry i = grey (255 - i): decoding must go through the palette
        idx = (255 - g).astype(np.uint8)
        im = Image.fromarray(idx, "P")
        im.putpalette([v for i in range(256) for v in (255 - i,) * 3])
        im.save(path := path / "a.png")
        return path, exp, 1e-6, 1e-7
    if fmt == "png_1bit":
        b = g > 127
        Image.fromarray(b).save(path := path / "a.png")
        return path, rgb3(b.astype(np.float32)), 1e-6, 1e-7
    if fmt == "bmp":
        Image.fromarray(np.stack([g, g // 2, 255 - g], axis=2)).save(path := path / "a.bmp")
        return path, np.stack([g, g // 2, 255 - g], axis=2).astype(np.float32) / 255, 1e-6, 1e-7
    if fmt == "tiff8":
        Image.fromarray(g).save(path := path / "a.tif")
        return path, exp, 1e-6, 1e-7
    if fmt == "tiff16":
        g16 = gradient16(48, 64)
        Image.fromarray(g16).save(path := path / "a.tiff", compression="tiff_lzw")
        return path, rgb3(g16.astype(np.float32) / 65535), 1e-6, 1e-7
    if fmt == "webp":
        Image.fromarray(g).save(path := path / "a.webp", quality=95)
        return path, exp, 0.06, 0.015
    if fmt == "webp_lossless":
        Image.fromarray(g).save(path := path / "a.webp", lossless=True)
        return path, exp, 1e-6, 1e-7
    if fmt in ("png16_rgb", "tiff16_rgb"):
        g16 = gradient16(48, 64)
        rgb = np.stack([g16, 65535 - g16, np.full_like(g16, 1234)], axis=2)
        path = path / ("a.png" if fmt == "png16_rgb" else "a.tif")
        assert cv2.imwrite(str(path), rgb[:, :, ::-1])  # OpenCV writes BGR order
        return path, rgb.astype(np.float32) / 65535, 1e-6, 1e-7
    raise AssertionError(fmt)


FORMATS = ["jpeg", "png8", "png16", "png_rgb", "png_rgba", "png_la", "png_palette", "png_1bit",
           "bmp", "tiff8", "tiff16", "webp", "webp_lossless", "png16_rgb", "tiff16_rgb"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_round_trip(tmp_path, fmt):
    path, expected, max_tol, mean_tol = _save(fmt, tmp_path)
    img = load_image(path)
    check_pixels(img, 48, 64)
    diff = np.abs(img.pixels - expected)
    assert float(diff.max()) <= max_tol
    assert float(diff.mean()) <= mean_tol
    assert img.original_size == (64, 48)
    bits = 16 if "16" in fmt else 1 if fmt == "png_1bit" else 8
    assert img.bit_depth == bits


def test_format_names_and_notes(tmp_path):
    path, *_ = _save("png_rgba", tmp_path)
    img = load_image(path)
    assert img.source_format == "PNG"
    assert any("alpha" in n and "transparent" in n for n in img.notes)
    path, *_ = _save("jpeg", tmp_path)
    assert load_image(path).source_format == "JPEG"
    path, *_ = _save("tiff16", tmp_path)
    assert load_image(path).source_format == "TIFF"


def test_sixteen_bit_png_keeps_dynamic_range(tmp_path):
    g16 = gradient16()  # 256x256, every value 0..65535
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    px = img.pixels[:, :, 0]
    assert len(np.unique(px)) > 256 * 100  # far beyond what 8 bits can hold
    assert float(px.min()) == pytest.approx(0.0, abs=1e-7)
    assert float(px.max()) == pytest.approx(1.0, abs=1e-7)
    assert img.bit_depth == 16
    np.testing.assert_array_equal(img.pixels[:, :, 0], img.pixels[:, :, 2])


def test_exif_orientation_rotates_jpeg(tmp_path):
    h, w = 40, 60
    src = np.full((h, w), 30, np.uint8)
    src[:, w // 2:] = 220  # stored: left dark, right bright
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    Image.fromarray(src).save(tmp_path / "r.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "r.jpg")
    check_pixels(img, w, h)  # width and height swapped
    assert img.original_size == (w, h)  # as stored in the file
    expected = np.rot90(src, k=-1).astype(np.float32) / 255  # clockwise: dark half on top
    assert float(np.abs(img.pixels[:, :, 0] - expected).mean()) < 0.01
    assert img.pixels[:10, :, 0].mean() < 0.2 < 0.8 < img.pixels[-10:, :, 0].mean()
    assert any("orientation 6" in n for n in img.notes)


# ------------------------------------------------------------------------------------------
# DICOM


def _mono_frame() -> np.ndarray:
    """12-bit data in 100..3000 (min at [0, 0], max at [-1, -1]) with marker values in row 1."""
    a = np.linspace(100, 3000, 32 * 24).reshape(24, 32).round().astype(np.uint16)
    a[1, :4] = [750, 1000, 1100, 2000]
    return a


def test_dicom_monochrome2_no_window_scales_by_min_max(tmp_path):
    a = _mono_frame()
    img = load_image(make_dicom(tmp_path / "m2.dcm", a))
    check_pixels(img, 24, 32)
    expected = (a.astype(np.float32) - 100) / 2900
    np.testing.assert_allclose(img.pixels[:, :, 0], expected, atol=1e-6)
    assert img.source_format == "DICOM"
    assert img.bit_depth == 12
    assert img.original_size == (32, 24)
    assert any("min/max" in n for n in img.notes)


def test_dicom_monochrome1_is_inverse_of_monochrome2(tmp_path):
    a = _mono_frame()
    m2 = load_image(make_dicom(tmp_path / "m2.dcm", a)).pixels
    m1 = load_image(make_dicom(tmp_path / "m1.dcm", a, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1.pixels, 1.0 - m2, atol=1e-6)
    assert any("MONOCHROME1" in n for n in m1.notes)
    assert m1.pixels[0, 0, 0] > 0.9  # lowest value is white after inversion


def _linear_window(x: float, c: float, w: float) -> float:
    """DICOM PS3.3 C.11.2.1.2 LINEAR window, output in [0, 1]."""
    c, w = c - 0.5, w - 1
    if x <= c - w / 2:
        return 0.0
    if x > c + w / 2:
        return 1.0
    return (x - c) / w + 0.5


def test_dicom_window_center_width(tmp_path):
    a = _mono_frame()
    plain = load_image(make_dicom(tmp_path / "plain.dcm", a)).pixels
    img = load_image(make_dicom(tmp_path / "win.dcm", a, window=(1000, 500)))
    px = img.pixels[:, :, 0]
    for col, value in enumerate([750, 1000, 1100, 2000]):
        assert px[1, col] == pytest.approx(_linear_window(value, 1000, 500), abs=1e-5)
    assert px[1, 2] == pytest.approx(0.7014, abs=1e-3)
    assert not np.allclose(img.pixels, plain, atol=0.05)
    assert any("window" in n and "1000" in n for n in img.notes)


def test_dicom_rescale_applied_before_window(tmp_path):
    # stored 400..600 -> HU = 2 * x - 1000 = -200..200; window 0/400 spans exactly that.
    a = np.array([[400, 500, 550, 600], [450, 500, 500, 500]], np.uint16)
    img = load_image(make_dicom(tmp_path / "r.dcm", a, window=(0, 400), rescale=(2, -1000)))
    px = img.pixels[:, :, 0]
    for col, raw in enumerate(a[0]):
        assert px[0, col] == pytest.approx(_linear_window(2 * int(raw) - 1000, 0, 400), abs=1e-5)
    assert 0.45 < px[0, 1] < 0.55  # without the rescale 500 would be far above the window
    assert any("rescale" in n for n in img.notes)


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset

    a = _mono_frame()
    p = make_dicom(tmp_path / "lut.dcm", a)
    ds = pydicom.dcmread(p)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # 4096 entries from input 0, 16-bit output
    lut = (65535 - np.arange(4096) * 16).astype(np.uint16)  # inverting LUT, 65535..15
    item.add_new("LUTData", "OW", lut.tobytes())
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 1000, 10  # must be ignored: the LUT takes precedence
    ds.save_as(p)
    img = load_image(p)
    # scaled by the LUT's own output range (15..65535)
    expected = (lut[a].astype(np.float32) - 15) / (65535 - 15)
    np.testing.assert_allclose(img.pixels[:, :, 0], expected, atol=1e-6)
    assert any("VOI LUT" in n for n in img.notes)


def test_dicom_multiframe_uses_first_frame(tmp_path):
    f0 = _mono_frame()
    frames = np.stack([f0, np.full_like(f0, 4000), np.full_like(f0, 5)])
    img = load_image(make_dicom(tmp_path / "mf.dcm", frames, frames=3))
    single = load_image(make_dicom(tmp_path / "f0.dcm", f0))
    np.testing.assert_allclose(img.pixels, single.pixels, atol=1e-6)
    assert any("first of 3 frames" in n for n in img.notes)


def test_dicom_rgb(tmp_path):
    rgb = np.stack([gradient8(), 255 - gradient8(), np.full((48, 64), 60, np.uint8)], axis=2)
    img = load_image(make_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8))
    check_pixels(img, 48, 64)
    np.testing.assert_allclose(img.pixels, rgb.astype(np.float32) / 255, atol=1e-6)


def test_dicom_by_preamble_and_bytes(tmp_path):
    a = _mono_frame()
    p = make_dicom(tmp_path / "1.2.840.99", a)  # no image extension, DICOM by preamble
    assert is_supported(p)
    from_path = load_image(p)
    from_bytes = load_image(p.read_bytes())
    np.testing.assert_array_equal(from_path.pixels, from_bytes.pixels)
    assert from_bytes.source_format == "DICOM"


def test_dicom_large_is_downscaled(tmp_path):
    a = np.tile(_mono_frame(), (10, 10))  # 240 x 320
    img = load_image(make_dicom(tmp_path / "big.dcm", a), max_side=100)
    assert max(img.pixels.shape[:2]) <= 100
    assert img.original_size == (320, 240)


def test_dicom_compressed_garbage_with_available_decoder(tmp_path):
    p = make_dicom(tmp_path / "j2k.dcm", None, transfer_syntax=JPEG2000Lossless,
                   pixel_bytes=encapsulate([b"not a jpeg 2000 codestream" * 4]))
    with pytest.raises(InvalidImageError) as exc:
        load_image(p)
    msg = str(exc.value)
    assert "j2k.dcm" in msg
    if get_decoder(JPEG2000Lossless).is_available:
        assert "corrupt" in msg
    else:
        assert "pip install" in msg


# ------------------------------------------------------------------------------------------
# bad input corpus


def _bad_truncated_jpeg(tmp: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256), np.uint8)).save(tmp / "full.jpg")
    data = (tmp / "full.jpg").read_bytes()
    (tmp / "half.jpg").write_bytes(data[: len(data) // 2])
    return tmp / "half.jpg", {}


def _bad_truncated_png(tmp: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256), np.uint8)).save(tmp / "full.png")
    data = (tmp / "full.png").read_bytes()
    (tmp / "half.png").write_bytes(data[: len(data) // 2])
    return tmp / "half.png", {}


def _bad_text_png(tmp: Path):
    (tmp / "notes.png").write_text("this is a text file, not a picture\n" * 20)
    return tmp / "notes.png", {}


def _bad_bomb_real(tmp: Path):
    write_huge_bilevel_png(tmp / "bomb.png", 20_000)  # 400 MP claimed, ~50 KB on disk
    return tmp / "bomb.png", {}


def _bad_bomb_lowered(tmp: Path):
    Image.fromarray(gradient8()).save(tmp / "small.png")
    return tmp / "small.png", {"max_pixels": 1000}


def _bad_bomb_dicom(tmp: Path):
    return make_dicom(tmp / "big.dcm", _mono_frame()), {"max_pixels": 100}


def _bad_no_pixel_dicom(tmp: Path):
    return make_dicom(tmp / "sr.dcm", None), {}


def _bad_compressed_dicom(tmp: Path):
    p = make_dicom(tmp / "jpegll.dcm", None, transfer_syntax=JPEGLosslessSV1,
                   pixel_bytes=encapsulate([b"\xff\xd8garbage" * 8]))
    return p, {}


def _bad_random_dicom(tmp: Path):
    (tmp / "noise.dcm").write_bytes(np.random.default_rng(1).bytes(2000))
    return tmp / "noise.dcm", {}


def _bad_empty(tmp: Path):
    (tmp / "empty.png").write_bytes(b"")
    return tmp / "empty.png", {}


def _bad_gif(tmp: Path):
    Image.fromarray(gradient8()).save(tmp / "anim.gif")
    return tmp / "anim.gif", {}


def _bad_gif_renamed(tmp: Path):
    Image.fromarray(gradient8()).save(tmp / "anim.png", format="GIF")
    return tmp / "anim.png", {}


def _bad_txt(tmp: Path):
    (tmp / "readme.txt").write_text("hello")
    return tmp / "readme.txt", {}


def _bad_random_file(tmp: Path):
    (tmp / "noise.jpg").write_bytes(np.random.default_rng(2).bytes(5000))
    return tmp / "noise.jpg", {}


_JPEGLL_MSG = "corrupt" if get_decoder(JPEGLosslessSV1).is_available else "pip install"

BAD_INPUTS = {
    "empty file": (_bad_empty, "is empty"),
    "empty bytes": (lambda t: (b"", {}), "is empty"),
    "truncated jpeg": (_bad_truncated_jpeg, "truncated"),
    "truncated png": (_bad_truncated_png, "corrupt"),
    "text renamed png": (_bad_text_png, "cannot identify"),
    "gif renamed png": (_bad_gif_renamed, "cannot identify"),
    "decompression bomb": (_bad_bomb_real, "too large"),
    "too many pixels": (_bad_bomb_lowered, "too large"),
    "too many pixels dicom": (_bad_bomb_dicom, "too large"),
    "dicom without pixels": (_bad_no_pixel_dicom, "has no pixel data"),
    "compressed dicom": (_bad_compressed_dicom, _JPEGLL_MSG),
    "random bytes dicom": (_bad_random_dicom, "not a valid DICOM"),
    "zero-width array": (lambda t: (np.zeros((0, 10), np.uint8), {}), "zero width"),
    "channels-first array": (lambda t: (np.zeros((3, 32, 32), np.uint8), {}), "shape"),
    "complex array": (lambda t: (np.zeros((8, 8), np.complex64), {}), "dtype"),
    "nan array": (lambda t: (np.full((8, 8), np.nan, np.float32), {}), "NaN"),
    "unsupported extension gif": (_bad_gif, "unsupported format"),
    "unsupported extension txt": (_bad_txt, "unsupported format"),
    "nonexistent path": (lambda t: (t / "missing.png", {}), "does not exist"),
    "directory": (lambda t: (t, {}), "directory"),
    "random bytes": (lambda t: (np.random.default_rng(3).bytes(3000), {}), "cannot identify"),
    "random bytes file": (_bad_random_file, "cannot identify"),
    "wrong source type": (lambda t: ([1, 2, 3], {}), "cannot load"),
    "none": (lambda t: (None, {}), "no image"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_invalid_image_error(tmp_path, case):
    factory, phrase = BAD_INPUTS[case]
    source, kwargs = factory(tmp_path)
    with pytest.raises(InvalidImageError) as exc:
        load_image(source, **kwargs)
    msg = str(exc.value)
    assert phrase.lower() in msg.lower(), msg
    if isinstance(source, Path) and source.is_file():
        assert source.name in msg  # path-based messages name the file


def test_compressed_dicom_message_names_a_package(tmp_path):
    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    p, _ = _bad_compressed_dicom(tmp_path)
    with pytest.raises(InvalidImageError, match="pip install .*pylibjpeg-libjpeg") as exc:
        load_image(p)
    assert ">=" not in str(exc.value)


def test_truncated_jpeg_does_not_flip_global_pil_setting(tmp_path):
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    p, _ = _bad_truncated_jpeg(tmp_path)
    with pytest.raises(InvalidImageError):
        load_image(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before is False


# ------------------------------------------------------------------------------------------
# large images


def _large(h: int = 4000, w: int = 6000) -> np.ndarray:
    a = np.full((h, w), 50, np.uint8)
    a[:, w // 2:] = 200
    return a


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_large_image_is_downscaled_on_load(tmp_path, ext):
    p = tmp_path / f"large{ext}"
    Image.fromarray(_large()).save(p, **({"quality": 90} if ext == ".jpg" else
                                         {"compress_level": 1}))
    img = load_image(p)
    h, w = img.pixels.shape[:2]
    assert max(h, w) <= 2048 and max(h, w) >= 2040
    assert w / h == pytest.approx(1.5, rel=0.01)
    assert img.original_size == (6000, 4000)
    assert img.pixels[:, : w // 2 - 5].mean() == pytest.approx(50 / 255, abs=0.01)
    assert img.pixels[:, w // 2 + 5:].mean() == pytest.approx(200 / 255, abs=0.01)


def test_large_jpeg_with_target_size_decodes_at_reduced_scale(tmp_path):
    p = tmp_path / "large.jpg"
    Image.fromarray(_large()).save(p, quality=90)
    img = load_image(p, target_size=224)
    assert img.pixels.shape == (500, 750, 3)  # libjpeg 1/8 scale, both sides >= 224
    assert img.original_size == (6000, 4000)
    assert any("reduced scale" in n for n in img.notes)


def test_max_side_respected_for_arrays():
    img = load_image(np.zeros((300, 900), np.uint8), max_side=90)
    assert img.pixels.shape == (30, 90, 3)
    assert img.original_size == (900, 300)


def test_default_max_pixels():
    assert MAX_PIXELS == 100_000_000


# ------------------------------------------------------------------------------------------
# resize_square


def test_resize_square_constant_image():
    for shape in [(100, 50, 3), (500, 300, 3), (224, 224, 3)]:
        out = resize_square(np.full(shape, 0.3, np.float32), 224)
        assert out.shape == (224, 224, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_resize_square_squashes_without_crop():
    a = np.zeros((100, 300, 3), np.float32)
    a[:, -30:] = 1.0  # right 10% bright: a centre crop would lose it
    a[:, :30, 1] = 0.5
    out = resize_square(a, 64)
    assert out.shape == (64, 64, 3)
    assert out[:, -5:, 0].mean() == pytest.approx(1.0, abs=1e-6)
    assert out[:, :5, 1].mean() == pytest.approx(0.5, abs=1e-6)
    assert out[:, 20:40].max() == 0.0


def test_resize_square_rejects_bad_size():
    with pytest.raises(ValueError):
        resize_square(np.zeros((4, 4, 3), np.float32), 0)


# ------------------------------------------------------------------------------------------
# input kinds agree


def test_path_bytes_pil_and_array_agree(tmp_path):
    g = gradient8()
    Image.fromarray(g).save(tmp_path / "g.png")
    Image.fromarray(g).save(tmp_path / "g.jpg", quality=90)
    for name in ["g.png", "g.jpg"]:
        p = tmp_path / name
        ref = load_image(p)
        np.testing.assert_array_equal(load_image(str(p)).pixels, ref.pixels)
        np.testing.assert_array_equal(load_image(p.read_bytes()).pixels, ref.pixels)
        np.testing.assert_array_equal(load_image(bytearray(p.read_bytes())).pixels, ref.pixels)
        with Image.open(p) as im:
            np.testing.assert_array_equal(load_image(im).pixels, ref.pixels)
        with open(p, "rb") as f:
            np.testing.assert_array_equal(load_image(f).pixels, ref.pixels)
    np.testing.assert_array_equal(load_image(g).pixels, load_image(tmp_path / "g.png").pixels)


def test_sixteen_bit_array_and_png_agree(tmp_path):
    g16 = gradient16(48, 64)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(load_image(g16).pixels, load_image(tmp_path / "g16.png").pixels)
    with Image.open(tmp_path / "g16.png") as im:
        np.testing.assert_array_equal(load_image(im).pixels, load_image(g16).pixels)


def test_pil_image_input_is_not_modified():
    im = Image.fromarray(gradient8()).convert("RGBA")
    load_image(im)
    assert im.mode == "RGBA" and im.size == (64, 48)


def test_array_inputs():
    g = gradient8()
    ref = load_image(g).pixels
    np.testing.assert_array_equal(load_image(g[:, :, None]).pixels, ref)
    np.testing.assert_array_equal(load_image(rgb3(g)).pixels, ref)
    rgba = np.dstack([rgb3(g), np.full_like(g, 255)])
    np.testing.assert_array_equal(load_image(rgba).pixels, ref)
    # floats within [0, 1] are kept as they are
    f = g.astype(np.float64) / 255
    np.testing.assert_allclose(load_image(f).pixels, ref, atol=1e-6)
    # floats outside [0, 1] are min-max scaled
    out = load_image(f * 1000 - 200).pixels
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # a constant image outside [0, 1] does not divide by zero
    assert np.all(load_image(np.full((4, 4), 7.0)).pixels == 0.0)
    img = load_image(np.zeros((4, 5), np.bool_))
    assert img.source_format == "array" and img.original_size == (5, 4) and img.bit_depth == 1


def test_to_uint8_rgb():
    g = gradient8()
    img = load_image(g)
    out = img.to_uint8_rgb()
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out[:, :, 1], g)


def test_is_supported(tmp_path):
    for ext in SUPPORTED_EXTENSIONS:
        assert is_supported(tmp_path / f"x{ext.upper()}")
    assert not is_supported(tmp_path / "x.gif")
    assert not is_supported(tmp_path / "x.txt")
    (tmp_path / "noext").write_bytes(b"x" * 200)
    assert not is_supported(tmp_path / "noext")
    assert ".dcm" in SUPPORTED_EXTENSIONS and ".webp" in SUPPORTED_EXTENSIONS


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real chest X-ray data not present")
def test_real_xray_loads():
    files = sorted((REAL_DATA / "NORMAL").glob("*.jpeg"))[:3]
    if not files:
        pytest.skip("no real images")
    for f in files:
        img = load_image(f, target_size=224)
        with Image.open(f) as im:
            assert img.original_size == im.size
        assert img.pixels.dtype == np.float32 and img.pixels.shape[2] == 3
        assert 0.05 < float(img.pixels.mean()) < 0.95
