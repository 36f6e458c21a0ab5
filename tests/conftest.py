"""Shared fixtures: tiny synthetic X-ray folders and checkpoints, built offline in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests must never reach the network (HF hub, torchvision downloads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data" / "chest_xray").resolve()


LITE0_META = {"arch": "efficientnet_lite0", "classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA",
              "num_outputs": 1, "input_size": 64, "color_space": "rgb", "threshold": 0.5, "val_metrics": {}}


def lite0_predictor(**kwargs):
    """A seeded, randomly initialised efficientnet_lite0 Predictor at 64 px on the CPU, built with
    ``kwargs`` (the serving rewrites' tests compare it with and without each one)."""
    from deepcovid.inference import Predictor
    from deepcovid.models import build_model, get_spec

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2, weights="none")
    dc = get_spec("efficientnet_lite0").data_config
    return Predictor(model, {**LITE0_META, "mean": list(dc.mean), "std": list(dc.std)}, device="cpu",
                     num_threads=1, **kwargs)


def synthetic_xray(rng: np.random.Generator, size: int, positive: bool) -> np.ndarray:
    """A chest-like grey image; the positive class gets bright opacities in the lungs."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.25 + 0.35 * np.exp(-((xx - 0.5) ** 2) / 0.02)  # spine/mediastinum
    for cx in (0.3, 0.7):  # lungs darker
        img -= 0.15 * np.exp(-(((xx - cx) ** 2) / 0.02 + ((yy - 0.5) ** 2) / 0.08))
    if positive:
        for _ in range(3):
            cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.7)
            img += 0.35 * np.exp(-(((xx - cx) ** 2) + ((yy - cy) ** 2)) / 0.006)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def assert_same_explanations(plain, served, cam_atol: float = 1e-4, prob_atol: float = 1e-6) -> None:
    """A Predictor with a serving rewrite (``served``) explains two synthetic X-rays as the one
    without it (``plain``) does: the same probabilities, CAM and activation maps, to rounding."""
    for k in range(2):
        image = synthetic_xray(np.random.default_rng(3 + k), 96, positive=k == 1)
        a, b = plain.explain(image, activations=True), served.explain(image, activations=True)
        assert b.probabilities == pytest.approx(a.probabilities, abs=prob_atol)
        assert served.predict(image).probabilities == pytest.approx(a.probabilities, abs=prob_atol)
        np.testing.assert_allclose(b.cam, a.cam, atol=cam_atol)
        assert len(a.activations) == len(b.activations) > 0
        for (na, ga), (nb, gb) in zip(a.activations, b.activations):
            assert na == nb and np.abs(ga.astype(int) - gb.astype(int)).max() <= 1


# A seconds-long training config for tests: real offline ImageNet weights, tiny inputs.
FAST_TRAIN = {"arch": "efficientnet_lite0", "weights": "imagenet", "input_size": 32, "batch_size": 8, "epochs": 2,
              "val_fraction": 0.25, "cache": "memory", "patience": 0, "freeze": "none", "lr": 1e-3}


def ctrl_c_in_epoch(train_one_epoch, epoch: int):
    """``train_one_epoch`` as if Ctrl-C were pressed when ``epoch`` starts."""

    def wrapped(*a, **k):
        if k["epoch"] == epoch:
            raise KeyboardInterrupt
        return train_one_epoch(*a, **k)

    return wrapped


def make_image_folder(root: Path, counts: dict[str, int], size: int = 64, seed: int = 0,
                      images_per_patient: int = 2, ext: str = ".jpeg") -> Path:
    """Write ROOT/<CLASS>/<patient>-<k><ext> images. Classes whose name is not NORMAL are 'positive'."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    offset = 0  # patient numbers are unique across classes
    for cls, n in counts.items():
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            patient = offset + i // images_per_patient
            if cls.upper() == "NORMAL":
                name = f"IM-{patient:04d}-{i % images_per_patient + 1:04d}{ext}"
            else:
                name = f"person{patient}_{cls.lower()}_{i}{ext}"
            arr = synthetic_xray(rng, size, positive=cls.upper() != "NORMAL")
            Image.fromarray(arr).convert("RGB").save(d / name)
        offset += n
    return root


def make_train_test(root: Path, train_per_class: int, test_per_class: int, size: int) -> Path:
    """ROOT/train and ROOT/test (other images) with NORMAL and PNEUMONIA folders."""
    make_image_folder(root / "train", {"NORMAL": train_per_class, "PNEUMONIA": train_per_class}, size=size)
    make_image_folder(root / "test", {"NORMAL": test_per_class, "PNEUMONIA": test_per_class}, size=size, seed=7)
    return root


def make_checkpoint(run_dir: Path, arch: str = "efficientnet_lite0", classes=("NORMAL", "PNEUMONIA"),
                    input_size: int = 64, threshold: float = 0.5, seed: int = 0, f1: float = 0.8,
                    clahe: float = 0.0, tta: str | None = None) -> Path:
    """A valid, randomly initialised checkpoint (no training), for inference/app tests."""
    from deepcovid.checkpoint import save_checkpoint, versions
    from deepcovid.models import build_model, get_spec

    torch.manual_seed(seed)
    model = build_model(arch, len(classes), weights="none")
    dc = get_spec(arch).data_config
    meta = {
        "format_version": 1, "arch": arch, "classes": list(classes),
        "positive_class": classes[-1] if len(classes) == 2 else None,
        "num_outputs": 1 if len(classes) == 2 else len(classes),
        "input_size": input_size, "mean": list(dc.mean), "std": list(dc.std), "color_space": "rgb",
        "threshold": threshold,
        "val_metrics": {"tp": 1, "tn": 1, "fp": 0, "fn": 0, "accuracy": 1.0, "precision": 1.0, "recall": 1.0,
                        "specificity": 1.0, "f1": f1, "auc": 1.0, "loss": 0.5},
        "epoch": 1, "config": {"arch": arch}, "versions": versions(),
        "data": {"train_counts": {c: 10 for c in classes}, "val_counts": {c: 2 for c in classes}, "fingerprint": "test"},
        "run": Path(run_dir).name,
    }
    if clahe:
        meta["clahe"] = float(clahe)
    if tta is not None:
        meta["tta"] = tta
    return save_checkpoint(Path(run_dir), "best", model.state_dict(), meta)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small train/ + test/ root (16 and 4 images a class, 48 px) for training runs; one per test module."""
    return make_train_test(tmp_path_factory.mktemp("ds"), 16, 4, size=48)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "imgs", {"NORMAL": 6, "PNEUMONIA": 6})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Path to a run folder holding best.safetensors/best.json (efficientnet_lite0, 64 px)."""
    run = tmp_path_factory.mktemp("ckpts") / "tiny-run"
    make_checkpoint(run)
    return run


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _restore_deepcovid_logger():
    """The CLI's setup_logging() stops the 'deepcovid' logger propagating (so a console run does not
    print twice); put it back after each test so later tests' caplog still sees its records."""
    import logging

    logger = logging.getLogger("deepcovid")
    state = (logger.propagate, list(logger.handlers), logger.level)
    yield
    logger.propagate, logger.handlers[:] = state[0], state[1]
    logger.setLevel(state[2])
