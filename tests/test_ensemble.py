"""Ensembles: trained as member runs, saved as one self-describing checkpoint that 'best' finds."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN, make_train_test

from deepcovid.checkpoint import list_checkpoints, load_checkpoint, read_checkpoint
from deepcovid.errors import CheckpointError, ConfigError
from deepcovid.inference import Predictor
from deepcovid.models import EnsembleNet, build_from_meta
from deepcovid.training import PRESETS, fit_ensemble, resolve_config

FAST = {**FAST_TRAIN, "input_size": 64, "epochs": 1}


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    root = make_train_test(tmp_path_factory.mktemp("ds"), 12, 3, size=72)
    out = tmp_path_factory.mktemp("ck")
    cfg = resolve_config({**FAST, "threshold": "0.5", "ensemble": [{"seed": 1}, {"seed": 2, "freeze": "backbone"}]})
    res = fit_ensemble({**cfg, "run_name": "ens"}, root, out)
    return root, out, res


def test_best_resolves_to_the_ensemble_and_it_holds_every_member(ensemble_run):
    root, out, res = ensemble_run
    assert res.run_dir == out / "ens" and not res.interrupted
    assert [c["run"] for c in list_checkpoints(out)] == ["ens"]  # members are not candidates for 'best'
    ens = load_checkpoint("best", out)
    assert ens.meta["arch"] == "ensemble" and ens.meta["threshold"] == 0.5
    assert [m["run"] for m in ens.meta["members"]] == ["m1-efficientnet_lite0", "m2-efficientnet_lite0"]
    for f in ("test_metrics.json", "roc_val.png", "confusion_val.png", "comparison.md"):
        assert (out / "ens" / f).is_file(), f
    assert json.loads((out / "ens" / "test_metrics.json").read_text())["n"] == 6
    # the ensemble's output is the mean of its members' probabilities
    members = [read_checkpoint(out / "ens" / "members" / m["run"] / "best.safetensors").build_model()
               for m in ens.meta["members"]]
    model = ens.build_model()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        want = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
        got = torch.sigmoid(model(x))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(torch.sigmoid(members[0](x)), torch.sigmoid(members[1](x)))


def test_the_ensembles_scores_are_those_of_the_saved_model(ensemble_run, monkeypatch):
    """fit_ensemble averages the members' own validation and test/ outputs instead of running
    the ensemble again: the scores must be what the saved checkpoint gives, recomputed."""
    from deepcovid import training
    from deepcovid.data import load_splits

    root, out, _ = ensemble_run
    ens = load_checkpoint("best", out)
    cfg = ens.meta["config"]
    splits = load_splits(root, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
    y, p, _ = training.predict_samples(ens, splits.val, cfg=cfg)
    recomputed = training.compute_metrics(y, p, ens.meta["classes"], 0.5)
    for k in ("tp", "tn", "fp", "fn"):
        assert recomputed[k] == ens.meta["val_metrics"][k]
    assert recomputed["auc"] == pytest.approx(ens.meta["val_metrics"]["auc"], abs=1e-12)
    reported = json.loads((out / "ens" / "test_metrics.json").read_text())
    again = training.evaluate_on_samples(ens, splits.test, None, "test", cfg=cfg)
    assert {k: again[k] for k in ("tp", "tn", "fp", "fn", "auc", "f1")} == {
        k: reported[k] for k in ("tp", "tn", "fp", "fn", "auc", "f1")}
    # missing or mismatched outputs are not averaged ...
    assert training._mean_outputs([(y, p), None]) is None
    assert training._mean_outputs([(y, p), (1 - y, p)]) is None
    yy, pp = training._mean_outputs([(y, p), (y, 1 - p)])
    assert np.array_equal(yy, y) and np.allclose(pp, 0.5)
    # ... the ensemble itself runs instead (a member's best epoch from before a resume), to the same scores
    fit = training.fit
    monkeypatch.setattr(training, "fit", lambda *a, **k: dataclasses.replace(fit(*a, **k), val_outputs=None,
                                                                             test_outputs=None))
    res = training.fit_ensemble({**cfg, "run_name": "ens-run"}, root, out / "again")
    assert {k: res.val_metrics[k] for k in ("tp", "tn", "fp", "fn")} == {
        k: ens.meta["val_metrics"][k] for k in ("tp", "tn", "fp", "fn")}
    assert res.val_metrics["auc"] == pytest.approx(ens.meta["val_metrics"]["auc"], abs=1e-12)
    assert {k: res.test_metrics[k] for k in ("tp", "tn", "fp", "fn", "auc")} == {
        k: reported[k] for k in ("tp", "tn", "fp", "fn", "auc")}


def test_predictor_explains_an_ensemble_through_every_member(ensemble_run):
    root, out, _ = ensemble_run
    pred = Predictor.from_checkpoint("best", out, device="cpu")
    assert [n.split(".")[0] for n in pred.cam_layer_names] == ["0", "1"]
    img = next((root / "test" / "PNEUMONIA").iterdir())
    p = pred.predict(img)
    e = pred.explain(img, activations=True)
    assert abs(sum(p.probabilities.values()) - 1) < 1e-6
    assert e.probabilities == pytest.approx(p.probabilities, abs=1e-5)
    assert e.cam.shape == (64, 64) and 0 <= e.cam.min() and e.cam.max() <= 1 and e.cam.max() > 0
    assert e.activations and all(name.startswith("0.") for name, _ in e.activations)


def test_bad_ensembles_are_refused():
    with pytest.raises(ConfigError, match="at least two"):
        resolve_config({**FAST, "ensemble": [{"seed": 1}]})
    with pytest.raises(ConfigError, match="unknown --optimizer"):
        resolve_config({**FAST, "ensemble": [{"seed": 1}, {"optimizer": "lbfgs"}]})
    # members that would need different inputs are refused before any of them trains
    no_size = {k: v for k, v in FAST.items() if k != "input_size"}
    with pytest.raises(ConfigError, match="must share input size.*efficientnet_lite1: 240 px.*set --input-size"):
        resolve_config({**no_size, "arch": "efficientnet_lite0", "ensemble": [{}, {"arch": "efficientnet_lite1"}]})
    with pytest.raises(ConfigError, match="must share input size.*same normalisation"):
        resolve_config({**FAST, "arch": "efficientnet_lite0", "ensemble": [{}, {"arch": "resnet50"}]})  # mean/std
    with pytest.raises(ConfigError, match="must share input size.*efficientnet_lite0: 96 px"):
        resolve_config({**FAST, "ensemble": [{}, {"input_size": 96}]})  # one backbone, two sizes
    cfg = resolve_config({**FAST, "arch": "efficientnet_lite0", "ensemble": [{}, {"arch": "efficientnet_lite1"}]})
    assert [m.get("arch") for m in cfg["ensemble"]] == [None, "efficientnet_lite1"]
    with pytest.raises(ConfigError, match="at least two members"):
        EnsembleNet(["efficientnet_lite0"], 1)
    with pytest.raises(CheckpointError, match="at least two members"):
        build_from_meta({"arch": "ensemble", "classes": ["A", "B"], "members": [{"arch": "resnet50"}]})


def test_model_card_lists_the_members(ensemble_run):
    from deepcovid.webapp import model_card_markdown

    _, out, _ = ensemble_run
    md = model_card_markdown(list_checkpoints(out)[0])
    assert "Ensemble of" in md and "m1-efficientnet_lite0" in md and "m2-efficientnet_lite0" in md


def test_cpu_fast_is_an_ensemble_of_offline_backbones():
    """The README's recipe: Lite0/Lite1/Lite2 members with flip TTA and frozen BatchNorm statistics,
    on one 192 px input, each with ImageNet weights that load without a network (the preset is checked before anything
    trains)."""
    from deepcovid.models import build_model
    from deepcovid.training import member_config

    cfg = resolve_config({}, "cpu-fast")
    assert cfg["tta"] == "hflip"
    members = [member_config(cfg, m) for m in cfg["ensemble"]]
    assert [m["arch"] for m in members] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert [m["epochs"] for m in members] == [1, 1, 1] and {m["input_size"] for m in members} == {192}
    assert [m["seed"] for m in members] == [0, 0, 0] and {m["tta"] for m in members} == {"hflip"}
    assert {m["bn_stats"] for m in members} == {"frozen"}
    for m in members:
        model = build_model(m["arch"], 2, weights="imagenet", freeze=m["freeze"])
        assert model(torch.zeros(1, 3, 192, 192)).shape == (1, 1)
    # flags given explicitly override the preset's members too, but not their backbones; --seed
    # moves every member, and a member's seed_offset on top of it
    cfg = resolve_config({"epochs": 3, "lr": 1e-4, "seed": 2, "tta": "none", "bn_stats": "update"}, "cpu-fast")
    members = [member_config(cfg, m) for m in [*cfg["ensemble"], {"seed_offset": 10}]]
    assert [(m["arch"], m["epochs"], m["lr"], m["seed"], m["tta"], m["bn_stats"]) for m in members] == [
        ("efficientnet_lite0", 3, 1e-4, 2, "none", "update"), ("efficientnet_lite1", 3, 1e-4, 2, "none", "update"),
        ("efficientnet_lite2", 3, 1e-4, 2, "none", "update"), ("efficientnet_lite0", 3, 1e-4, 12, "none", "update")]
    assert PRESETS["cpu-fast"]["epochs"] == 1 and PRESETS["cpu-fast"]["ensemble"][1] == {"arch": "efficientnet_lite1"}  # untouched
    for bad in ({"seed_offset": 1.5}, {"seed_offset": 1, "seed": 3}, {"seed_offset": True}):
        with pytest.raises(ConfigError, match="seed_offset must be an integer"):
            resolve_config({**FAST, "ensemble": [{}, bad]})
