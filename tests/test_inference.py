"""deepcovid.inference: Predictor.predict / explain on tiny random checkpoints (offline)."""

from __future__ import annotations

import gc
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, make_checkpoint, synthetic_xray
from deepcovid import cam as camlib
from deepcovid.errors import ConfigError
from deepcovid.inference import (CAM_METHODS, SLOW_CAM_METHODS, Explanation, Prediction, Predictor,
                                 available_threads, resolve_device)

GRADIENT_METHODS = [m for m in CAM_METHODS if m not in SLOW_CAM_METHODS]


def nonsquare_image(seed: int = 0, h: int = 50, w: int = 80) -> np.ndarray:
    """An (h, w) uint8 chest-like image, wider than tall."""
    sq = synthetic_xray(np.random.default_rng(seed), max(h, w), positive=seed % 2 == 1)
    return np.ascontiguousarray(sq[:h, :w])


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return nonsquare_image(1)


# --- construction and preprocessing ---------------------------------------------------------

def test_from_checkpoint_metadata_identity_and_frozen_params(predictor, tiny_checkpoint):
    assert predictor.classes == ["NORMAL", "PNEUMONIA"]
    assert predictor.positive_class == "PNEUMONIA" and predictor.threshold == 0.5
    assert predictor.arch == "efficientnet_lite0" and predictor.input_size == 64
    assert predictor.device == torch.device("cpu")
    assert predictor.identity == {"arch": "efficientnet_lite0", "run": "tiny-run", "val_f1": 0.8,
                                  "path": str(Path(tiny_checkpoint) / "best.safetensors")}
    assert not any(p.requires_grad for p in predictor.model.parameters())
    assert not predictor.model.training
    assert 1 <= torch.get_num_threads() <= available_threads()


def test_from_checkpoint_best_picks_the_highest_f1(tmp_path):
    make_checkpoint(tmp_path / "a", f1=0.6)
    make_checkpoint(tmp_path / "b", f1=0.9, seed=1)
    p = Predictor.from_checkpoint("best", tmp_path, device="cpu")
    assert p.identity["run"] == "b" and p.identity["val_f1"] == 0.9


def test_device_resolution():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu-ish")


def test_preprocess_uses_the_checkpoint_config_not_constants(tiny_checkpoint, image):
    from deepcovid.checkpoint import load_checkpoint

    loaded = load_checkpoint(tiny_checkpoint)
    meta = {**loaded.meta, "input_size": 40, "mean": [0.1, 0.2, 0.3], "std": [0.25, 0.5, 0.75]}
    p = Predictor(loaded.build_model(), meta, device="cpu")
    x = p.preprocess(image)
    assert x.shape == (1, 3, 40, 40) and x.dtype == torch.float32
    import cv2

    sq = cv2.resize(image.astype(np.float32) / 255.0, (40, 40), interpolation=cv2.INTER_AREA)
    for c, (m, s) in enumerate(zip(meta["mean"], meta["std"])):
        np.testing.assert_allclose(x[0, c].numpy(), (sq - m) / s, atol=1e-4)
    hsv = Predictor(loaded.build_model(), {**meta, "color_space": "hsv"}, device="cpu").preprocess(image)
    assert not torch.allclose(hsv, x)


# --- predict ---------------------------------------------------------------------------------

def test_predict_probabilities_label_and_identity(predictor, image):
    pred = predictor.predict(image)
    assert isinstance(pred, Prediction) and not isinstance(pred, Explanation)
    assert list(pred.probabilities) == ["NORMAL", "PNEUMONIA"]
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    p = pred.probabilities["PNEUMONIA"]
    assert pred.label == ("PNEUMONIA" if p >= 0.5 else "NORMAL")
    assert pred.probability == p
    with torch.inference_mode():
        logit = predictor.model(predictor.preprocess(image))[0, 0].item()
    assert p == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-6)
    assert pred.threshold == 0.5 and pred.positive_class == "PNEUMONIA"
    assert pred.checkpoint == predictor.identity
    assert predictor.predict_batch([image, nonsquare_image(2)])[0].probabilities == pytest.approx(pred.probabilities,
                                                                                                 abs=1e-6)


