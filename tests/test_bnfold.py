"""BatchNorm folded into the convolutions for serving (deepcovid/bnfold.py, Predictor(fold_bn=...))."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from conftest import make_image_folder, synthetic_xray
from deepcovid import cli
from deepcovid.bnfold import ActAfterFold, fold_batchnorm
from deepcovid.inference import Predictor
from deepcovid.models import build_model, get_spec


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics and affine parameters far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1.0)  # some scales negative
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def batchnorms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def example(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_efficientnet_lite_folds_every_pair_but_the_kept_ones_and_keeps_its_outputs():
    model = randomise_batchnorm(timm.create_model("tf_efficientnet_lite0", num_classes=0))
    x = example()
    with torch.no_grad():
        want = model(x)
    n_bn = len(batchnorms(model))
    report = fold_batchnorm(model, example(48), keep=(model.conv_head,))
    assert report.reverted is None
    assert report.kept == [("conv_head", "bn2")]
    assert len(report.pairs) == n_bn - 1 and ("conv_stem", "bn1") in report.pairs
    assert batchnorms(model) == ["bn2"]  # the kept one, still the BatchNormAct2d it was
    assert isinstance(model.bn1, ActAfterFold) and isinstance(model.bn1.act, nn.ReLU6)
    assert isinstance(model.conv_stem, timm.layers.Conv2dSame) and model.conv_stem.bias is not None
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_torchvision_resnet50_folds_all_of_its_batchnorms():
    model = randomise_batchnorm(torchvision.models.resnet50(weights=None))
    x = example()
    with torch.no_grad():
        want = model(x)
    report = fold_batchnorm(model, x)
    assert report.reverted is None and len(report.pairs) == 53 and batchnorms(model) == []
    assert ("layer1.0.downsample.0", "layer1.0.downsample.1") in report.pairs
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


class SharedOutput(nn.Module):
    """The convolution's output feeds its BatchNorm and, unnormalised, the sum: folding would
    change the second use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedModule(nn.Module):
    """One convolution called twice: folding it would change both calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_a_fold_that_would_change_the_outputs_is_put_back():
    model = randomise_batchnorm(SharedOutput())
    conv, bn = model.conv, model.bn
    x = example(8)
    with torch.no_grad():
        want = model(x)
    report = fold_batchnorm(model, x)
    assert report.pairs == [] and "differ" in report.reverted
    assert model.conv is conv and model.bn is bn  # the very same modules, weights untouched
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_a_module_called_twice_is_not_folded_and_train_mode_is_refused():
    model = randomise_batchnorm(SharedModule())
    report = fold_batchnorm(model, example(8))
    assert report.pairs == [] and report.reverted is None and isinstance(model.bn, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(model.train(), example(8))
    resnet = randomise_batchnorm(torchvision.models.resnet18(weights=None))
    resnet.layer2[0].bn1.train()  # one submodule left in training mode
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(resnet, example())
    assert len(batchnorms(resnet)) == 20


def test_an_error_half_way_puts_every_module_back(monkeypatch):
    import deepcovid.bnfold as bnfold

    model = randomise_batchnorm(torchvision.models.resnet18(weights=None))
    before = {n: m for n, m in model.named_modules()}
    calls = []
    real = bnfold.fuse_conv_bn_eval

    def failing(conv, bn):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(conv, bn)

    monkeypatch.setattr(bnfold, "fuse_conv_bn_eval", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fold_batchnorm(model, example())
    assert len(calls) == 5
    assert {n: m for n, m in model.named_modules()} == before  # the very same module objects


# --- in the Predictor ------------------------------------------------------------------------

META = {"arch": "efficientnet_lite0", "classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA",
        "num_outputs": 1, "input_size": 64, "color_space": "rgb", "threshold": 0.5, "val_metrics": {}}


def predictor(fold_bn: bool) -> Predictor:
    torch.manual_seed(0)
    model = randomise_batchnorm(build_model("efficientnet_lite0", 2, weights="none"))
    dc = get_spec("efficientnet_lite0").data_config
    meta = {**META, "mean": list(dc.mean), "std": list(dc.std)}
    return Predictor(model, meta, device="cpu", num_threads=1, fold_bn=fold_bn)


@pytest.fixture(scope="module")
def xrays() -> list[np.ndarray]:
    return [synthetic_xray(np.random.default_rng(7 + k), 96, positive=k == 1) for k in range(2)]


def test_predictor_folds_by_default_and_explains_as_the_unfolded_model_does(xrays):
    plain, folded = predictor(False), predictor(True)
    assert plain.fold_report is None and len(batchnorms(plain.model)) == 49
    # conv_stem (an activation layer) and conv_head (the CAM layer) keep their BatchNorm
    assert sorted(batchnorms(folded.model)) == ["backbone.bn1", "backbone.bn2"]
    assert len(folded.fold_report.pairs) == 47 and folded.fold_report.reverted is None
    for image in xrays:
        a, b = plain.explain(image, activations=True), folded.explain(image, activations=True)
        assert b.probabilities == pytest.approx(a.probabilities, abs=1e-5)
        assert a.label == b.label
        np.testing.assert_allclose(b.cam, a.cam, atol=1e-3)
        assert [n for n, _ in b.activations] == [n for n, _ in a.activations] == list(plain.activation_layer_names)
        for (_, ga), (_, gb) in zip(a.activations, b.activations):
            assert ga.shape == gb.shape and np.abs(ga.astype(int) - gb.astype(int)).max() <= 2
        assert folded.predict(image).probabilities == pytest.approx(plain.predict(image).probabilities, abs=1e-5)


def test_an_inner_convolution_asked_for_at_explain_time_is_labelled_as_folded(xrays):
    folded = predictor(True)
    name = "blocks.1.0.conv_pwl"  # no activation after it: folded only (see test_prepack)
    e = folded.explain(xrays[0], activations=[name, "blocks.0"])
    assert folded._layer_label(name) == f"{name} (+BatchNorm, folded)"
    assert folded._layer_label("blocks.0") == "blocks.0"
    assert [n for n, _ in e.activations] == [name, "blocks.0"]
    plain = predictor(False)
    assert plain._layer_label(name) == name
    # the title bar differs, so the grids do
    assert not np.array_equal(e.activations[0][1], plain.explain(xrays[0], activations=[name]).activations[0][1])


def test_predict_cli_folds_unless_told_not_to(tiny_checkpoint, tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "imgs", {"NORMAL": 2, "PNEUMONIA": 2})
    seen = []
    build = Predictor.from_checkpoint.__func__

    def spy(cls, *args, **kwargs):
        p = build(cls, *args, **kwargs)
        seen.append((kwargs.get("fold_bn"), p.fold_report))
        return p

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(spy))
    probs = {}
    for name, flags in (("fold", []), ("nofold", ["--no-fold-bn"])):
        out = tmp_path / name
        assert cli.main(["predict", str(folder), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                         "--threads", "1", "--no-cam", *flags]) == 0
        text = (out / "predictions.csv").read_text().splitlines()
        probs[name] = [float(v) for v in (ln.split(",")[-1] for ln in text[1:])]
    assert seen[0][0] is True and seen[0][1].pairs
    assert seen[1] == (False, None)
    np.testing.assert_allclose(probs["fold"], probs["nofold"], atol=1e-5)
