"""Training: ``train_one_epoch``, ``evaluate``, ``fit`` (one backbone), grid search, and the
``deepcovid train`` subcommand.

Shaped after torchvision's ``references/classification/train.py``: plain functions with
explicit arguments, and a ``main(args)``-style ``run``. Every option defaults to ``None`` on
the command line so that the precedence is explicit: built-in defaults < ``--preset`` <
flags given on the command line (< a resumed run's saved config, except ``--epochs``).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write_text, read_checkpoint, save_checkpoint, versions
from .device import PRECISIONS
from .errors import CheckpointError, ConfigError, DataError, check_choice
from .metrics import METRIC_KEYS, best_f1_threshold, bootstrap_ci, compute_metrics, format_ci_list, format_table, recall_threshold
from .models import WithTTA
from .progress import progress

log = logging.getLogger("deepcovid")

PAPER_ARCHS = "resnet50,inception_v3,inception_resnet_v2"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "cosine-step")
DEVICES = ("auto", "cpu", "cuda", "mps")
AUGMENT_ON = ("auto", "loader", "device")

DEFAULTS: dict = {
    "arch": PAPER_ARCHS,
    "weights": "imagenet",
    "freeze": "backbone",
    "epochs": 20,
    "batch_size": 16,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "optimizer": "adam",
    "momentum": 0.9,
    # "cosine": lr decays per epoch from --lr towards 0 at --epochs; "cosine-step": the same curve
    # taken at every optimizer step, so it also decays within an epoch (a one-epoch run ends at 0)
    "schedule": "constant",
    # The decision threshold of a two-class model: "val-f1" (the F1-optimal threshold on the
    # validation split, re-chosen every epoch), "recall=R" (the highest threshold whose validation
    # recall is at least R, also re-chosen every epoch) or a fixed probability such as 0.5.
    "threshold": "val-f1",
    # A list of per-member overrides (e.g. {"freeze": "none"}) makes the run an ensemble: each
    # member trains as its own run, then the mean of their probabilities is the model.
    "ensemble": None,
    # LP-FT (Kumar et al., ICLR 2022): train the head alone on cached backbone features for this
    # many epochs before fine-tuning everything, so the first full-model steps do not distort
    # the pretrained features to fit a random head (better out-of-distribution). 0: off.
    "head_epochs": 0,
    "split_seed": None,      # seed of the train/validation split (None: --seed)
    "patience": 5,
    "val_fraction": 0.1,
    "seed": 0,
    "input_size": None,      # None: the backbone's own config
    "color_space": "rgb",
    # CLAHE clip limit of the model's preprocessing (0: off); stored in the checkpoint, so
    # inference equalises exactly as training did.
    "clahe": 0.0,
    "augment": {},           # AugmentConfig overrides, e.g. {"vflip": 0}
    "no_augment": False,
    "balance": "weighted-loss",
    "label_smoothing": 0.0,
    # MixUp (Zhang et al., ICLR 2018): each training batch becomes convex mixtures of pairs of
    # its images and their labels, mixing weight ~ Beta(alpha, alpha). 0: off.
    "mixup": 0.0,
    # An exponential moving average of the weights (timm's ModelEmaV3 with its warmup: the decay
    # of update t is 1 - t^(-2/3), capped at this value), validated, checkpointed and served in
    # place of the raw weights. 0: off. Not in cpu-fast: on its one-epoch members it raised
    # validation F1 and lowered test/ AUC and specificity (README, "What was measured on the way").
    "ema": 0.0,
    # Stochastic depth (Huang et al., ECCV 2016; timm's drop_path_rate): in training, each
    # residual block's branch is skipped for a random share of the batch's images, at a rate that
    # grows linearly to this value at the last block. 0: off. Lite0's ImageNet training used 0.2.
    "drop_path": 0.0,
    # BatchNorm statistics while fine-tuning: "update" (PyTorch's train mode: each batch is
    # normalised by its own statistics and the running ones drift to the training images') or
    # "frozen" (every BatchNorm layer normalises with the pretrained running statistics, which are
    # kept; its scale and shift still train). In cpu-fast: README, Results, "Frozen BatchNorm statistics".
    "bn_stats": "update",
    # Test-time augmentation of the model (models.TTA_CHOICES): "hflip" averages the image's and
    # its mirror's probabilities in validation, in test/ reports and, from the checkpoint, in
    # every prediction and explanation, so the model chosen is the model served.
    "tta": "none",
    # Mixed precision of the training steps and of the validation passes: "auto" (bf16 autocast on
    # CUDA, fp16 with a GradScaler where bf16 is missing; float32 on the CPU), "fp32", or "bf16"
    # (autocast to bfloat16 on CUDA or the CPU, where oneDNN runs it natively on AVX512-BF16 and
    # AMX cores). Served predictions keep their own --precision (float32 by default).
    "precision": "auto",
    "device": "auto",
    "workers": None,         # None: 0 on CPU (the cores are busy with the model); on CUDA all cores but one
    "cache": "disk",
    "cache_dir": None,
    "positive_class": None,
    "max_train_batches": None,  # cap per epoch (smoke runs and tests)
    "feature_cache": True,   # frozen backbone: compute features once, train the head on them
    "feature_views": 4,      # augmented views cached per image (1 when augmentation is off)
    # torch.compile the training step (CUDA: fewer kernel launches and fused element-wise work;
    # costs a compile of a minute or more at the start, so off by default).
    "compile": False,
    # Where training images are augmented: "loader" (per image, in the DataLoader), "device" (the
    # decoded train split kept on the device, augmented a batch at a time there), or "auto":
    # device on CUDA when the split fits in a quarter of the free GPU memory, else loader.
    "augment_on": "auto",
}

PRESETS: dict[str, dict] = {
    # The Deep Covid preprint's recipe (Table 1 augmentations, Adam 1e-4, batch 16, 20 epochs).
    "paper": {},
    # The 2-core-CPU recipe (README "Results"): an ensemble of three offline-pretrained backbones,
    # EfficientNet-Lite0, -Lite1 and -Lite2, each fully fine-tuned for one epoch at 192 px, with
    # flip TTA. Until 2026-11-27 the members trained at 224 px and Lite0 for two epochs: 35 min on
    # a 2-core AVX2-only CPU, over the 30-minute budget. A sweep of the members at both sizes and
    # both Lite0 lengths (benchmarks/sweep_recipes.py on a GPU, seeds 0-2, validation only; README
    # "Results") chose this one: the best mean validation F1 of the three-backbone ensembles that fit
    # the budget with a margin (96.44 % against 96.13 % for the old recipe); a 192-px epoch takes
    # 0.69-0.77 of a 224-px one there. Members must share one input size (one preprocessing per image).
    # Measured on test/ as a recipe comparison: training longer or fine-tuning only the last blocks fits the train
    # distribution better (validation F1 up) and the shifted test/ distribution worse; the
    # validation-F1 threshold does not transfer either (see README), so the decision threshold is
    # the prior-neutral 0.5 of the class-weighted loss. Label smoothing, no vertical flips,
    # milder rotation, and a +-10 % zoom (the one augmentation change that moved test/ by more
    # than the seed spread: benchmarks/sweep_recipes.py). Members of different backbones beat
    # members that differ only by seed on test/ (README). One epoch each: 2-epoch runs of Lite1 and
    # Lite2 picked epoch 1 on validation F1, and so did Lite0's at 192 px in two seeds of three.
    # Flip TTA (each image and its mirror) on these three members had a higher mean validation F1
    # over seeds 0-2 than a fourth member (a second Lite0, one epoch, seed + 10) with or without
    # TTA (95.28 against 94.92 and 94.87 %), and costs less time than that member (README, Results).
    # No CLAHE: with --clahe 2 the ensemble's validation F1 fell (94.72 -> 94.44 %), so
    # validation does not pick it, though its test/ AUC rose (README, Results).
    # BatchNorm statistics frozen (--bn-stats frozen, since 2026-11-27): over seeds 0-2 on this
    # CPU the ensemble's mean validation F1 rose 94.34 -> 95.34 % (higher at two seeds of three),
    # and its test/ AUC rose at every seed (mean 0.9712 -> 0.9770; README, Results).
    "cpu-fast": {
        "arch": "efficientnet_lite0",
        "weights": "imagenet",
        "freeze": "none",
        "input_size": 192,
        "epochs": 1,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 2e-4,
        "label_smoothing": 0.1,
        "patience": 0,
        "threshold": "0.5",
        "augment": {"rotation": 10.0, "vflip": 0.0, "hue": 0.0, "saturation": 0.0, "blur": 1.0, "blur_p": 0.3,
                    "zoom": 0.1},
        "tta": "hflip",
        "bn_stats": "frozen",
        "ensemble": [{}, {"arch": "efficientnet_lite1"}, {"arch": "efficientnet_lite2"}],
    },
}

BALANCE_CHOICES = ("weighted-loss", "sampler", "none")
BN_STATS = ("update", "frozen")


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

def resolve_config(explicit: dict, preset: str | None = None) -> dict:
    cfg = dict(DEFAULTS)
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown --preset {preset!r}; choose from: {', '.join(PRESETS)}")
        cfg.update(PRESETS[preset])
        cfg["preset"] = preset
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if "augment" in explicit:
        explicit["augment"] = {**cfg.get("augment", {}), **explicit["augment"]}
    if preset and cfg.get("ensemble") and "ensemble" not in explicit:
        # Flags given explicitly override the preset, its members' own settings included (an
        # explicit --epochs reaches every member); each member keeps its backbone.
        cfg["ensemble"] = [{k: v for k, v in m.items() if k == "arch" or k not in explicit} for m in cfg["ensemble"]]
    cfg.update(explicit)
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict) -> None:
    from .models import check_drop_path, check_tta, get_spec, list_archs, parse_freeze
    from .transforms import COLOR_SPACES, AugmentConfig, check_clahe

    for a in str(cfg["arch"]).split(","):
        if a.strip() not in list_archs():
            raise ConfigError(f"unknown arch {a.strip()!r}; choose from: {', '.join(list_archs())}")
        check_drop_path(a.strip(), cfg.get("drop_path", 0.0))
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {cfg['optimizer']!r}; choose from: {', '.join(OPTIMIZERS)}")
    if cfg["schedule"] not in SCHEDULES:
        raise ConfigError(f"unknown --schedule {cfg['schedule']!r}; choose from: {', '.join(SCHEDULES)}")
    threshold_rule(cfg)
    if cfg["device"] not in DEVICES:
        raise ConfigError(f"unknown --device {cfg['device']!r}; choose from: {', '.join(DEVICES)}")
    cfg["precision"] = check_choice(cfg.get("precision", "auto"), PRECISIONS, "--precision")
    if cfg["augment_on"] not in AUGMENT_ON:
        raise ConfigError(f"unknown --augment-on {cfg['augment_on']!r}; choose from: {', '.join(AUGMENT_ON)}")
    if cfg["augment_on"] == "device" and cfg["cache"] == "off":
        raise ConfigError("--augment-on device keeps the decoded images on the device: use --cache disk or memory")
    if cfg["color_space"] not in COLOR_SPACES:
        raise ConfigError(f"unknown --color-space {cfg['color_space']!r}; choose from: {', '.join(COLOR_SPACES)}")
    if cfg["balance"] not in BALANCE_CHOICES:
        raise ConfigError(f"unknown --balance {cfg['balance']!r}; choose from: {', '.join(BALANCE_CHOICES)}")
    for key in ("epochs", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {cfg[key]!r}")
    if not isinstance(cfg["head_epochs"], int) or cfg["head_epochs"] < 0:
        raise ConfigError(f"--head-epochs must be a non-negative integer, got {cfg['head_epochs']!r}")
    if not (isinstance(cfg["lr"], (int, float)) and cfg["lr"] >= 0):
        raise ConfigError(f"--lr must be a non-negative number, got {cfg['lr']!r}")
    if not 0 <= cfg["label_smoothing"] < 0.5:
        raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {cfg['label_smoothing']}")
    if not (isinstance(cfg["mixup"], (int, float)) and math.isfinite(cfg["mixup"]) and cfg["mixup"] >= 0):
        raise ConfigError(f"--mixup must be a non-negative number (Beta alpha; 0: off), got {cfg['mixup']!r}")
    if not (isinstance(cfg["ema"], (int, float)) and 0 <= cfg["ema"] < 1):
        raise ConfigError(f"--ema must be a decay in [0, 1) (0: off), got {cfg['ema']!r}")
    if cfg.get("bn_stats", "update") not in BN_STATS:
        raise ConfigError(f"unknown --bn-stats {cfg['bn_stats']!r}; choose from: {', '.join(BN_STATS)}")
    cfg["tta"] = check_tta(cfg["tta"])  # "HFLIP" -> "hflip": the model compares it as written
    if cfg["input_size"] is not None and int(cfg["input_size"]) < 32:
        raise ConfigError(f"--input-size must be at least 32, got {cfg['input_size']}")
    parse_freeze(cfg["freeze"])
    AugmentConfig.from_dict(cfg["augment"])
    check_clahe(cfg.get("clahe"))
    members = cfg.get("ensemble")
    if members is not None:
        if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
            raise ConfigError("an ensemble needs a list of at least two member configs")
        inputs = []
        for m in members:
            if "ensemble" in m:
                raise ConfigError("ensemble members cannot be ensembles")
            if "seed_offset" in m and ("seed" in m or not isinstance(m["seed_offset"], int) or isinstance(m["seed_offset"], bool)):
                raise ConfigError(f"an ensemble member's seed_offset must be an integer, without a seed of its own; got {m}")
            mcfg = member_config(cfg, m)
            validate_config(mcfg)
            # The ensemble averages members on one input tensor: check now, not after training them.
            dc = get_spec(mcfg["arch"]).data_config
            inputs.append((mcfg["arch"], int(mcfg["input_size"] or dc.input_size), tuple(dc.mean), tuple(dc.std),
                           mcfg["color_space"], check_clahe(mcfg.get("clahe"))))
        if len({v[1:] for v in inputs}) > 1:  # per member: two members of one backbone may differ too
            hint = (" (set --input-size, or an 'input_size' for each member)" if len({v[1] for v in inputs}) > 1
                    else " (choose backbones with the same normalisation)" if len({v[2:4] for v in inputs}) > 1
                    else " (give every member the same colour space and --clahe)")
            raise ConfigError("ensemble members must share input size, mean, std, colour space and CLAHE; got "
                              + "; ".join(f"{a}: {size} px, mean {mean}, std {std}, {cs}, CLAHE {c:g}"
                                          for a, size, mean, std, cs, c in inputs)
                              + hint)


def threshold_rule(cfg: dict) -> float | None:
    """The fixed threshold, or None for a rule that chooses it on validation ('val-f1' or
    'recall=R'); validates either form."""
    value = cfg["threshold"]
    if value == "val-f1" or recall_target(cfg) is not None:
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not 0.0 < t < 1.0:
        raise ConfigError(f"--threshold must be 'val-f1', 'recall=R' or a probability strictly between 0 and 1, got {value!r}")
    return t


def recall_target(cfg: dict) -> float | None:
    """R of the rule 'recall=R' (the highest threshold whose validation recall is at least R), else None."""
    value = str(cfg["threshold"])
    if not value.startswith("recall="):
        return None
    try:
        r = float(value.partition("=")[2])
    except ValueError:
        r = math.nan
    if not 0.0 < r < 1.0:
        raise ConfigError(f"--threshold recall=R needs R strictly between 0 and 1, got {value!r}")
    return r


def choose_threshold(cfg: dict, y, p, binary: bool) -> float | None:
    """The decision threshold a run stores: the fixed one, else the one its rule picks on (y, p)
    (validation): the F1-optimal one, or the highest with recall >= R; None (argmax) for more
    than two classes."""
    if not binary:
        return None
    target = recall_target(cfg)
    if target is not None:
        return recall_threshold(y, p, target)
    fixed = threshold_rule(cfg)
    return fixed if fixed is not None else best_f1_threshold(y, p)


def split_seed(cfg: dict) -> int:
    """The train/validation split's seed: ``split_seed`` when set (ensemble members with their
    own training seed keep the ensemble's split, also on --resume), else ``seed``."""
    return int(cfg["seed"] if cfg.get("split_seed") is None else cfg["split_seed"])