@pytest.mark.parametrize("threshold, expected", [(0.0, "PNEUMONIA"), (1.0, "NORMAL")])
def test_label_and_default_cam_target_follow_the_stored_threshold(tmp_path, image, threshold, expected):
    run = make_checkpoint(tmp_path / "t", threshold=threshold).parent
    p = Predictor.from_checkpoint(run, device="cpu")
    assert p.threshold == threshold
    assert p.predict(image).label == expected
    e = p.explain(image)
    assert e.label == expected and e.target_class == expected


def test_k_class_checkpoint_softmax_argmax_and_class_targets(tmp_path, image):
    run = make_checkpoint(tmp_path / "k", classes=("COVID", "NORMAL", "PNEUMONIA")).parent
    p = Predictor.from_checkpoint(run, device="cpu")
    pred = p.predict(image)
    assert pred.threshold is None and pred.positive_class is None
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert pred.label == max(pred.probabilities, key=pred.probabilities.get)
    assert pred.probability == max(pred.probabilities.values())
    e = p.explain(image)
    assert e.target_class == pred.label
    cams = [p.explain(image, target_class=c).cam for c in p.classes]
    assert not np.allclose(cams[0], cams[1]) or not np.allclose(cams[1], cams[2])


# --- explain ---------------------------------------------------------------------------------

def test_explain_shapes_ranges_and_same_prediction(predictor, image):
    pred = predictor.predict(image)
    e = predictor.explain(image)
    assert isinstance(e, Explanation) and isinstance(e, Prediction)
    assert e.cam.shape == (64, 64) and e.cam.dtype == np.float32
    assert 0.0 <= e.cam.min() and e.cam.max() <= 1.0 and e.cam.max() > 0.5
    assert e.heatmap.shape == (50, 80, 3) and e.heatmap.dtype == np.uint8  # the original's own size
    assert e.overlay.shape == (50, 80, 3) and e.overlay.dtype == np.uint8
    assert e.cam_method == "gradcam" and e.target_class == pred.label
    assert e.activations == []
    for c in predictor.classes:
        assert e.probabilities[c] == pytest.approx(pred.probabilities[c], abs=1e-6)
    assert np.array_equal(e.heatmap, camlib.colorize(e.cam, (50, 80), "jet"))
    assert np.array_equal(e.overlay, camlib.overlay(np.repeat(image[:, :, None], 3, 2), e.cam, 0.5, "jet"))


def test_cams_of_the_two_classes_differ_and_follow_plus_minus_logit(predictor, image):
    pos = predictor.explain(image, target_class="PNEUMONIA")
    neg = predictor.explain(image, target_class="NORMAL")
    assert pos.target_class == "PNEUMONIA" and neg.target_class == "NORMAL"
    assert np.abs(pos.cam - neg.cam).max() > 0.1
    assert pos.probabilities == pytest.approx(neg.probabilities)


def test_one_pass_cam_equals_the_plain_grad_cam_recipe(predictor, tiny_checkpoint, image):
    """The graph cut and frozen parameters change the cost, not the result."""
    from pytorch_grad_cam import GradCAM

    from deepcovid.checkpoint import load_checkpoint

    ref_model = load_checkpoint(tiny_checkpoint).build_model().requires_grad_(True)
    x = predictor.preprocess(image)
    for cls, sign in (("PNEUMONIA", +1), ("NORMAL", -1)):
        with GradCAM(model=ref_model, target_layers=[ref_model.backbone.conv_head]) as cam:
            ref = cam(input_tensor=x.clone().requires_grad_(True), targets=[camlib.LogitTarget(sign)])[0]
        ours = predictor.explain(image, target_class=cls).cam
        np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_every_method_gives_a_cam(tiny_checkpoint, image, method):
    # Score-CAM scores every channel of the target layer; on blocks.1 (24 channels) it stays quick.
    layers = ("blocks.1",) if method in SLOW_CAM_METHODS else None
    p = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", cam_layers=layers)
    pred = p.predict(image)
    e = p.explain(image, cam_method=method, colormap="inferno", alpha=0.3)
    assert e.cam_method == method and e.cam.shape == (64, 64)
    assert np.isfinite(e.cam).all() and 0.0 <= e.cam.min() and e.cam.max() <= 1.0
    assert e.overlay.shape == (50, 80, 3) and e.target_class == pred.label
    assert e.probabilities == pytest.approx(pred.probabilities, abs=1e-6)
    assert camlib.count_hooks(p.model) == 0


