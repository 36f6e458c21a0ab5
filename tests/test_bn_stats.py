"""--bn-stats frozen: BatchNorm layers keep the pretrained running statistics while their scale and
shift train; the default keeps PyTorch's train-mode behaviour."""

import pytest
import torch
from torch import nn

from conftest import FAST_TRAIN
from deepcovid.checkpoint import read_checkpoint
from deepcovid.cli import main
from deepcovid.models import build_model
from deepcovid.training import fit, freeze_bn_stats, resolve_config

STATS = ("running_mean", "running_var")


def test_frozen_layers_normalise_with_their_running_statistics_and_still_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1))
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    bn = model[1]
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    model.train()
    freeze_bn_stats(model)
    assert model.training and not bn.training and model[0].training
    x = torch.randn(6, 3, 8, 8) * 3 + 1
    model(x).sum().backward()
    assert torch.equal(bn.running_mean, torch.full((4,), 0.5)) and torch.equal(bn.running_var, torch.full((4,), 2.0))
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    # the layer used the running statistics, not the batch's
    h = model[0](x)
    expected = (h - 0.5) / torch.sqrt(torch.tensor(2.0) + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(bn(h), expected)


@pytest.mark.parametrize("mode", ["frozen", "update"])
def test_a_run_keeps_or_moves_the_pretrained_statistics(dataset, tmp_path, mode):
    cfg = resolve_config({**FAST_TRAIN, "epochs": 1, "bn_stats": mode})
    fit({**cfg, "run_name": mode}, dataset, tmp_path)
    best = read_checkpoint(tmp_path / mode / "best.safetensors")
    assert best.meta["config"]["bn_stats"] == mode
    start = build_model(cfg["arch"], 2, weights="imagenet", freeze="none").state_dict()
    stats = [k for k in start if k.endswith(STATS)]
    affine = [k[: -len("running_mean")] + "weight" for k in stats if k.endswith("running_mean")]
    assert len(stats) > 40
    same = [torch.equal(best.state_dict[k], start[k]) for k in stats]
    if mode == "frozen":
        assert all(same)
    else:
        assert not any(same)
    assert any(not torch.equal(best.state_dict[k], start[k]) for k in affine)  # scale and shift trained either way


def test_a_bad_value_is_a_usage_error(dataset, tmp_path, capsys):
    rc = main(["train", "--data", str(dataset), "--output", str(tmp_path), "--bn-stats", "fixed"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown --bn-stats 'fixed'; choose from: update, frozen" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