def config_splits(cfg: dict, data_root):
    """The train/validation/test samples a run with this config saw under ``data_root``."""
    from .data import load_splits

    return load_splits(data_root, val_fraction=cfg["val_fraction"], seed=split_seed(cfg),
                       positive_class=cfg.get("positive_class"))


def select_device(name: str = "auto") -> torch.device:
    from .device import resolve_device

    return resolve_device(name)


def default_workers(device: torch.device) -> int:
    """Data-loader processes: none on the CPU, whose cores run the model; on CUDA every core but
    the one that drives the GPU, for when per-image augmentation in the loader feeds it
    (``--augment-on loader``; benchmarks/bench_gpu.py). With augmentation on the device they
    load only the validation batches."""
    if device.type != "cuda":
        return 0
    from .device import available_threads

    return max(1, min(available_threads() - 1, 16))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def autocast_for(device: torch.device, precision: str = "auto"):
    """(autocast context factory, whether a GradScaler is needed) for ``precision`` on ``device``:
    "auto" is AMP on CUDA (bf16 where supported, else fp16 with a GradScaler) and float32
    elsewhere; "fp32" is float32 everywhere; "bf16" is bfloat16 autocast on CUDA or the CPU."""
    precision = check_choice(precision, PRECISIONS, "--precision")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext, False
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16: this GPU has no bfloat16; use --precision auto (fp16) or fp32")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return (lambda: torch.autocast("cuda", dtype=dtype)), dtype == torch.float16
    if device.type == "cpu":
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), False
    raise ConfigError(f"--precision bf16 is not supported on device {device}; use --precision auto or fp32")


# ---------------------------------------------------------------------------------------
# Loss and probabilities
# ---------------------------------------------------------------------------------------

