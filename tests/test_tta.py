"""Flip test-time augmentation: one model everywhere (validation, test/ reports, predictions,
explanations), rebuilt from the checkpoint alone."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, make_checkpoint, make_train_test, synthetic_xray

from deepcovid.checkpoint import load_checkpoint, read_checkpoint
from deepcovid.errors import CheckpointError, ConfigError
from deepcovid.inference import Predictor
from deepcovid.models import EnsembleNet, build_from_meta, build_model, check_tta

FAST = {**FAST_TRAIN, "input_size": 64, "epochs": 1, "threshold": "0.5"}


def _mean_of_views(plain, x: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """The definition, written out: the mean probability of x and its left-right mirror."""
    with torch.inference_mode():
        a, b = plain(x).float(), plain(torch.flip(x, dims=[3])).float()
    if num_outputs == 1:
        return (torch.sigmoid(a) + torch.sigmoid(b)) / 2
    return (torch.softmax(a, -1) + torch.softmax(b, -1)) / 2


@pytest.mark.parametrize("num_classes", [2, 3])
def test_hflip_is_the_mean_probability_of_the_image_and_its_mirror_in_eval_mode_only(num_classes):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes).eval()
    k = model.num_outputs
    keys = set(model.state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        plain = model(x)
    model.tta = "hflip"
    assert set(model.state_dict()) == keys  # a setting of the model, not a weight
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (3, k)
    got = torch.sigmoid(out) if k == 1 else torch.exp(out)
    torch.testing.assert_close(got, _mean_of_views(model.plain_forward, x, k), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-4)  # the mirror changed the answer
    model.train()  # training never sees the views
    torch.manual_seed(1)
    a = model(x)
    model.tta = "none"
    torch.manual_seed(1)
    torch.testing.assert_close(a, model(x))


def test_an_ensemble_applies_the_views_to_its_mean():
    torch.manual_seed(0)
    ens = EnsembleNet(["efficientnet_lite0", "efficientnet_lite0"], 1).eval()
    ens.tta = "hflip"
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got = torch.sigmoid(ens(x))
        want = torch.stack([_mean_of_views(m, x, 1) for m in ens.members]).mean(0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert all(m.tta == "none" for m in ens.members)  # the views are taken once, not per member


def test_the_checkpoint_says_which_views_and_a_bad_value_is_refused(tmp_path):
    meta = {"arch": "efficientnet_lite0", "classes": ["NORMAL", "PNEUMONIA"]}
    assert build_from_meta(meta).tta == "none"  # checkpoints from before TTA existed
    assert build_from_meta({**meta, "tta": "hflip"}).tta == "hflip"
    with pytest.raises(CheckpointError, match="unknown --tta 'rot90'"):
        build_from_meta({**meta, "tta": "rot90"})
    make_checkpoint(tmp_path / "bad", tta="rot90")
    with pytest.raises(CheckpointError, match="rot90"):
        Predictor.from_checkpoint(tmp_path / "bad", device="cpu")
    assert check_tta("HFLIP") == "hflip" and check_tta(None) == "none"


# --- serving --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same weights served with and without flip TTA."""
    root = tmp_path_factory.mktemp("tta-ckpts")
    make_checkpoint(root / "flip", tta="hflip", seed=3)
    make_checkpoint(root / "plain", seed=3)
    return (Predictor.from_checkpoint(root / "flip", device="cpu"),
            Predictor.from_checkpoint(root / "plain", device="cpu"))


@pytest.fixture(scope="module")
def xray():
    return synthetic_xray(np.random.default_rng(5), 80, positive=True)[:, 10:]  # not square, not symmetric


def test_predict_and_explain_give_the_same_mean_of_views(pair, xray):
    flip, plain = pair
    assert flip.tta == "hflip" and plain.tta == "none"
    x = flip.preprocess(xray)
    want = _mean_of_views(plain.model.plain_forward, x.contiguous(memory_format=torch.channels_last), 1)[0, 0]
    p = flip.predict(xray)
    assert p.probabilities["PNEUMONIA"] == pytest.approx(float(want), abs=1e-6)
    assert p.probabilities["PNEUMONIA"] != pytest.approx(plain.predict(xray).probabilities["PNEUMONIA"], abs=1e-5)
    e = flip.explain(xray, activations=True)
    assert e.probabilities == pytest.approx(p.probabilities, abs=1e-6)
    assert flip.predict_batch([xray, xray])[1].probabilities == pytest.approx(p.probabilities, abs=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "eigencam", "scorecam"])
