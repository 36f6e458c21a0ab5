"""--ema: an exponential moving average of the weights is validated, saved as best and resumed."""

import pytest
import torch
from torch import nn

from conftest import FAST_TRAIN, ctrl_c_in_epoch
from deepcovid.checkpoint import read_checkpoint
from deepcovid.cli import main
from deepcovid.data import load_splits
from deepcovid.errors import ConfigError
from deepcovid.metrics import compute_metrics
from deepcovid.training import WeightAverage, fit, predict_samples, resolve_config

FAST = FAST_TRAIN


def test_the_average_follows_timms_warmup_step_by_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    avg = WeightAverage(model, decay=0.6)
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for t in range(1, 7):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        avg.update(model)
        # update t: decay 0 (a copy), then 1 - t^(-2/3) capped at 0.6 (timm's warmup, gamma 1)
        d = 0.0 if t == 1 else min(0.6, 1 - t ** (-2 / 3))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
    assert avg.updates == 6
    got = avg.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got["0.weight"], model.state_dict()["0.weight"])  # it is not the raw model


def test_a_run_validates_and_saves_the_average_and_keeps_the_raw_weights_for_resuming(dataset, tmp_path):
    cfg = resolve_config({**FAST, "epochs": 1, "ema": 0.9})
    res = fit({**cfg, "run_name": "ema"}, dataset, tmp_path)
    best = read_checkpoint(tmp_path / "ema" / "best.safetensors")
    last = read_checkpoint(tmp_path / "ema" / "last.safetensors")
    assert best.meta["config"]["ema"] == 0.9 and last.meta["ema_updates"] == 3  # 24 images, batches of 8
    for k, v in best.state_dict.items():
        assert torch.equal(v, last.extra[f"ema.{k}"]), k  # best is the average...
    assert any(not torch.equal(v, last.state_dict[k]) for k, v in best.state_dict.items() if v.is_floating_point())
    # ...and the validation scores recorded for it are the average's, recomputed from best alone
    splits = load_splits(dataset, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
    y, p, _ = predict_samples(best, splits.val, cfg=cfg)
    assert compute_metrics(y, p, best.meta["classes"], 0.5)["auc"] == pytest.approx(res.val_metrics["auc"], abs=1e-9)

    # the raw trajectory is the one a run without --ema takes
    fit({**resolve_config({**FAST, "epochs": 1}), "run_name": "plain"}, dataset, tmp_path)
    plain = read_checkpoint(tmp_path / "plain" / "last.safetensors")
    assert all(torch.equal(v, last.state_dict[k]) for k, v in plain.state_dict.items())


def test_a_resumed_run_continues_the_average(dataset, tmp_path, monkeypatch):
    import deepcovid.training as tr

    cfg = resolve_config({**FAST, "epochs": 2, "ema": 0.9})
    real = tr.train_one_epoch
    monkeypatch.setattr(tr, "train_one_epoch", ctrl_c_in_epoch(real, 2))
    assert fit({**cfg, "run_name": "halves"}, dataset, tmp_path).interrupted
    saved = read_checkpoint(tmp_path / "halves" / "last.safetensors")
    assert saved.meta["ema_updates"] == 3
    started = []

    def check_start(*a, **k):
        avg = k["ema"]
        started.append(avg.updates)
        for name, v in avg.module.state_dict().items():
            assert torch.equal(v.cpu(), saved.extra[f"ema.{name}"]), name  # the saved average, not a fresh copy
        return real(*a, **k)

    monkeypatch.setattr(tr, "train_one_epoch", check_start)
    fit({"_epochs_explicit": False}, None, tmp_path, resume=tmp_path / "halves")
    assert started == [3] and read_checkpoint(tmp_path / "halves" / "last.safetensors").meta["ema_updates"] == 6


def test_bad_values_and_cached_features_are_refused(dataset, tmp_path, capsys):
    for bad in ("1", "-0.1", "nan"):
        rc = main(["train", "--data", str(dataset), "--output", str(tmp_path), "--ema", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "--ema must be a decay in [0, 1)" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="--no-feature-cache"):
        fit({**resolve_config({**FAST, "freeze": "backbone", "ema": 0.9}), "run_name": "frozen"}, dataset, tmp_path)
    assert not (tmp_path / "frozen").exists()
    with pytest.raises(ConfigError, match="saved without --ema"):
        WeightAverage(nn.Linear(2, 1), 0.9).load_tensors({"optim.0.step": torch.zeros(())}, 3)