class BinaryLoss(nn.Module):
    """BCE on the positive logit, with a positive-class weight and optional label smoothing."""

    def __init__(self, pos_weight: float | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", torch.tensor([pos_weight]) if pos_weight else None)
        self.smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float().view(-1, 1)
        if self.smoothing:
            t = t * (1 - self.smoothing) + 0.5 * self.smoothing
        return nn.functional.binary_cross_entropy_with_logits(logits.float().view(-1, 1), t, pos_weight=self.pos_weight)


def make_criterion(num_classes: int, class_counts: list[int], balance: str, label_smoothing: float) -> nn.Module:
    """Class imbalance is handled by default with a weighted loss (inverse class frequency)."""
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1)
    if num_classes == 2:
        pos_weight = counts[0] / counts[1] if balance == "weighted-loss" else None
        return BinaryLoss(pos_weight, label_smoothing)
    weight = None
    if balance == "weighted-loss":
        weight = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """(B,1) -> (B,) positive probability; (B,K) -> (B,K) softmax."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)


# ---------------------------------------------------------------------------------------
# One epoch / evaluation
# ---------------------------------------------------------------------------------------

def model_input(x: torch.Tensor, device: torch.device, prepare=None) -> torch.Tensor:
    """A loader batch as the model takes it: on ``device``, through ``prepare`` (uint8 images ->
    normalised float, see ``batch_normalizer``) or else as float (cached activations are
    float16), and channels_last for image batches on CUDA and the CPU."""
    x = x.to(device, non_blocking=True)
    x = prepare(x) if prepare is not None else x.float()
    if device.type in ("cuda", "cpu") and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class BatchMixUp:
    """torchvision's ``v2.MixUp`` on a model-ready batch, with targets in the loss's own format:
    the positive class's share for the one-logit BCE of two classes, the whole (B, K) label
    distribution for cross-entropy. Pairs are neighbours in the batch, so the batch must be
    shuffled (the training loaders are)."""

    def __init__(self, alpha: float, num_classes: int):
        from torchvision.transforms import v2

        self.mix = v2.MixUp(alpha=float(alpha), num_classes=num_classes)
        self.binary = num_classes == 2

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        x, soft = self.mix(x, y)
        if channels_last:  # MixUp's roll returns the default layout
            x = x.contiguous(memory_format=torch.channels_last)
        return x, (soft[:, 1] if self.binary else soft)


def freeze_bn_stats(model: nn.Module) -> None:
    """Put every BatchNorm layer of ``model`` in eval mode, in place: it normalises with its running
    statistics and stops updating them, while its weight and bias keep their gradients.

    Our own three lines rather than timm's ``freeze_batch_norm_2d``: that one swaps in
    ``FrozenBatchNorm2d``, whose scale and shift no longer train and whose state-dict keys change."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_one_epoch(model, loader, criterion, optimizer, device, *, epoch: int, amp=None, scaler=None,
                    max_batches: int | None = None, aux_weight: float = 0.4, desc: str = "train",
                    sync_every: int | None = None, prepare=None, mix=None, ema=None, frozen_bn_stats: bool = False,
                    step_lr=None):
    """One pass over ``loader``; returns (mean loss, labels, probabilities).

    ``step_lr(i, n)``, if given, is the learning rate of the epoch's optimizer step ``i`` (0-based)
    of ``n``, set on every parameter group before that step (``--schedule cosine-step``).

    ``frozen_bn_stats``: BatchNorm layers normalise with their running statistics and leave them
    as they are (``--bn-stats frozen``); their affine weights still train.

    ``ema`` (a :class:`WeightAverage`) is updated from ``model`` after every optimizer step.

    ``mix`` (a :class:`BatchMixUp`) trains on mixed batches; the returned probabilities are then
    the model's on the mixtures, against each image's own label.

    The loss check and the progress bar read the loss on the host every ``sync_every`` batches
    (default: every batch on the CPU, where reading is free; every 20 on an accelerator, where
    each read waits for the device and stops the host from queueing the next step).
    ``prepare`` turns a batch on the device into the model's input (``batch_normalizer``)."""
    model.train()
    if frozen_bn_stats:
        freeze_bn_stats(model)
    amp = amp or nullcontext
    sync_every = sync_every or (1 if device.type == "cpu" else 20)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)  # MPS has no float64
    n = 0
    all_probs, all_labels = [], []
    total_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = progress(loader, total=total_batches, desc=f"{desc} epoch {epoch}", unit="batch", leave=False)

    def check(loss_sum: torch.Tensor) -> None:
        mean = loss_sum.item() / max(n, 1)
        if not math.isfinite(mean):
            raise FloatingPointError(f"loss became {mean} at epoch {epoch}; lower --lr")
        bar.set_postfix(loss=f"{mean:.4f}")

    for i, (x, y) in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        x = model_input(x, device, prepare)
        y = y.to(device, non_blocking=True)
        target = y
        if mix is not None and len(y) > 1:
            x, target = mix(x, y)
        with amp():
            out = model(x)
            if isinstance(out, tuple):  # InceptionV3 in training: (logits, aux_logits)
                logits, aux = out
                loss = criterion(logits, target) + aux_weight * criterion(aux, target)
            else:
                logits = out
                loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        if step_lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = step_lr(i, total_batches)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach() * len(y)
        n += len(y)
        all_probs.append(logits_to_probs(logits.detach()))
        all_labels.append(y)
        if (i + 1) % sync_every == 0:
            check(loss_sum)
    check(loss_sum)
    bar.close()
    return loss_sum.item() / max(n, 1), torch.cat(all_labels).cpu().numpy(), torch.cat(all_probs).cpu().numpy()


def evaluate(model, loader, criterion, device, *, amp=None, desc: str = "val", prepare=None):
    """Returns (mean loss, labels, probabilities) under ``torch.inference_mode``."""
    model.eval()
    amp = amp or nullcontext
    total, n = 0.0, 0
    all_probs, all_labels = [], []
    with torch.inference_mode():
        for x, y in progress(loader, desc=desc, unit="batch", leave=False):
            x = model_input(x, device, prepare)
            y = y.to(device, non_blocking=True)
            with amp():
                logits = model(x)
            if criterion is not None:
                total += criterion(logits, y).item() * len(y)
            n += len(y)
            all_probs.append(logits_to_probs(logits).cpu())
            all_labels.append(y.cpu())
    return total / max(n, 1), torch.cat(all_labels).numpy(), torch.cat(all_probs).numpy()


class WeightAverage:
    """timm's ``ModelEmaV3`` (with warmup) and the count of its updates, which ModelEmaV3 takes
    from the caller for the warmup and which a resumed run must continue from. ``module`` is the
    averaged model."""

    def __init__(self, model: nn.Module, decay: float):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True)
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, model: nn.Module) -> None:
        self.updates += 1
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd model's own module
        self.ema.update(getattr(model, "whole", model), step=self.updates)  # a ServedFrozen's model

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not state:
            raise ConfigError("this run's last checkpoint holds no weight average: it was saved without --ema")
        self.module.load_state_dict(state)
        self.updates = int(updates)


# ---------------------------------------------------------------------------------------
# Optimizer state as safetensors-friendly tensors + JSON
# ---------------------------------------------------------------------------------------

def optimizer_to_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def lr_at(cfg: dict, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The learning rate of ``epoch`` (1-based) at its optimizer step ``step`` (0-based; only
    "cosine-step" reads it). A pure function of the config, not a stateful scheduler object, so
    that a resumed run continues on exactly the same curve."""
    if cfg["schedule"] == "cosine":
        return cfg["lr"] * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(cfg["epochs"], 1)))
    if cfg["schedule"] == "cosine-step":
        steps = max(steps_per_epoch, 1)
        done = (epoch - 1) * steps + min(step, steps)
        return cfg["lr"] * 0.5 * (1.0 + math.cos(math.pi * done / (max(cfg["epochs"], 1) * steps)))
    return cfg["lr"]


def make_optimizer(params, cfg: dict):
    name = cfg["optimizer"]
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"] or 0.01)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    raise ConfigError(f"unknown optimizer {name!r}")


# ---------------------------------------------------------------------------------------
# Fitting one backbone
# ---------------------------------------------------------------------------------------

HISTORY_FIELDS = ["epoch", "lr", "seconds"] + [f"train_{k}" for k in ("loss", "accuracy", "precision", "recall", "f1", "auc")] \
    + [f"val_{k}" for k in ("loss", "accuracy", "precision", "recall", "f1", "auc")] + ["val_threshold", "val_f1_at_threshold"]


@dataclass
class FitResult:
    run_dir: Path
    arch: str
    best_epoch: int
    val_metrics: dict
    test_metrics: dict | None
    interrupted: bool = False
    # (labels, probabilities) of the best checkpoint on validation and on test/, as computed
    # during the run (None when not computed in this process, e.g. a best epoch from before a resume)
    val_outputs: tuple[np.ndarray, np.ndarray] | None = None
    test_outputs: tuple[np.ndarray, np.ndarray] | None = None


def _write_history(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(run_dir / "history.csv", buf.getvalue())


def batch_normalizer(mean, std, color_space: str):
    """uint8 (B,3,H,W) on any device -> the model's normalised float input."""
    from .transforms import normalize

    return functools.partial(normalize, mean=mean, std=std, color_space=color_space)


def augment_on(cfg: dict, device: torch.device, images, feature_cached: bool = False) -> str:
    """"loader" or "device" for this run (see DEFAULTS["augment_on"]). A run that trains on
    cached features never iterates image batches: nothing is copied to the device for it."""
    if feature_cached:
        return "loader"
    if cfg["augment_on"] != "auto":
        return cfg["augment_on"]
    if device.type != "cuda" or cfg["cache"] == "off":
        return "loader"
    need = len(images) * images.size * images.size * 3
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if need <= free // 4 else "loader"


def _loaders(splits, spec_cfg: dict, cfg: dict, device: torch.device, images_train, images_val,
             feature_cached: bool = False):
    """(train loader, val loader, augmentation config, prepare, order generator): the loaders
    yield uint8 images (the device-kept train batches: augmented float ones), which ``prepare``
    normalises where the model runs."""
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from .data import DeviceBatches, XRayDataset
    from .transforms import AugmentConfig, BatchAugment, build_augment, build_negative_augment

    aug_cfg = AugmentConfig.off() if cfg["no_augment"] else AugmentConfig.from_dict(cfg["augment"])
    size = spec_cfg["input_size"]
    mean, std = spec_cfg["mean"], spec_cfg["std"]
    # The per-image dataset also serves the feature cache and LP-FT's head epochs.
    train_ds = XRayDataset(images_train, mean, std, cfg["color_space"], build_augment(aug_cfg, size), normalize=False,
                           negative_augment=build_negative_augment(aug_cfg))
    val_ds = XRayDataset(images_val, mean, std, cfg["color_space"], None, normalize=False)
    workers = cfg["workers"] if cfg["workers"] is not None else default_workers(device)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    g = torch.Generator().manual_seed(cfg["seed"])
    weights = None
    if cfg["balance"] == "sampler":
        labels = np.array(train_ds.labels)
        weights = 1.0 / np.bincount(labels)[labels]
    drop_last = len(train_ds) > cfg["batch_size"]
    prepare = batch_normalizer(mean, std, cfg["color_space"])
    where = augment_on(cfg, device, images_train, feature_cached)
    log.info("training images augmented %s", "on the device, a batch at a time" if where == "device"
             else f"per image in the loader ({workers} worker processes)")
    if where == "device":
        # augmented by the loader, where each batch's labels are (``neg_blur`` and ``neg_zoom`` need them)
        train_loader = DeviceBatches(images_train, cfg["batch_size"], device, generator=g, drop_last=drop_last,
                                     weights=weights, dataset=train_ds, augment=BatchAugment(aug_cfg, size))
    else:
        sampler = None if weights is None else WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double),
                                                                     len(weights), generator=g)
        train_loader = DataLoader(train_ds, batch_size=cfg["batch_size"], shuffle=sampler is None, sampler=sampler,
                                  generator=g, drop_last=drop_last, **common)
    val_loader = DataLoader(val_ds, batch_size=cfg["batch_size"] * 2, shuffle=False, **common)
    return train_loader, val_loader, aug_cfg, prepare, g


