"""Predictor speed options (channels_last, precision, backend) agree with fp32 eager NCHW.

Tolerances on probabilities: 1e-3 for float32 variants, 1e-2 for bfloat16. Everything runs on
one CPU thread: a tiny model on a shared 2-core machine is much faster without OpenMP
contention. torch.compile takes ~30 s to compile even this tiny model from a cold cache, so its
test only runs with DEEPCOVID_TEST_COMPILE=1 (benchmarks/bench_inference.py measures it).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_checkpoint, make_image_folder, synthetic_xray
from deepcovid import cam as camlib
from deepcovid import cli
from deepcovid.errors import ConfigError
from deepcovid.inference import BACKENDS, PRECISIONS, Predictor

FP32_TOL, BF16_TOL = 1e-3, 1e-2


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make(run, **kwargs) -> Predictor:
    return Predictor.from_checkpoint(run, device="cpu", num_threads=1, **kwargs)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    out = []
    for k in range(4):
        sq = synthetic_xray(np.random.default_rng(100 + k), 80, positive=k % 2 == 1)
        out.append(np.ascontiguousarray(sq[: 50 + 10 * k]))  # non-square, different sizes
    return out


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> Predictor:
    """fp32 eager NCHW: the path every variant is compared with."""
    return make(tiny_checkpoint, precision="fp32", channels_last=False)


def probs(p: Predictor, images) -> np.ndarray:
    return np.array([[r.probabilities[c] for c in p.classes] for r in p.predict_batch(images, batch_size=3)])


def single_probs(p: Predictor, images) -> np.ndarray:
    return np.array([[p.predict(im).probabilities[c] for c in p.classes] for im in images])


def conv_output_dtypes(p: Predictor, fn) -> set:
    seen = set()
    h = p.model.backbone.conv_stem.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    try:
        fn()
    finally:
        h.remove()
    return seen


# --- flags ----------------------------------------------------------------------------------

def test_invalid_flags_are_config_errors_naming_the_choices(tiny_checkpoint):
    with pytest.raises(ConfigError, match="auto, fp32, bf16"):
        make(tiny_checkpoint, precision="fp16")
    with pytest.raises(ConfigError, match="eager, compile, onnx"):
        make(tiny_checkpoint, backend="tensorrt")
    with pytest.raises(ConfigError, match="onnx"):
        make(tiny_checkpoint, backend="onnx", precision="bf16")
    assert PRECISIONS == ("auto", "fp32", "bf16") and BACKENDS == ("eager", "compile", "onnx")
    p = make(tiny_checkpoint, precision=" BF16 ", backend="Eager")  # case and spaces forgiven
    assert p.precision == "bf16" and p.backend == "eager"


def test_defaults_are_fp32_eager_channels_last_on_cpu(tiny_checkpoint, images, reference):
    p = make(tiny_checkpoint)
    assert (p.precision, p.backend, p.channels_last, p.amp_dtype) == ("auto", "eager", True, None)
    w = p.model.backbone.conv_stem.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert conv_output_dtypes(p, lambda: p.predict(images[0])) == {torch.float32}


def test_ieee_float32_turns_tf32_off_on_cuda_only_and_restores_it():
    """The process-wide TF32 switches (which cuDNN reads even on this CPU-only machine's build)
    are off inside a CUDA predictor call and back as they were after, also after an error."""
    from deepcovid.inference import ieee_float32

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    saved = flags()
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with ieee_float32(torch.device("cpu")):
            assert flags() == (True, True)
        with ieee_float32(torch.device("cuda")):
            assert flags() == (False, False)
        assert flags() == (True, True)
        with pytest.raises(RuntimeError), ieee_float32(torch.device("cuda")):
            raise RuntimeError("model failed")
        assert flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")
def test_cuda_default_gives_the_cpus_float32_probabilities_and_cam(tiny_checkpoint, images, reference):
    """'auto' on CUDA is float32 with TF32 off: a GPU and the CPU agree on what a clinician sees."""
    p = Predictor.from_checkpoint(tiny_checkpoint, device="cuda")
    assert p.amp_dtype is None and p.explain_amp_dtype is None
    assert conv_output_dtypes(p, lambda: p.predict(images[0])) == {torch.float32}
    np.testing.assert_allclose(probs(p, images), probs(reference, images), atol=1e-5)
    for im in images[:2]:
        a, b = p.explain(im, activations=True), reference.explain(im, activations=True)
        assert a.target_class == b.target_class
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-3)


# --- agreement with fp32 eager NCHW -----------------------------------------------------------

def test_channels_last_agrees_with_nchw_for_predict_and_explain(tiny_checkpoint, images, reference):
    p = make(tiny_checkpoint, precision="fp32")
    assert p.channels_last and not reference.channels_last
    assert reference.model.backbone.conv_stem.weight.is_contiguous()
    # channels_last=False really gives NCHW, even for a model that arrives in channels_last
    from deepcovid.checkpoint import load_checkpoint

    loaded = load_checkpoint(tiny_checkpoint)
    cl_model = loaded.build_model().to(memory_format=torch.channels_last)
    nchw = Predictor(cl_model, loaded.meta, device="cpu", num_threads=1, channels_last=False)
    assert nchw.model.backbone.conv_stem.weight.is_contiguous()
    np.testing.assert_allclose(probs(p, images), probs(reference, images), atol=FP32_TOL)
    np.testing.assert_allclose(single_probs(p, images), single_probs(reference, images), atol=FP32_TOL)
    for im in images[:2]:
        for target in (None, "NORMAL"):
            a, b = p.explain(im, target_class=target), reference.explain(im, target_class=target)
            assert a.target_class == b.target_class
            np.testing.assert_allclose(a.cam, b.cam, atol=1e-3)
            assert a.probabilities == pytest.approx(b.probabilities, abs=FP32_TOL)


def test_bf16_predict_agrees_within_1e_2_and_really_runs_bf16(tiny_checkpoint, images, reference):
    p = make(tiny_checkpoint, precision="bf16")
    assert p.amp_dtype == torch.bfloat16
    ref = probs(reference, images)
    got = probs(p, images)
    np.testing.assert_allclose(got, ref, atol=BF16_TOL)
    np.testing.assert_allclose(single_probs(p, images), ref, atol=BF16_TOL)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    assert conv_output_dtypes(p, lambda: p.predict(images[0])) == {torch.bfloat16}


def test_bf16_k_class_checkpoint(tmp_path, images):
    run = make_checkpoint(tmp_path / "k", classes=("COVID", "NORMAL", "PNEUMONIA")).parent
    ref = make(run, precision="fp32", channels_last=False)
    p = make(run, precision="bf16")
    np.testing.assert_allclose(probs(p, images), probs(ref, images), atol=BF16_TOL)


def test_bf16_explanations_stay_float32(tiny_checkpoint, images, reference):
    """Under precision='bf16' the CAM (and its forward) is float32: the same as fp32's."""
    p = make(tiny_checkpoint, precision="bf16")
    assert p.explain_amp_dtype is None
    assert conv_output_dtypes(p, lambda: p.explain(images[1])) == {torch.float32}
    for im in images[:2]:
        a, b = p.explain(im, activations=True), reference.explain(im, activations=True)
        assert a.target_class == b.target_class and a.cam.dtype == np.float32
        np.testing.assert_allclose(a.cam, b.cam, atol=1e-3)
        assert a.probabilities == pytest.approx(b.probabilities, abs=FP32_TOL)
    assert camlib.count_hooks(p.model) == 0


def test_onnx_backend_agrees_and_explain_still_works(tiny_checkpoint, images, reference):
    pytest.importorskip("onnxruntime")
    p = make(tiny_checkpoint, backend="onnx")
    assert p._onnx is not None
    ref = probs(reference, images)
    np.testing.assert_allclose(probs(p, images), ref, atol=FP32_TOL)  # batches of 3 and 1
    np.testing.assert_allclose(single_probs(p, images), ref, atol=FP32_TOL)
    # the eager model is not used by predict ...
    assert conv_output_dtypes(p, lambda: p.predict(images[0])) == set()
    # ... but explain runs it, with its hooks and autograd
    e = p.explain(images[0])
    np.testing.assert_allclose(e.cam, reference.explain(images[0]).cam, atol=1e-3)
    assert e.probabilities == pytest.approx(reference.predict(images[0]).probabilities, abs=FP32_TOL)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DEEPCOVID_TEST_COMPILE") != "1",
                    reason="torch.compile takes ~30 s cold; set DEEPCOVID_TEST_COMPILE=1 (the benchmark measures it)")