def test_bad_options_are_config_errors(predictor, image):
    with pytest.raises(ConfigError, match="gradcam"):
        predictor.explain(image, cam_method="magic")
    with pytest.raises(ConfigError, match="NORMAL"):
        predictor.explain(image, target_class="COVID")
    with pytest.raises(ConfigError):
        predictor.explain(image, colormap="nope")
    with pytest.raises(ConfigError):
        predictor.explain(image, alpha=2)
    with pytest.raises(ConfigError, match="no layer"):
        predictor.explain(image, activations=["blocks.99"])
    assert camlib.count_hooks(predictor.model) == 0


def test_activation_maps_of_the_registered_layers(predictor, image):
    from deepcovid.models import get_spec

    names = list(get_spec("efficientnet_lite0").activation_layers)
    x = predictor.preprocess(image)
    ref, handles = {}, []
    for n in names:
        mod = predictor.model.backbone.get_submodule(n)
        handles.append(mod.register_forward_hook(lambda m, i, o, n=n: ref.__setitem__(n, o.detach().clone())))
    with torch.inference_mode():
        predictor.model(x)
    for h in handles:
        h.remove()
    e = predictor.explain(image, activations=True)
    assert [n for n, _ in e.activations] == names
    for n, grid in e.activations:
        assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
        assert np.array_equal(grid, camlib.activation_grid(ref[n], n))
    assert {n: tuple(t.shape[1:]) for n, t in ref.items()} == {
        "conv_stem": (32, 32, 32), "blocks.0": (16, 32, 32), "blocks.1": (24, 16, 16)}
    custom = predictor.explain(image, activations=["blocks.2"])
    assert [n for n, _ in custom.activations] == ["blocks.2"]


# --- one pass, cheap backward -----------------------------------------------------------------

@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_one_forward_and_a_backward_through_the_tail_only(predictor, image, method):
    model = predictor.model
    calls = {"model": 0, "backbone": 0}
    seen = {}
    baseline = camlib.count_hooks(model)
    handles = [
        # grad-cam calls the predictor's view of the model (its forward without test-time views)
        predictor._cam_view.register_forward_hook(lambda m, i, o: calls.__setitem__("model", calls["model"] + 1)),
        model.backbone.register_forward_hook(lambda m, i, o: calls.__setitem__("backbone", calls["backbone"] + 1)),
        model.backbone.conv_stem.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", o.requires_grad)),
        model.backbone.conv_head.register_forward_hook(lambda m, i, o: seen.__setitem__("head", o)),
    ]
    try:
        e = predictor.explain(image, cam_method=method, activations=True)
    finally:
        for h in handles:
            h.remove()
    assert calls == {"model": 1, "backbone": 1}  # prediction, CAM and activations share one forward
    assert seen["stem"] is False  # no graph before the target layer
    assert seen["head"].is_leaf and seen["head"].requires_grad  # the graph starts at the target layer
    if method != "eigencam":
        assert seen["head"].grad is not None  # ... and the backward reached it
    assert all(p.grad is None for p in model.parameters())
    assert len(e.activations) == 3
    assert camlib.count_hooks(model) == baseline


# --- no leaks -----------------------------------------------------------------------------------

def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_count() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") and not __import__("importlib").util.find_spec("psutil"),
                    reason="no way to read RSS")
def test_500_explanations_leak_no_hooks_tensors_or_memory(tmp_path):
    run = make_checkpoint(tmp_path / "small", input_size=32).parent
    # One thread: a tiny model on a shared 2-core machine is many times faster without OpenMP
    # contention, which keeps this test well under 30 s.
    p = Predictor.from_checkpoint(run, device="cpu", num_threads=1)
    img = nonsquare_image(3, 40, 56)
    hooks0 = camlib.count_hooks(p.model)
    for _ in range(30):  # warm-up: allocator pools, lazy imports
        p.explain(img, activations=True)
    gc.collect()
    rss0, tensors0 = _rss_bytes(), _tensor_count()
    t0 = time.perf_counter()
    for i in range(500):
        e = p.explain(img, activations=True, target_class=("NORMAL", "PNEUMONIA", None)[i % 3])
    elapsed = time.perf_counter() - t0
    del e
    gc.collect()
    assert camlib.count_hooks(p.model) == hooks0
    assert _tensor_count() <= tensors0 + 5
    growth = _rss_bytes() - rss0
    assert growth < 40 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 500 explanations"
    assert all(q.grad is None for q in p.model.parameters())
    print(f"500 explanations in {elapsed:.1f} s, RSS growth {growth / 2**20:.1f} MiB")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # as conftest set it