# The feature cache's batch on a CPU. Its activations must stay near the caches: the frozen
# efficientnet_lite0 at 224 px took 9-10 ms an image in batches of 8-16 and 14-18 ms in batches
# of 64 served, 18-21 and 31 ms as trained (2-core AVX2 CPU, 2026-12-06). A GPU takes twice the
# training batch.
CPU_EXTRACT_BATCH = 16

# How cached features are computed (``serve_frozen``): part of their identity, so that
# features computed another way (float rounding apart) are not mixed with these.
FEATURE_EXTRACTION = "served-v1"


def _feature_key(cfg: dict, arch: str, input_size: int, data_meta: dict, aug_cfg) -> str | None:
    """Identity of a feature cache: data, backbone weights, preprocessing, augmentation, views."""
    if cfg["cache"] != "disk":
        return None
    w = str(cfg["weights"])
    if w not in ("imagenet", "none") and os.path.exists(w):
        st = os.stat(w)
        w = f"{os.path.abspath(w)}:{st.st_size}:{st.st_mtime_ns}"
    if w == "none":
        return None  # random weights differ per seed; not worth caching
    ident = json.dumps([data_meta["fingerprint"], arch, str(cfg["freeze"]), w, input_size, cfg["color_space"], float(cfg.get("clahe") or 0.0), aug_cfg.to_dict(),
                        cfg["feature_views"], cfg["seed"], cfg["no_augment"], FEATURE_EXTRACTION], sort_keys=True)
    import hashlib

    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def serve_frozen(prefix: nn.Module, example: torch.Tensor, amp, purpose: str = "caching") -> nn.Module:
    """A copy of a model's frozen layers rewritten as the ``Predictor`` serves a model (BatchNorm
    folded, no 'same' padding copy, and on a CPU in float32 the convolution weights packed with
    their ReLUs fused: ``serving.serve``), each rewrite checked on ``example`` (a model input). The
    same outputs to float rounding, in less time than the layers as trained: 1.1-1.5x for a cached
    run's one pass, 1.3-1.5x for an uncached run's epoch (efficientnet_lite0, 450 images at 224 px,
    this project's 2-core CPU; benchmarks/bench_training.py --only-feature-cache). The model's own
    layers are not touched. Used for the feature cache's one pass, and by an uncached frozen run
    (``ServedFrozen``) in every epoch."""
    import copy

    layers, report = _serve(copy.deepcopy(prefix).eval().requires_grad_(False), example, example.device, amp)
    log.info("frozen layers served for %s: %d BatchNorm folded, %d convolutions packed, %d activations fused",
             purpose, len(report.fold.pairs), len(report.prepacked), len(report.fused))
    return layers


def _serve(model: nn.Module, example: torch.Tensor, device: torch.device, amp):
    """``serving.serve`` for a model that runs under ``amp`` on ``device``: channels_last on a CPU or
    CUDA, weights packed only where no autocast runs (packed weights serve float32 calls only)."""
    from .serving import serve

    with amp():
        autocast = torch.is_autocast_enabled(device.type)
    return serve(model, example, device, channels_last=device.type in ("cpu", "cuda"), prepack=not autocast)


def _example_input(dataset, device, prepare) -> torch.Tensor:
    """The first image of ``dataset`` as the model takes it, to check ``serve_frozen``'s rewrites on."""
    return model_input(torch.as_tensor(dataset[0][0])[None], device, prepare)


class ServedFrozen(WithTTA, nn.Module):
    """What an uncached run with frozen layers trains and validates: a served copy of the frozen
    part (``serve_frozen``), run without autograd, then the model's own trainable rest (shared).

    A run whose frozen outputs cannot be cached (``--mixup``, ``--tta``, ``--ema`` or
    ``--no-feature-cache`` with ``--freeze`` other than none) computes the frozen layers every
    epoch; this way they cost what the cache's one pass costs per image. ``whole`` is the model
    itself (not a submodule): its state dict is what is saved, and what ``--ema`` averages."""

    def __init__(self, model: nn.Module, frozen: nn.Module, rest: nn.Module):
        super().__init__()
        self.frozen, self.rest = frozen, rest
        self.tta, self.num_outputs = model.tta, model.num_outputs
        self._whole = (model,)

    @property
    def whole(self) -> nn.Module:
        return self._whole[0]

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        return self.rest(x)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # frozen layers keep their statistics, as the model's own do
        return self


def serves_frozen_every_epoch(cfg: dict, feature_cached: bool) -> bool:
    """Whether an uncached run runs its frozen layers served (``ServedFrozen``). Not with
    ``--compile`` (the packed convolutions are eager-only) nor ``--drop-path`` (stochastic depth
    would act in the frozen blocks while training, and served layers are in eval mode)."""
    return not feature_cached and not cfg["compile"] and not cfg.get("drop_path")


class FeatureCache:
    """Outputs of the frozen part of the model (pooled features when only the head trains, the
    boundary activations when the last N blocks train) for every training image (``views``
    augmented copies) and every validation image. Activation maps are kept in float16 to halve
    their memory; optionally persisted as safetensors."""

    def __init__(self, train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor):
        self.train, self.train_y, self.val, self.val_y = train, train_y, val, val_y

    @staticmethod
    def _extract(prefix, dataset, device, amp, batch_size: int, desc: str, prepare=None) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.utils.data import DataLoader
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        feats, labels = [], []
        prefix.eval()
        with torch.inference_mode():
            for x, y in progress(loader, desc=desc, unit="batch", leave=False):
                x = model_input(x, device, prepare)
                with amp():
                    out = prefix(x)
                feats.append((out.half() if out.dim() == 4 else out.float()).cpu().contiguous())
                labels.append(torch.as_tensor(y))
        return torch.cat(feats), torch.cat(labels)

    @classmethod
    def build(cls, prefix, train_ds, val_ds, cfg: dict, device, amp, cache_key: str | None = None,
              prepare=None) -> "FeatureCache":
        from .data import default_cache_dir

        path = None
        if cache_key:
            path = Path(cfg["cache_dir"] or default_cache_dir()) / f"features-{cache_key}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file

                try:
                    t = load_file(str(path))
                    log.info("using cached backbone features %s", path)
                    return cls(t["train"], t["train_y"], t["val"], t["val_y"])
                except Exception:  # a damaged cache is recomputed, never trusted
                    log.warning("ignoring unreadable feature cache %s", path)
        # More views than epochs would compute features that no epoch uses.
        views = 1 if cfg["no_augment"] else max(1, min(int(cfg["feature_views"]), int(cfg["epochs"])))
        bs = CPU_EXTRACT_BATCH if device.type == "cpu" else cfg["batch_size"] * 2
        prefix = serve_frozen(prefix, _example_input(val_ds if len(val_ds) else train_ds, device, prepare), amp)
        train_views = []
        log.info("caching the frozen layers' outputs: %d view(s) of %d training images, then %d validation images",
                 views, len(train_ds), len(val_ds))
        for v in range(views):
            seed_everything(cfg["seed"] * 7919 + v)  # each view's augmentations are repeatable
            f, y = cls._extract(prefix, train_ds, device, amp, bs, f"features view {v + 1}/{views}", prepare)
            train_views.append(f)
        val, val_y = cls._extract(prefix, val_ds, device, amp, bs, "features val", prepare)
        fc = cls(torch.stack(train_views), y, val, val_y)
        if path is not None:
            from safetensors.torch import save

            from .checkpoint import atomic_write_bytes

            atomic_write_bytes(path, save({"train": fc.train, "train_y": fc.train_y, "val": fc.val, "val_y": fc.val_y}))
        return fc

    def loaders(self, cfg: dict, device, generator: torch.Generator | None = None):
        """(epoch -> train loader over view (epoch-1) % views, val loader). ``generator`` (a fresh
        one seeded with ``cfg["seed"]`` if None) draws every epoch's order."""
        from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

        # Same generator and batch layout as the image loaders, so a seeded run sees the same
        # order of samples and the cached path reproduces the uncached one.
        g = torch.Generator().manual_seed(cfg["seed"]) if generator is None else generator
        n = len(self.train_y)
        loaders = []
        for v in range(self.train.shape[0]):
            ds = TensorDataset(self.train[v], self.train_y)
            sampler = None
            if cfg["balance"] == "sampler":
                labels = self.train_y.numpy()
                w = 1.0 / np.bincount(labels)[labels]
                sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), n, generator=g)
            loaders.append(DataLoader(ds, batch_size=cfg["batch_size"], shuffle=sampler is None, sampler=sampler,
                                      generator=g, drop_last=n > cfg["batch_size"]))
        val = DataLoader(TensorDataset(self.val, self.val_y), batch_size=cfg["batch_size"] * 2, shuffle=False)
        return (lambda epoch: loaders[(epoch - 1) % len(loaders)]), val


