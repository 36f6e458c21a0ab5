"""Which test-time views help? Scores of trained checkpoints (members or ensembles) under sets
of views: the image at zoom scales (training's zoom: nearest, zero fill, about the centre) and
the mirror of each, the probabilities of a set's views averaged as ``--tta hflip`` averages two.
Each checkpoint is scored on its own validation split (rebuilt from its stored config) and on
ROOT/test, at its stored threshold; the table gives the mean over the checkpoints (e.g. one run
per seed). Nothing is trained, and nothing here chooses anything: test/ is a report.

    python benchmarks/probe_tta_views.py --checkpoint runs/seed0/ENSEMBLE --checkpoint runs/seed1/ENSEMBLE \\
        --scales 0.9,1,1.1
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def view_sets(scales: list[float]) -> dict[str, list[tuple[float, bool]]]:
    """Named sets of (scale, mirrored) views: the plain image, the preset's image + mirror, and
    image + mirror at every set of scales that holds 1 and at least one other."""
    others = [s for s in scales if s != 1.0]
    sets = {"none": [(1.0, False)], "hflip": [(1.0, False), (1.0, True)]}
    for k in range(1, len(others) + 1):
        for combo in itertools.combinations(others, k):
            chosen = sorted({1.0, *combo})
            sets["hflip x zoom " + "/".join(f"{s:g}" for s in chosen)] = [(s, m) for s in chosen for m in (False, True)]
    return sets


def view_probabilities(ckpt, samples, views: list[tuple[float, bool]], batch_size: int = 64) -> tuple[np.ndarray, dict]:
    """(labels, {view: positive-class probability}) of a checkpoint's model without its own TTA,
    each view run through training's ``evaluate`` on uint8 batches normalised as training does."""
    import torch
    import torchvision.transforms.v2.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.transforms import InterpolationMode

    from deepcovid.data import DecodedImages
    from deepcovid.training import batch_normalizer, evaluate

    meta = ckpt.meta
    model = ckpt.build_model().to(memory_format=torch.channels_last)
    model.tta = "none"  # the views are made here, one at a time
    images = DecodedImages(samples, int(meta["input_size"]), "memory", None, desc="decoding", clahe=meta.get("clahe"))
    x8 = torch.stack([torch.from_numpy(np.ascontiguousarray(images.get(i))).permute(2, 0, 1) for i in range(len(images))])
    y = torch.tensor([s.label for s in images.samples])
    prepare = batch_normalizer(meta["mean"], meta["std"], meta["color_space"])
    out = {}
    for scale, mirrored in views:
        x = x8 if scale == 1.0 else F.affine(x8, angle=0.0, translate=[0, 0], scale=scale, shear=[0.0, 0.0],
                                             interpolation=InterpolationMode.NEAREST, fill=0)
        x = x.flip(-1) if mirrored else x
        _, _, p = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=batch_size), None, torch.device("cpu"),
                           desc=f"zoom {scale:g}{' mirrored' if mirrored else ''}", prepare=prepare)
        out[(scale, mirrored)] = (p[:, -1] if p.ndim == 2 else p).astype(np.float64)
    return y.numpy(), out


def main(argv=None) -> int:
    from deepcovid.checkpoint import load_checkpoint
    from deepcovid.errors import DeepCovidError
    from deepcovid.metrics import compute_metrics
    from deepcovid.training import config_splits

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="a run folder or .safetensors (repeat: one per seed)")
    p.add_argument("--data", type=Path, help="ROOT with train/ and test/ (default: each checkpoint's own)")
    p.add_argument("--scales", default="0.9,1,1.1", help="zoom scales, comma-separated (default 0.9,1,1.1)")
    args = p.parse_args(argv)
    try:
        scales = sorted({float(s) for s in args.scales.split(",")} | {1.0})
        if any(not 0.5 <= s <= 2 for s in scales):
            raise ValueError
    except ValueError:
        p.error(f"--scales takes numbers between 0.5 and 2, got {args.scales!r}")
    sets = view_sets(scales)
    views = sorted({v for vs in sets.values() for v in vs})
    rows: dict[tuple[str, str], list[dict]] = {}
    try:
        for spec in args.checkpoint:
            ckpt = load_checkpoint(spec, ".")
            cfg, meta = ckpt.meta["config"], ckpt.meta
            root = args.data or Path(meta["data"]["root"])
            splits = config_splits(cfg, root)
            threshold = meta["threshold"] if meta.get("threshold") is not None else 0.5
            for split, samples in (("val", splits.val), ("test", splits.test)):
                if not samples:
                    continue
                y, probs = view_probabilities(ckpt, samples, views)
                for name, vs in sets.items():
                    prob = np.mean([probs[v] for v in vs], axis=0)
                    rows.setdefault((name, split), []).append(compute_metrics(y, prob, meta["classes"], threshold))
    except DeepCovidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = len(args.checkpoint)
    print(f"\nmean over {n} checkpoint(s), each at its stored threshold\n")
    print("| views | split | accuracy | F1 | specificity | AUC |")
    print("|---|---|---|---|---|---|")
    for (name, split), ms in rows.items():
        m = {k: float(np.mean([x[k] for x in ms])) for k in ("accuracy", "f1", "specificity", "auc")}
        print(f"| {name} | {split} | {100 * m['accuracy']:.2f}% | {100 * m['f1']:.2f}% | {100 * m['specificity']:.2f}% | {m['auc']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