# --- threads ------------------------------------------------------------------------------------

def test_concurrent_calls_match_sequential_results(predictor):
    images = [nonsquare_image(s) for s in range(2)]
    jobs = []
    for k, img in enumerate(images):
        jobs += [("explain", k, None, "gradcam"), ("explain", k, "NORMAL", "layercam"),
                 ("explain", k, "PNEUMONIA", "gradcam++"), ("predict", k, None, None)]

    def do(job):
        kind, k, target, method = job
        if kind == "predict":
            return predictor.predict(images[k])
        return predictor.explain(images[k], cam_method=method, target_class=target, activations=(k == 0))

    sequential = [do(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(do, jobs * 2))
    for a, b in zip(sequential * 2, concurrent):
        assert type(a) is type(b)
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
        if isinstance(a, Explanation):
            assert a.target_class == b.target_class
            np.testing.assert_allclose(a.cam, b.cam, atol=1e-5)
            assert [n for n, _ in a.activations] == [n for n, _ in b.activations]
    assert camlib.count_hooks(predictor.model) == 0


# --- DICOM == the same pixels as a 16-bit PNG ---------------------------------------------------

def _real_pixels(h: int = 120, w: int = 96) -> np.ndarray:
    """(h, w) float64 in [0, 1], full range: a crop of a real X-ray if the data set is here."""
    import cv2

    train = SHARED_DATA / "train"
    arr = None
    if train.is_dir():
        for f in sorted((train / "PNEUMONIA").glob("*.jpeg"))[:1]:
            arr = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        arr = synthetic_xray(np.random.default_rng(5), 160, positive=True)
    arr = cv2.resize(arr, (w * 2, h * 2), interpolation=cv2.INTER_AREA)[h // 2: h // 2 + h, w // 3: w // 3 + w]
    g = cv2.GaussianBlur(arr.astype(np.float64), (0, 0), 0.7)  # real 16-bit gradations
    return (g - g.min()) / (g.max() - g.min())


def _write_dicom(path: Path, stored: np.ndarray, photometric: str, window=None) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "TEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("window", [None, (30000.0, 40000.0)])
def test_dicom_predicts_like_the_same_pixels_as_16bit_png(predictor, tmp_path, photometric, window):
    from PIL import Image

    from deepcovid.imageio import load_image

    wanted = _real_pixels()  # what the model should see, in [0, 1]
    if window is None:
        display = np.rint(wanted * 65535)
        stored = display if photometric == "MONOCHROME2" else 65535 - display
        png_values = display
    else:
        c, w = window
        stored = np.rint(wanted * 65535)
        if photometric == "MONOCHROME1":
            stored = 65535 - stored
        # DICOM PS3.3 C.11.2.1.2.1 linear VOI window, scaled to [0, 1]
        windowed = np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
        if photometric == "MONOCHROME1":
            windowed = 1.0 - windowed
        png_values = np.rint(windowed * 65535)
    dcm = _write_dicom(tmp_path / "x.dcm", stored.astype(np.uint16), photometric, window)
    png = tmp_path / "x.png"
    Image.fromarray(png_values.astype(np.uint16)).save(png)
    assert load_image(png).bit_depth == 16

    d_img, p_img = load_image(dcm), load_image(png)
    np.testing.assert_allclose(d_img.pixels, p_img.pixels, atol=2e-5)
    np.testing.assert_allclose(predictor.preprocess(dcm), predictor.preprocess(png), atol=1e-3)
    d, p = predictor.predict(dcm), predictor.predict(png)
    assert d.label == p.label
    for c in predictor.classes:
        assert d.probabilities[c] == pytest.approx(p.probabilities[c], abs=1e-3)
    # and the explained prediction agrees too
    assert predictor.explain(dcm).probabilities == pytest.approx(p.probabilities, abs=1e-3)