def linear_probe(model, train_ds, val_ds, criterion, eval_criterion, cfg: dict, device, amp, prepare=None) -> None:
    """The LP of LP-FT: train ``model.head`` alone for ``cfg["head_epochs"]`` epochs on pooled
    backbone features computed once (one augmented view), before the whole model fine-tunes."""
    prefix, head = model.split_frozen("backbone")
    n = int(cfg["head_epochs"])
    feats = FeatureCache.build(prefix, train_ds, val_ds, {**cfg, "feature_views": 1, "epochs": n}, device, amp,
                               prepare=prepare)
    train_loader, val_loader = feats.loaders(cfg, device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    for epoch in range(1, n + 1):
        train_one_epoch(head, train_loader(epoch), criterion, optimizer, device, epoch=epoch, amp=amp, desc="head")
        va_loss, _, _ = evaluate(head, val_loader, eval_criterion, device, amp=amp, desc="head val")
        log.info("head-only epoch %d/%d (LP-FT)  val loss %.4f", epoch, n, va_loss)


# Plots are refreshed at most this often during training (and always at the end): a
# matplotlib figure costs about 0.2 s, as much as a whole head-only epoch on cached features,
# and the three of them plus matplotlib's import 2.7 s of a 14 s head-only run.
PLOT_EVERY_S = 30.0
# The state of the generator that orders the training batches, saved with ``last``.
ORDER_RNG_KEY = "loader.order_rng"

# ``last`` (the resume point) is written to disk at most this often, and always at the end, on
# Ctrl-C and on an error: between writes the finished epoch is kept as an in-memory copy. Writing
# it (serialise + SHA-256 + fsync of the model and optimizer) cost more than a whole cached
# head-only epoch; a hard kill loses at most this many seconds of training.
LAST_EVERY_S = 30.0


def _write_plots(run_dir: Path, history: list[dict], best_outputs, classes: list[str], arch: str) -> None:
    from .plots import plot_confusion, plot_curves, plot_roc

    plot_curves(history, run_dir / "curves.png")
    if best_outputs is None:
        return
    epoch, y, p, threshold = best_outputs
    if len(classes) == 2:
        plot_roc(y, p, run_dir / "roc_val.png", f"ROC, validation ({arch}, epoch {epoch})")
        y_pred = (p >= threshold).astype(int)
    else:
        y_pred = p.argmax(1)
    plot_confusion(y, y_pred, classes, run_dir / "confusion_val.png",
                   f"Validation, epoch {epoch}" + (f", threshold {threshold:.3f}" if threshold is not None else ""))


def _run_name(cfg: dict, arch: str) -> str:
    return cfg.get("run_name") or f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{arch}"


def fit(cfg: dict, data_root: Path, output: Path, *, arch: str | None = None, resume: Path | None = None,
        splits=None) -> FitResult:
    """Train one backbone; write the run folder; return the best validation metrics."""
    from .device import opencv_single_threaded_forks

    try:
        with opencv_single_threaded_forks():  # its loader workers (README, --workers)
            return _fit(cfg, data_root, output, arch=arch, resume=resume, splits=splits)
    finally:
        _detach_log_file()  # the run's train.log must not outlive the run (or its folder)


def _fit(cfg: dict, data_root: Path, output: Path, *, arch: str | None, resume: Path | None, splits) -> FitResult:
    from .data import DecodedImages, counts
    from .models import build_model, get_spec, parse_freeze
    start_epoch, history, best, resume_state = 1, [], None, None
    if resume is not None:
        run_dir = Path(resume)
        last = read_checkpoint(run_dir / "last.safetensors")
        saved = {**DEFAULTS, **last.meta["config"]}  # options added since the run was saved keep their defaults
        # --epochs may extend a resumed run; everything else comes from the saved run.
        saved["epochs"] = max(cfg.get("epochs") or saved["epochs"], saved["epochs"]) if cfg.get("_epochs_explicit") else saved["epochs"]
        cfg = saved
        arch = cfg["arch"]
        data_root = Path(last.meta["data"]["root"])
        resume_state = last
        start_epoch = int(last.meta["epoch"]) + 1
        history = list(last.meta.get("history", []))
        best = last.meta.get("best")
    arch = arch or cfg["arch"]
    cfg = {**cfg, "arch": arch}
    seed_everything(cfg["seed"])
    device = select_device(cfg["device"])
    if device.type == "cpu":
        from .device import available_threads

        torch.set_num_threads(available_threads())

    if splits is None:
        splits = config_splits(cfg, data_root)
    classes = splits.classes
    spec = get_spec(arch)
    dc = spec.data_config
    input_size = int(cfg["input_size"] or dc.input_size)
    spec_cfg = {"input_size": input_size, "mean": list(dc.mean), "std": list(dc.std)}

    # Build the model before decoding data: a failed weights download should fail fast.
    model = build_model(arch, len(classes), weights="none" if resume_state else cfg["weights"], freeze=cfg["freeze"],
                        drop_path=cfg.get("drop_path", 0.0))
    if resume_state is not None:
        model.load_state_dict(resume_state.state_dict)
    feature_cached = bool(cfg["feature_cache"]) and model.split_frozen(cfg["freeze"]) is not None
    if cfg["mixup"] and feature_cached:
        raise ConfigError("--mixup mixes images, but this run trains on cached outputs of the frozen layers: "
                          "add --no-feature-cache, or fine-tune the whole model (--freeze none)")
    if cfg["tta"] != "none" and feature_cached:
        raise ConfigError(f"--tta {cfg['tta']} validates on each image's views, but this run validates on cached outputs "
                          "of the frozen layers: add --no-feature-cache, or fine-tune the whole model (--freeze none)")
    if cfg["ema"] and feature_cached:
        raise ConfigError("--ema averages the whole model's weights, but this run trains on cached outputs of the frozen "
                          "layers: add --no-feature-cache, or fine-tune the whole model (--freeze none)")
    model.tta = cfg["tta"]  # validation and the test/ report see the model as it will be served

    if resume is None:
        run_dir = Path(output) / _run_name(cfg, arch)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run folder {run_dir} already exists; choose another --run-name or use --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    _attach_log_file(run_dir)
    log.info("run folder: %s", run_dir)

    cache_dir = Path(cfg["cache_dir"]) if cfg["cache_dir"] else None
    img_train = DecodedImages(splits.train, input_size, cfg["cache"], cache_dir, desc="decoding train", clahe=cfg.get("clahe"))
    img_val = DecodedImages(splits.val, input_size, cfg["cache"], cache_dir, desc="decoding val", clahe=cfg.get("clahe"))
    if len(img_train) == 0 or len(img_val) == 0:
        raise DataError("no readable training or validation images left after skipping unreadable files")
    train_counts, val_counts = counts(img_train.samples, classes), counts(img_val.samples, classes)
    for name, c in (("train", train_counts), ("val", val_counts)):
        if min(c.values()) == 0:
            raise DataError(f"the {name} split has no readable images of class(es) {[k for k, v in c.items() if v == 0]}")
    log.info("classes %s (positive: %s); validation %s", classes, splits.positive_class, splits.val_source)
    log.info("train %s | val %s%s", train_counts, val_counts,
             f" | skipped {len(img_train.bad) + len(img_val.bad)} unreadable" if img_train.bad or img_val.bad else "")

    data_meta = {**splits.describe(), "train_counts": train_counts, "val_counts": val_counts,
                 "skipped": img_train.bad + img_val.bad}
    train_loader, val_loader, aug_cfg, prepare, order_rng = _loaders(
        splits, spec_cfg, cfg, device, img_train, img_val, feature_cached)
    criterion = make_criterion(len(classes), list(train_counts.values()), cfg["balance"], cfg["label_smoothing"]).to(device)
    eval_criterion = make_criterion(len(classes), list(train_counts.values()), cfg["balance"], 0.0).to(device)
    if device.type in ("cuda", "cpu"):
        # channels_last: cuDNN's tensor-core kernels, and oneDNN's fast depthwise/1x1 convs on
        # CPU (measured 2.3x on efficientnet_lite0's forward on this 2-core machine).
        model = model.to(device, memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = device.type == "cuda"
    else:
        model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    if resume_state is not None and "optimizer" in resume_state.meta:
        optimizer_from_tensors(optimizer, resume_state.extra, resume_state.meta["optimizer"])
    amp, use_scaler = autocast_for(device, cfg.get("precision", "auto"))
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    if cfg["head_epochs"] and resume_state is None and parse_freeze(cfg["freeze"]) != "backbone":
        linear_probe(model, train_loader.dataset, val_loader.dataset, criterion, eval_criterion, cfg, device, amp, prepare)
    mix = BatchMixUp(cfg["mixup"], len(classes)) if cfg["mixup"] else None
    ema = None
    if cfg["ema"]:
        # Started after the linear probe, from the weights that fine-tuning starts from.
        ema = WeightAverage(model, cfg["ema"])
        if resume_state is not None:
            ema.load_tensors(resume_state.extra, resume_state.meta.get("ema_updates", 0))
    step_model = model
    split = model.split_frozen(cfg["freeze"]) if feature_cached else None
    if split is not None:
        # The frozen part's output for an image never changes during training: compute it once
        # per (augmented) view, then train only the rest on it (benchmarks/bench_training.py).
        prefix, step_model = split
        feats = FeatureCache.build(prefix, train_loader.dataset, val_loader.dataset, cfg, device, amp,
                                   cache_key=_feature_key(cfg, arch, input_size, data_meta, aug_cfg), prepare=prepare)
        train_loader, val_loader = feats.loaders(cfg, device, generator=order_rng)
        prepare = None  # cached outputs are already what the trained part takes
    elif serves_frozen_every_epoch(cfg, feature_cached) and (split := model.split_frozen(cfg["freeze"])) is not None:
        example = _example_input(val_loader.dataset, device, prepare)  # validation is never empty here
        step_model = ServedFrozen(model, serve_frozen(split[0], example, amp, "every epoch"), split[1])

    if resume_state is not None and ORDER_RNG_KEY in resume_state.extra:
        # The loaders draw each epoch's order from one generator that advances epoch by epoch;
        # a resumed run continues from its saved state, so it sees the orders an uninterrupted
        # run would (per-epoch seeds cover augmentation and dropout). Older runs lack it.
        try:
            order_rng.set_state(resume_state.extra[ORDER_RNG_KEY])
        except (RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{run_dir}/last.safetensors holds no valid batch-order state ({exc})") from exc
    # Only the training step is compiled: evaluation (other mode, other batch sizes) would
    # recompile, and the checkpoint saves the plain module's names.
    train_model = torch.compile(step_model) if cfg["compile"] else step_model
    resolved = {**cfg, "input_size": input_size, "augment": aug_cfg.to_dict(), "classes": classes,
                "positive_class": splits.positive_class}
    atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    base_meta = {
        "arch": arch, "classes": classes, "positive_class": splits.positive_class, "num_outputs": model.num_outputs,
        "input_size": input_size, "mean": spec_cfg["mean"], "std": spec_cfg["std"], "color_space": cfg["color_space"],
        "clahe": img_train.clahe, "tta": cfg["tta"], "config": cfg, "versions": versions(), "data": data_meta,
        "run": run_dir.name,
    }
    binary = len(classes) == 2
    bad_epochs = 0 if best is None else int(best.get("bad_epochs", 0))
    best_val_loss = math.inf if best is None else float(best.get("best_val_loss", math.inf))
    interrupted = False
    # validation outputs of a new best epoch, not yet plotted; the first plots come once training has
    # run PLOT_EVERY_S (after the first epoch, when epochs are longer) or at the end
    best_outputs, last_plot = None, time.perf_counter()
    best_val = None  # the best epoch's validation (labels, probabilities), for an ensemble's mean
    pending_last, last_saved = None, -math.inf  # a finished epoch's resume point not yet on disk
    epochs_bar = progress(range(start_epoch, cfg["epochs"] + 1), desc=arch, unit="epoch",
                      initial=start_epoch - 1, total=cfg["epochs"])
    try:
        for epoch in epochs_bar:
            seed_everything(cfg["seed"] * 1000 + epoch)  # per-epoch seeds make resumed runs repeatable
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch)
            t0 = time.perf_counter()
            epoch_loader = train_loader(epoch) if callable(train_loader) else train_loader
            step_lr = functools.partial(lr_at, cfg, epoch) if cfg["schedule"] == "cosine-step" else None
            tr_loss, tr_y, tr_p = train_one_epoch(train_model, epoch_loader, criterion, optimizer, device, epoch=epoch,
                                                  amp=amp, scaler=scaler, max_batches=cfg["max_train_batches"],
                                                  prepare=prepare, mix=mix, ema=ema,
                                                  frozen_bn_stats=cfg.get("bn_stats") == "frozen", step_lr=step_lr)
            served = ema.module if ema is not None else step_model  # what is validated is what is saved as best
            va_loss, va_y, va_p = evaluate(served, val_loader, eval_criterion, device, amp=amp, prepare=prepare)
            threshold = choose_threshold(cfg, va_y, va_p, binary)
            tr_m = compute_metrics(tr_y, tr_p, classes, 0.5)
            va_m05 = compute_metrics(va_y, va_p, classes, 0.5)
            va_m = compute_metrics(va_y, va_p, classes, threshold)
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                   "train_loss": tr_loss, **{f"train_{k}": tr_m[k] for k in ("accuracy", "precision", "recall", "f1", "auc")},
                   "val_loss": va_loss,
                   **{f"val_{k}": va_m05[k] for k in ("accuracy", "precision", "recall", "f1", "auc")},
                   "val_threshold": threshold if threshold is not None else float("nan"), "val_f1_at_threshold": va_m["f1"]}
            history.append(row)
            _write_history(run_dir, history)

            improved = best is None or va_m["f1"] > best["f1"] + 1e-12 or (
                abs(va_m["f1"] - best["f1"]) <= 1e-12 and va_loss < best["loss"])
            val_metrics = {**{k: va_m[k] for k in METRIC_KEYS}, "loss": va_loss}
            if "per_class" in va_m:
                val_metrics["per_class"] = va_m["per_class"]
            if improved:
                best = {"epoch": epoch, "f1": va_m["f1"], "loss": va_loss}
                meta = {**base_meta, "threshold": threshold, "val_metrics": val_metrics, "epoch": epoch,
                        "val_metrics_at_0.5": {k: va_m05[k] for k in METRIC_KEYS}}
                save_checkpoint(run_dir, "best", (ema.module if ema is not None else model).state_dict(), meta)
                best_outputs = (epoch, va_y, va_p, threshold)
                best_val = (va_y, va_p)
            if va_loss < best_val_loss - 1e-6:
                best_val_loss, bad_epochs = va_loss, 0
            else:
                bad_epochs += 1
            best.update(best_val_loss=best_val_loss, bad_epochs=bad_epochs)
            stopping = epoch == cfg["epochs"] or bool(cfg["patience"] and bad_epochs >= cfg["patience"])
            opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
            # last holds the raw weights (training continues from them) and, with --ema, the average.
            ema_tensors, ema_meta = ({}, {}) if ema is None else (ema.to_tensors(), {"ema_updates": ema.updates})
            pending_last = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                            {**base_meta, "threshold": threshold, "val_metrics": val_metrics, "epoch": epoch,
                             "history": list(history), "best": dict(best), "optimizer": opt_meta, **ema_meta},
                            {**{k: v.clone() for k, v in opt_tensors.items()}, **ema_tensors,
                             ORDER_RNG_KEY: order_rng.get_state()})
            if stopping or time.perf_counter() - last_saved >= LAST_EVERY_S:
                save_checkpoint(run_dir, "last", pending_last[0], pending_last[1], extra_tensors=pending_last[2])
                pending_last, last_saved = None, time.perf_counter()
            if time.perf_counter() - last_plot >= PLOT_EVERY_S:
                _write_plots(run_dir, history, best_outputs, classes, arch)
                best_outputs, last_plot = None, time.perf_counter()
            epochs_bar.set_postfix(val_f1=f"{va_m['f1']:.3f}", val_loss=f"{va_loss:.3f}", best=best["epoch"])
            log.info("epoch %d/%d  train loss %.4f  val loss %.4f  val F1 %.4f (threshold %s)  AUC %.4f  %.0fs",
                     epoch, cfg["epochs"], tr_loss, va_loss, va_m["f1"],
                     f"{threshold:.3f}" if threshold is not None else "argmax", va_m["auc"], row["seconds"])
            if cfg["patience"] and bad_epochs >= cfg["patience"]:
                log.info("early stop: validation loss has not improved for %d epochs", bad_epochs)
                break
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: the last finished epoch is saved; continue with --resume %s", run_dir)
    finally:
        epochs_bar.close()
        if pending_last is not None:  # also on an error: the finished epochs stay resumable
            save_checkpoint(run_dir, "last", pending_last[0], pending_last[1], extra_tensors=pending_last[2])
    if history:
        _write_plots(run_dir, history, best_outputs, classes, arch)

    if best is None:
        return FitResult(run_dir, arch, 0, {}, None, interrupted=True)
    best_ckpt = read_checkpoint(run_dir / "best.safetensors")
    test_metrics = test_outputs = None
    if not interrupted and splits.test:
        y, p, bad = predict_samples(best_ckpt, splits.test, cfg=cfg, device=device, desc="test")
        test_metrics, test_outputs = report_outputs(best_ckpt.meta, y, p, bad, run_dir, "test"), (y, p)
        log.info("test (report only, never used for selection): %s", _test_summary(test_metrics))
    return FitResult(run_dir, arch, int(best_ckpt.meta["epoch"]), best_ckpt.meta["val_metrics"], test_metrics, interrupted,
                     val_outputs=best_val, test_outputs=test_outputs)