def test_the_cam_is_the_mean_of_each_views_cam_turned_back(pair, xray, method):
    flip, plain = pair
    kw = {"cam_layers": ["blocks.1"]} if method == "scorecam" else {}  # 24 channels: seconds, not minutes
    if kw:
        flip = Predictor(flip.model, flip.meta, device="cpu", **kw)
        plain = Predictor(plain.model, plain.meta, device="cpu", **kw)
    e = flip.explain(xray, cam_method=method, activations=True)
    prepared = plain.prepare(xray)
    mirrored = dataclasses.replace(prepared, tensor=prepared.tensor.flip(-1))
    a = plain.explain(prepared, cam_method=method, target_class=e.target_class, activations=True)
    b = plain.explain(mirrored, cam_method=method, target_class=e.target_class)
    want = np.clip((a.cam + b.cam[:, ::-1]) / 2, 0, 1)
    np.testing.assert_allclose(e.cam, want, atol=1e-5)
    assert not np.allclose(e.cam, a.cam, atol=1e-3)  # the mirror's map counts
    assert e.cam.shape == (64, 64) and e.overlay.shape[:2] == xray.shape
    # the activation maps are the image's own, not its mirror's
    assert [n for n, _ in e.activations] == [n for n, _ in a.activations]
    for (_, g1), (_, g2) in zip(e.activations, a.activations):
        np.testing.assert_array_equal(g1, g2)


def test_onnx_export_keeps_the_views(pair, xray):
    pytest.importorskip("onnxruntime")
    flip, _ = pair
    fast = Predictor(flip.model, flip.meta, device="cpu", backend="onnx")
    assert fast.predict(xray).probabilities == pytest.approx(flip.predict(xray).probabilities, abs=1e-5)


def test_the_model_card_says_so(pair):
    from deepcovid.webapp import model_card_markdown

    flip, plain = pair
    assert "Test-time augmentation" in model_card_markdown({**flip.meta, "path": "x/best.safetensors"})
    assert "Test-time augmentation" not in model_card_markdown({**plain.meta, "path": "x/best.safetensors"})


# --- training -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_train_test(tmp_path_factory.mktemp("tta-ds"), 12, 3, size=72)


def test_training_validates_and_reports_the_model_it_serves(dataset, tmp_path, monkeypatch):
    from deepcovid import training
    from deepcovid.data import load_splits
    from deepcovid.metrics import compute_metrics

    seen = []
    original = training.evaluate

    def spy(model, *args, **kwargs):
        seen.append((getattr(model, "tta", None), model))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training, "evaluate", spy)
    cfg = training.resolve_config({**FAST, "tta": "hflip"})
    res = training.fit({**cfg, "run_name": "flip"}, dataset, tmp_path)
    assert seen and all(t == "hflip" for t, _ in seen)
    ck = load_checkpoint(tmp_path / "flip")
    assert ck.meta["tta"] == "hflip" and json.loads((tmp_path / "flip" / "config.json").read_text())["tta"] == "hflip"
    # the recorded validation scores are the served model's: recomputed from the checkpoint alone
    splits = load_splits(dataset, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
    y, p, _ = training.predict_samples(ck, splits.val, cfg=cfg)
    assert compute_metrics(y, p, ck.meta["classes"], 0.5)["auc"] == pytest.approx(res.val_metrics["auc"], abs=1e-9)
    _, p_plain, _ = training.predict_samples(dataclasses.replace(ck, meta={**ck.meta, "tta": "none"}), splits.val, cfg=cfg)
    assert not np.allclose(p, p_plain, atol=1e-5)


def test_an_ensemble_with_tta_and_bad_settings(dataset, tmp_path):
    from deepcovid import training

    cfg = training.resolve_config({**FAST, "tta": "hflip", "ensemble": [{"seed": 1}, {"seed": 2}]})
    training.fit_ensemble({**cfg, "run_name": "ens"}, dataset, tmp_path)
    ens = load_checkpoint("best", tmp_path)
    assert ens.meta["arch"] == "ensemble" and ens.meta["tta"] == "hflip" and ens.build_model().tta == "hflip"
    for m in ens.meta["members"]:
        assert read_checkpoint(tmp_path / "ens" / "members" / m["run"] / "best.safetensors").meta["tta"] == "hflip"
    assert json.loads((tmp_path / "ens" / "test_metrics.json").read_text())["n"] == 6

    with pytest.raises(ConfigError, match="unknown --tta 'vflip'; choose from: none, hflip"):
        training.resolve_config({**FAST, "tta": "vflip"})
    frozen = training.resolve_config({**FAST, "freeze": "backbone", "tta": "hflip"})
    with pytest.raises(ConfigError, match="--no-feature-cache"):
        training.fit({**frozen, "run_name": "frozen"}, dataset, tmp_path)
    assert not (tmp_path / "frozen").exists()
