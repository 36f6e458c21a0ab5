"""--drop-path: timm's stochastic depth on the EfficientNet-Lite backbones, active in training only."""

import pytest
import torch
from timm.layers import DropPath

from conftest import FAST_TRAIN
from deepcovid.checkpoint import load_checkpoint
from deepcovid.cli import main
from deepcovid.errors import ConfigError
from deepcovid.models import build_model, check_drop_path
from deepcovid.training import fit, resolve_config


def _rates(model) -> list[float]:
    return [m.drop_prob for m in model.backbone.modules() if isinstance(m, DropPath)]


def test_the_rate_grows_to_the_given_value_and_adds_no_weights():
    plain = build_model("efficientnet_lite0", 2)
    model = build_model("efficientnet_lite0", 2, drop_path=0.2)
    assert _rates(plain) == []
    rates = _rates(model)
    # one per residual block, growing linearly towards 0.2 at the last block (which has no skip)
    assert len(rates) == 15 and rates == sorted(rates) and 0 < rates[0] < 0.02 and 0.15 < rates[-1] < 0.2
    assert plain.state_dict().keys() == model.state_dict().keys()
    plain.load_state_dict(model.state_dict())

    x = torch.randn(4, 3, 64, 64)
    model.eval(), plain.eval()
    with torch.inference_mode():
        assert torch.equal(model(x), plain(x))  # served as built without it
    # training: a block's branch is dropped for some images, so two passes differ even with
    # the head's dropout switched off
    model.train()
    model.head[0].p = 0.0
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("arch,rate,message", [
    ("resnet50", 0.1, "resnet50 has no stochastic depth; it is available for: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"),
    ("efficientnet_lite0", 1.0, "rate in [0, 1)"),
    ("efficientnet_lite0", -0.1, "rate in [0, 1)"),
    ("efficientnet_lite0", "0.1", "rate in [0, 1)"),
    ("efficientnet_lite0", True, "rate in [0, 1)"),
])
def test_bad_rates_and_unsupported_backbones_are_config_errors(arch, rate, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        check_drop_path(arch, rate)
    assert check_drop_path("resnet50", 0) == 0.0  # off is fine everywhere


def test_a_bad_flag_stops_before_anything_is_written(dataset, tmp_path, capsys):
    rc = main(["train", "--data", str(dataset), "--output", str(tmp_path), "--arch", "efficientnet_lite0,resnet50",
               "--drop-path", "0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "resnet50 has no stochastic depth" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_a_run_with_it_trains_stores_the_rate_and_serves_the_plain_model(dataset, tmp_path, monkeypatch):
    import deepcovid.models as models

    seen = []
    real = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: seen.append(k.get("drop_path")) or real(*a, **k))
    cfg = resolve_config({**FAST_TRAIN, "epochs": 1, "drop_path": 0.2})
    fit({**cfg, "run_name": "dp"}, dataset, tmp_path)
    # trained with it; every later build (the test/ report from the checkpoint) is the plain model
    assert seen[0] == 0.2 and len(seen) > 1 and not any(seen[1:])
    ckpt = load_checkpoint("best", tmp_path)
    assert ckpt.meta["config"]["drop_path"] == 0.2
    model = ckpt.build_model().eval()
    assert _rates(model) == []  # inference rebuilds it without stochastic depth: the same function in eval mode
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1)