def predict_samples(ckpt, samples, *, cfg: dict | None = None, device: torch.device | None = None,
                    desc: str = "eval") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, probabilities, unreadable paths) of a loaded checkpoint on samples."""
    from torch.utils.data import DataLoader

    from .data import DecodedImages, XRayDataset

    meta = ckpt.meta
    device = device or select_device("auto")
    model = ckpt.build_model().eval()
    cache = (cfg or {}).get("cache", "memory")
    images = DecodedImages(samples, int(meta["input_size"]), "memory" if cache == "off" else cache,
                           Path(cfg["cache_dir"]) if cfg and cfg.get("cache_dir") else None, desc=f"decoding {desc}",
                           clahe=meta.get("clahe"))
    if len(images) == 0:
        raise DataError(f"no readable images to evaluate on ({len(images.bad)} unreadable)")
    ds = XRayDataset(images, meta["mean"], meta["std"], meta["color_space"])
    amp, _ = autocast_for(device)
    # Served as the Predictor serves it (BatchNorm folded, no padding copy, channels_last, on a CPU
    # in float32 weights packed with ReLUs fused), each rewrite checked on the first image: the
    # same probabilities to float rounding, and what `predict` and the web app compute.
    model, _ = _serve(model, torch.as_tensor(ds[0][0])[None], device, amp)
    _, y, p = evaluate(model, DataLoader(ds, batch_size=32, shuffle=False), None, device, amp=amp, desc=desc)
    return y, p, images.bad


def _test_summary(metrics: dict) -> str:
    """The one-line test/ report of a training log: four scores and AUC's interval."""
    ci = metrics.get("ci95")
    return (", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "f1", "specificity", "auc"))
            + (f" (AUC 95 % interval over the images {ci['auc'][0]:.4f}-{ci['auc'][1]:.4f})" if ci else ""))


def evaluate_on_samples(ckpt, samples, out_dir: Path | None, name: str, *, cfg: dict | None = None,
                        device: torch.device | None = None) -> dict:
    """Metrics of a loaded checkpoint on samples (see ``report_outputs``)."""
    y, p, bad = predict_samples(ckpt, samples, cfg=cfg, device=device, desc=name)
    return report_outputs(ckpt.meta, y, p, bad, out_dir, name)