@pytest.mark.parametrize("precision, tol", [("fp32", FP32_TOL), ("bf16", BF16_TOL)])
def test_compile_backend_agrees(tiny_checkpoint, images, reference, precision, tol):
    p = make(tiny_checkpoint, backend="compile", precision=precision)
    np.testing.assert_allclose(single_probs(p, images), single_probs(reference, images), atol=tol)
    e = p.explain(images[0])
    np.testing.assert_allclose(e.cam, reference.explain(images[0]).cam, atol=1e-3)


# --- the CLI ------------------------------------------------------------------------------------

def read_probs(path: Path) -> dict[str, float]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(not r["error"] for r in rows)
    return {Path(r["path"]).name: float(r["p_PNEUMONIA"]) for r in rows}


def test_cli_precision_and_backend_flags_end_to_end(tiny_checkpoint, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", {"NORMAL": 3, "PNEUMONIA": 3})

    def run(name, *flags):
        out = tmp_path / name
        assert cli.main(["predict", str(folder), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                         "--threads", "1", *flags]) == 0
        return read_probs(out / "predictions.csv"), out

    fp32, _ = run("fp32", "--no-cam", "--precision", "fp32")
    bf16, _ = run("bf16", "--no-cam", "--precision", "bf16")
    onnx, _ = run("onnx", "--no-cam", "--backend", "onnx")
    assert set(fp32) == set(bf16) == set(onnx) and len(fp32) == 6
    for name, p in fp32.items():
        assert abs(bf16[name] - p) <= BF16_TOL
        assert abs(onnx[name] - p) <= FP32_TOL
    # with CAMs: the backend is ignored (with a note), bf16 predictions + fp32 explanations
    capsys.readouterr()
    cam_bf16, out = run("cam", "--precision", "bf16", "--backend", "onnx")
    assert "only speeds up --no-cam" in capsys.readouterr().err
    assert len(list((out / "overlays").glob("*.png"))) == 6
    for name, p in fp32.items():
        assert abs(cam_bf16[name] - p) <= FP32_TOL  # explain runs float32
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder), "--checkpoint", str(tiny_checkpoint), "--precision", "fp8"])
    assert "fp32" in capsys.readouterr().err