def report_outputs(meta: dict, y: np.ndarray, p: np.ndarray, bad: list, out_dir: Path | None, name: str) -> dict:
    """Metrics of a model's probabilities ``p`` for labels ``y`` at its stored threshold (two
    classes: also at 0.5, and each with its 95 % bootstrap interval over the images, ``ci95``);
    also writes ``<name>_metrics.json`` and ROC/confusion plots into ``out_dir`` when given."""
    from .plots import plot_confusion, plot_roc

    classes = meta["classes"]
    thr = meta["threshold"]
    m = compute_metrics(y, p, classes, thr)
    m["n"] = int(len(y))
    m["skipped"] = bad
    if len(classes) == 2:
        m["ci95"] = bootstrap_ci(y, p, thr)
        if thr != 0.5:
            m["at_0.5"] = {**compute_metrics(y, p, classes, 0.5), "ci95": bootstrap_ci(y, p, 0.5)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / f"{name}_metrics.json", json.dumps(m, indent=2, sort_keys=True) + "\n")
        if len(classes) == 2:
            plot_roc(y, p, out_dir / f"roc_{name}.png", f"ROC, {name} ({meta['arch']})",
                     auc_interval=m["ci95"]["auc"] if m.get("ci95") else None)
            y_pred = (p >= thr).astype(int)
        else:
            y_pred = p.argmax(1)
        plot_confusion(y, y_pred, classes, out_dir / f"confusion_{name}.png", f"{name}, threshold {thr:.3f}" if thr is not None else f"{name}, argmax")
    return m


# ---------------------------------------------------------------------------------------
# Several backbones, grid search
# ---------------------------------------------------------------------------------------

GRID_KEYS = {"lr": float, "batch_size": int, "optimizer": str, "arch": str, "weights": str,
             "freeze": str, "label_smoothing": float, "mixup": float, "input_size": int, "epochs": int,
             "tta": str, "bn_stats": str}


def parse_grid(text: str) -> list[dict]:
    """``"lr=1e-4,1e-3;optimizer=adam,sgd"`` -> the list of trial overrides (cartesian product)."""
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise ConfigError(f"--grid entry {part!r} is not KEY=V1,V2 (keys: {', '.join(GRID_KEYS)})")
        key, values = part.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in GRID_KEYS:
            raise ConfigError(f"--grid key {key!r} is not one of {', '.join(GRID_KEYS)}")
        try:
            vals = [GRID_KEYS[key](v.strip()) for v in values.split(",") if v.strip()]
        except ValueError as exc:
            raise ConfigError(f"--grid {key}: {exc}") from exc
        if not vals:
            raise ConfigError(f"--grid {key} has no values")
        axes.append([(key, v) for v in vals])
    if not axes:
        raise ConfigError("--grid is empty")
    return [dict(combo) for combo in itertools.product(*axes)]


def _summary_row(res: FitResult) -> dict:
    row = {k: res.val_metrics.get(k) for k in METRIC_KEYS}
    row.update(run=res.run_dir.name, arch=res.arch, best_epoch=res.best_epoch)
    return row


def write_leaderboard(output: Path, trials: list[tuple[dict, FitResult]]) -> list[dict]:
    rows = []
    for overrides, res in trials:
        rows.append({**{f"{k}": v for k, v in overrides.items()}, **_summary_row(res),
                     "val_loss": res.val_metrics.get("loss")})
    rows.sort(key=lambda r: (-(r["f1"] if r["f1"] is not None else -1), r["val_loss"] if r["val_loss"] is not None else math.inf))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(Path(output) / "leaderboard.csv", buf.getvalue())
    md = format_table({f"{i + 1}. {r['run']}": r for i, r in enumerate(rows)})
    atomic_write_text(Path(output) / "leaderboard.md", "# Grid search, sorted by validation F1\n\n" + md + "\n")
    return rows


def run_many(cfg: dict, data_root: Path, output: Path, trials: list[dict]) -> list[tuple[dict, FitResult]]:
    splits = config_splits(cfg, data_root)
    results = []
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i, overrides in enumerate(trials):
        trial_cfg = {**cfg, **overrides}
        validate_config(trial_cfg)
        if len(trials) > 1 or not cfg.get("run_name"):
            suffix = "-".join(f"{k}{v}" for k, v in overrides.items() if k != "arch")
            base = cfg.get("run_name") or stamp
            trial_cfg["run_name"] = f"{base}-{trial_cfg['arch']}" + (f"-t{i + 1}-{suffix}" if suffix else "")
        res = fit(trial_cfg, data_root, output, arch=trial_cfg["arch"], splits=splits)
        results.append((overrides, res))
        if res.interrupted:
            break
    return results


def member_config(cfg: dict, overrides: dict) -> dict:
    """An ensemble member's config: the run's, with the member's overrides (augmentations merged).
    ``seed_offset`` (a member-only key) seeds the member at the run's ``--seed`` plus it, so two
    members of one backbone differ and a run with another ``--seed`` still moves every member."""
    out = {**cfg, **{k: v for k, v in overrides.items() if k != "seed_offset"}, "ensemble": None}
    if "augment" in overrides:
        out["augment"] = {**(cfg.get("augment") or {}), **overrides["augment"]}
    if "seed_offset" in overrides:
        out["seed"] = int(cfg["seed"]) + overrides["seed_offset"]
    return out


def _mean_outputs(outputs: list) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, mean probability) of several models' (labels, probabilities) on the same images,
    in the same order; None when one is missing or their labels differ."""
    if any(o is None for o in outputs) or any(not np.array_equal(o[0], outputs[0][0]) for o in outputs):
        return None
    return outputs[0][0], np.mean([np.asarray(o[1], dtype=np.float64) for o in outputs], axis=0)


def fit_ensemble(cfg: dict, data_root: Path, output: Path) -> FitResult:
    """Train each member of ``cfg["ensemble"]`` as its own run under ``<run>/members/``, then save
    the ensemble (mean probability) as ``<run>/best.safetensors``: one self-describing checkpoint
    holding every member's weights, with its own validation threshold and metrics. ``best``
    lookups skip the member runs, so they resolve to the ensemble."""
    from torch.utils.data import DataLoader

    from .data import DecodedImages, XRayDataset
    from .models import EnsembleNet
    from .plots import plot_confusion, plot_roc

    splits = config_splits(cfg, data_root)
    run_dir = Path(output) / (cfg.get("run_name") or f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-ensemble")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists; choose another --run-name")
    results = []
    for i, overrides in enumerate(cfg["ensemble"]):
        mcfg = member_config(cfg, overrides)
        mcfg["split_seed"] = split_seed(cfg)
        mcfg["run_name"] = f"m{i + 1}-{mcfg['arch']}"
        log.info("ensemble member %d/%d: %s", i + 1, len(cfg["ensemble"]), json.dumps(overrides, sort_keys=True))
        res = fit(mcfg, data_root, run_dir / "members", arch=mcfg["arch"], splits=splits)
        results.append(res)
        if res.interrupted:
            log.warning("interrupted: member %s can be continued with --resume %s", i + 1, res.run_dir)
            return res
    ckpts = [read_checkpoint(r.run_dir / "best.safetensors") for r in results]
    shared = ("classes", "positive_class", "num_outputs", "input_size", "mean", "std", "color_space", "clahe")
    for c in ckpts:
        c.meta.setdefault("clahe", 0.0)  # checkpoints from before CLAHE existed
    for c in ckpts[1:]:
        diff = [k for k in shared if c.meta[k] != ckpts[0].meta[k]]
        if diff:
            raise ConfigError(f"ensemble members must share {', '.join(diff)}; {c.path} differs from {ckpts[0].path}")
    first = ckpts[0].meta
    model = EnsembleNet([c.meta["arch"] for c in ckpts], int(first["num_outputs"]))
    for member, c in zip(model.members, ckpts):
        member.load_state_dict(c.state_dict)
    model.tta = cfg["tta"]  # on the ensemble's mean (each member's own views would give the same mean)
    device = select_device(cfg["device"])
    # The ensemble's output is the mean of its members' probabilities, and each member's run has
    # already computed them on these images: average those instead of running every member (and
    # its test-time views) again, a minute or more of the CPU preset.
    val = _mean_outputs([r.val_outputs for r in results])
    if val is not None:
        va_y, va_p = val
    else:  # a member's best epoch came from before a resume: run the ensemble itself
        model = model.to(device, memory_format=torch.channels_last) if device.type in ("cuda", "cpu") else model.to(device)
        images = DecodedImages(splits.val, int(first["input_size"]), cfg["cache"],
                               Path(cfg["cache_dir"]) if cfg["cache_dir"] else None, desc="decoding val", clahe=first["clahe"])
        loader = DataLoader(XRayDataset(images, first["mean"], first["std"], first["color_space"]), batch_size=cfg["batch_size"] * 2)
        amp, _ = autocast_for(device)
        _, va_y, va_p = evaluate(model, loader, None, device, amp=amp, desc="ensemble val")
    classes = first["classes"]
    threshold = choose_threshold(cfg, va_y, va_p, len(classes) == 2)
    va_m = compute_metrics(va_y, va_p, classes, threshold)
    val_metrics = {k: va_m[k] for k in METRIC_KEYS}
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "arch": "ensemble", **{k: first[k] for k in shared}, "tta": cfg["tta"], "threshold": threshold,
        "val_metrics": val_metrics,
        "val_metrics_at_0.5": {k: v for k, v in compute_metrics(va_y, va_p, classes, 0.5).items() if k in METRIC_KEYS},
        "epoch": max(int(c.meta["epoch"]) for c in ckpts), "config": cfg, "versions": versions(),
        "data": first["data"], "run": run_dir.name,
        "members": [{"arch": c.meta["arch"], "run": c.meta["run"], "epoch": c.meta["epoch"], "threshold": c.meta["threshold"],
                     "val_metrics": c.meta["val_metrics"], "overrides": o} for c, o in zip(ckpts, cfg["ensemble"])],
    }
    save_checkpoint(run_dir, "best", model.state_dict(), meta)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if len(classes) == 2:
        plot_roc(va_y, va_p, run_dir / "roc_val.png", "ROC, validation (ensemble)")
        plot_confusion(va_y, (va_p >= threshold).astype(int), classes, run_dir / "confusion_val.png",
                       f"Validation, ensemble, threshold {threshold:.3f}")
    log.info("ensemble of %d: validation F1 %.4f (threshold %s), AUC %.4f", len(ckpts), val_metrics["f1"],
             f"{threshold:.3f}" if threshold is not None else "argmax", val_metrics["auc"])
    test_metrics = None
    if splits.test:
        test = _mean_outputs([r.test_outputs for r in results])
        if test is not None:
            test_metrics = report_outputs(meta, *test, results[0].test_metrics["skipped"], run_dir, "test")
        else:
            test_metrics = evaluate_on_samples(read_checkpoint(run_dir / "best.safetensors"), splits.test, run_dir, "test",
                                               cfg=cfg, device=device)
        log.info("ensemble test (report only, never used for selection): %s", _test_summary(test_metrics))
    ens = FitResult(run_dir, "ensemble", meta["epoch"], val_metrics, test_metrics, False)
    _print_results([({}, r) for r in (*results, ens)], run_dir, save=True)
    return ens


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def _detach_log_file() -> None:
    for h in list(log.handlers):
        if getattr(h, "_deepcovid_run", False):
            log.removeHandler(h)
            h.close()


def _attach_log_file(run_dir: Path) -> None:
    _detach_log_file()
    fh = logging.FileHandler(run_dir / "train.log")
    fh._deepcovid_run = True
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)


def setup_logging() -> None:
    if not any(getattr(h, "_deepcovid_console", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._deepcovid_console = True
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="ROOT holding train/<CLASS>/ (and optionally val/, test/)")
    p.add_argument("--output", type=Path, default=Path("checkpoints"), help="where run folders go (default: checkpoints)")
    p.add_argument("--preset", help=f"a named recipe: {', '.join(PRESETS)} (flags given explicitly override it)")
    p.add_argument("--arch", help=f"one or more backbones, comma-separated (default: {PAPER_ARCHS})")
    p.add_argument("--weights", help="imagenet (default; downloads, except efficientnet_lite0/1/2), none, or a local state-dict PATH")
    p.add_argument("--freeze", help="backbone (default: train the head only), none (train everything), or N (the last N blocks)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float,
                   help="weight decay (default 0; with --optimizer adamw, 0 means AdamW's usual 0.01)")
    p.add_argument("--optimizer", help=f"{', '.join(OPTIMIZERS)} (default adam)")
    p.add_argument("--schedule", help="learning-rate schedule: constant (default), cosine (per epoch, to 0 at --epochs) "
                   "or cosine-step (the same curve at every optimizer step)")
    p.add_argument("--head-epochs", type=int, help="LP-FT: train the head alone on cached features for N epochs first "
                                                   "(with --freeze none or N; default 0)")
    p.add_argument("--patience", type=int, help="stop after this many epochs without a lower validation loss (0: never; default 5)")
    p.add_argument("--val-fraction", type=float, help="share of train/ patients carved out for validation when val/ is missing or small (default 0.1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--input-size", type=int, help="square input size (default: the backbone's config)")
    p.add_argument("--color-space", help="rgb (default) or hsv")
    p.add_argument("--clahe", type=float, metavar="CLIP",
                   help="equalise every image with CLAHE at this clip limit before it reaches the model, in "
                        "training and (from the checkpoint) in inference; 0: off (default)")
    p.add_argument("--no-augment", action="store_true", default=None, help="switch off all training augmentation")
    p.add_argument("--augment", action="append", metavar="NAME=VALUE",
                   help="override one Table 1 augmentation, e.g. --augment vflip=0 --augment rotation=10 "
                        "(rotation, hflip, vflip, shift, zoom, blur, blur_p, brightness, contrast, saturation, hue, erase, neg_blur, neg_blur_p, neg_zoom, neg_zoom_p); 0 switches it off")
    p.add_argument("--balance", help="class imbalance: weighted-loss (default), sampler, none")
    p.add_argument("--threshold", help="decision threshold of a two-class model: val-f1 (default: the F1-optimal "
                                       "threshold on the validation split), recall=R (the highest threshold "
                                       "whose validation recall is at least R, e.g. recall=0.9: a fixed sensitivity) "
                                       "or a fixed probability, e.g. 0.5")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="MixUp: train on mixtures of pairs of images and their labels, weight ~ Beta(ALPHA, ALPHA); "
                        "0: off (default); needs the images, so not with a cached frozen backbone")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate, checkpoint and serve an exponential moving average of the weights (timm's "
                        "ModelEmaV3 with warmup) at this decay, e.g. 0.998; 0: off (default)")
    p.add_argument("--drop-path", type=float, metavar="RATE",
                   help="stochastic depth while training (timm's drop_path_rate: the last block's rate, 0 at the "
                        "first); efficientnet_lite0/1/2 only; 0: off (default)")
    p.add_argument("--bn-stats", help="BatchNorm statistics while training: update (default: each batch's, with the "
                                      "running ones following the training images) or frozen (the pretrained running "
                                      "statistics, kept as they are; scale and shift still train)")
    p.add_argument("--tta", help="test-time augmentation: none (default) or hflip (average each image's and its "
                                 "mirror's probabilities; stored in the checkpoint, so validation, test/ reports, "
                                 "predictions and explanations all use it; twice the inference cost)")
    p.add_argument("--precision", help="mixed precision of training and validation: auto (default: bf16 autocast "
                                       "on CUDA, float32 on the CPU), fp32, or bf16 (bfloat16 autocast, CUDA or CPU; "
                                       "fast on CPUs with AVX512-BF16 or AMX, slow on others)")
    p.add_argument("--positive-class", help="the positive class for two classes (default: the one not named NORMAL)")
    p.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--workers", type=int, help="data-loader worker processes (default: 0 on CPU, all cores but one on CUDA)")
    p.add_argument("--cache", help="decoded-image cache: disk (default), memory, off")
    p.add_argument("--cache-dir", type=Path, help="where the disk cache lives (default: ~/.cache/deepcovid)")
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="run the frozen layers every epoch instead of caching their outputs once per augmented view "
                        "(the cache is used with --freeze backbone, and with --freeze N for efficientnet_lite0/1/2 and resnet50)")
    p.add_argument("--feature-views", type=int, help="augmented views per image in the feature cache (default 4)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step (worth it on CUDA; about a minute of compiling first)")
    p.add_argument("--augment-on", help="where training images are augmented: auto (default: device on CUDA, "
                                        "loader elsewhere), loader (per image), device (a batch at a time where the model runs)")
    p.add_argument("--max-train-batches", type=int, help="cap training batches per epoch (smoke tests)")
    p.add_argument("--run-name", help="run folder name (default: TIMESTAMP-ARCH)")
    p.add_argument("--grid", help="grid search, e.g. 'lr=1e-4,1e-3;batch_size=16,32;optimizer=adam,sgd;arch=resnet50;weights=imagenet'")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint")


def _parse_augment(items: list[str] | None) -> dict | None:
    if not items:
        return None
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--augment {item!r} is not NAME=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError as exc:
            raise ConfigError(f"--augment {item!r}: {v!r} is not a number") from exc
    return out


def config_from_args(args: argparse.Namespace) -> dict:
    explicit = {k: getattr(args, k, None) for k in DEFAULTS if k not in ("augment",)}
    explicit["augment"] = _parse_augment(args.augment)
    if args.cache_dir is not None:
        explicit["cache_dir"] = str(args.cache_dir)
    cfg = resolve_config(explicit, args.preset)
    cfg["run_name"] = args.run_name
    cfg["_epochs_explicit"] = args.epochs is not None
    return cfg


def run(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = config_from_args(args)
    output = Path(args.output)
    if args.resume is not None:
        res = fit(cfg, None, output, resume=args.resume)
        _print_results([({}, res)], output, save=False)
        return 130 if res.interrupted else 0
    if args.data is None:
        raise ConfigError("--data ROOT is required (ROOT/train/<CLASS>/<images>)")
    cfg.pop("_epochs_explicit", None)
    if args.grid:
        trials = parse_grid(args.grid)
        base_archs = [a.strip() for a in str(cfg["arch"]).split(",")]
        if not any("arch" in t for t in trials):
            trials = [{**t, "arch": a} for a in base_archs for t in trials]
        results = run_many(cfg, args.data, output, trials)
        rows = write_leaderboard(output, results)
        print(format_table({r["run"]: r for r in rows}))
        print(f"\nleaderboard: {output / 'leaderboard.md'}")
        return 130 if any(r.interrupted for _, r in results) else 0
    if cfg.get("ensemble"):
        res = fit_ensemble(cfg, args.data, output)
        return 130 if res.interrupted else 0
    archs = [a.strip() for a in str(cfg["arch"]).split(",") if a.strip()]
    results = run_many(cfg, args.data, output, [{"arch": a} for a in archs])
    _print_results(results, output, save=len(archs) > 1)
    return 130 if any(r.interrupted for _, r in results) else 0


def _print_results(results, output: Path, save: bool) -> None:
    rows = {res.run_dir.name: res.val_metrics for _, res in results if res.val_metrics}
    if not rows:
        return
    table = format_table(rows)
    print("\nValidation (best epoch of each model, at its stored threshold):\n" + table)
    tests = {res.run_dir.name: res.test_metrics for _, res in results if res.test_metrics}
    test_table = format_table(tests) if tests else ""
    intervals = format_ci_list(tests)
    if intervals:
        test_table += "\n\n" + intervals
    if test_table:
        print("\ntest/ (report only):\n" + test_table)
    for _, res in results:
        print(f"best checkpoint: {res.run_dir / 'best.safetensors'} (epoch {res.best_epoch})")
    if save:
        text = "# Comparison (the paper's Table 2 shape)\n\n## Validation\n\n" + table + "\n"
        if test_table:
            text += "\n## test/ (report only)\n\n" + test_table + "\n"
        atomic_write_text(Path(output) / "comparison.md", text)
        print(f"comparison: {Path(output) / 'comparison.md'}")
