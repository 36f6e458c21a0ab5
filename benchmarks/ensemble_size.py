"""How the scores grow with the number of models averaged. Each --checkpoint is a run folder of
one model or of an ensemble, whose members are taken one by one. Every model is scored once, with
its own test-time augmentation, on ROOT/test and, when all the models share one validation split,
on that split. Then, for each n, the mean probability of every combination of n models is
scored at the threshold (0.5 by default). The table gives the mean and the spread over the
combinations. Nothing is trained, and nothing here chooses anything: test/ is a report.

    python benchmarks/ensemble_size.py --checkpoint runs/seed0/ENSEMBLE --checkpoint runs/seed1/ENSEMBLE \\
        --checkpoint runs/seed2/ENSEMBLE            # 9 models: every subset of 1 to 9 of them
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEYS = ("accuracy", "f1", "specificity", "auc")


def model_checkpoints(spec) -> list:
    """The loaded checkpoints of a run folder: its members if it is an ensemble, else itself."""
    from deepcovid.checkpoint import load_checkpoint

    ckpt = load_checkpoint(spec, ".")
    if ckpt.meta.get("arch") != "ensemble":
        return [ckpt]
    return [load_checkpoint(ckpt.run_dir / "members" / m["run"], ".") for m in ckpt.meta["members"]]


def combinations(n_models: int, n: int, limit: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Every n-subset of the models, or ``limit`` of them drawn at random when there are more."""
    if math.comb(n_models, n) <= limit:
        return list(itertools.combinations(range(n_models), n))
    picked: set[tuple[int, ...]] = set()
    while len(picked) < limit:
        picked.add(tuple(sorted(rng.choice(n_models, n, replace=False).tolist())))
    return sorted(picked)


def size_table(y: np.ndarray, probs: np.ndarray, classes, threshold: float, limit: int = 2000,
               seed: int = 0) -> list[dict]:
    """One row per subset size n: the mean and sd over the n-subsets of ``probs`` (models x
    images) of the scores of their mean probability."""
    from deepcovid.metrics import compute_metrics

    rng = np.random.default_rng(seed)
    rows = []
    for n in range(1, len(probs) + 1):
        combos = combinations(len(probs), n, limit, rng)
        scores = np.array([[compute_metrics(y, probs[list(c)].mean(0), classes, threshold)[k] for k in KEYS]
                           for c in combos])
        rows.append({"n": n, "subsets": len(combos), **{k: (float(scores[:, i].mean()), float(scores[:, i].std()))
                                                         for i, k in enumerate(KEYS)}})
    return rows


def main(argv=None) -> int:
    from deepcovid.errors import ConfigError, DeepCovidError
    from deepcovid.training import config_splits, predict_samples, split_seed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a run folder of a model or an ensemble (repeat; at least two models in all)")
    p.add_argument("--data", type=Path, help="ROOT with train/ and test/ (default: each checkpoint's own)")
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold for every subset (default 0.5)")
    p.add_argument("--max-subsets", type=int, default=2000,
                   help="subsets scored per size, drawn at random beyond this (default 2000)")
    args = p.parse_args(argv)
    if not 0 < args.threshold < 1:
        p.error(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.max_subsets < 1:
        p.error("--max-subsets must be at least 1")
    try:
        models = [ck for spec in args.checkpoint for ck in model_checkpoints(spec)]
        if len(models) < 2:
            raise ConfigError("give at least two models (run folders of models, or an ensemble)")
        classes = models[0].meta["classes"]
        if len(classes) != 2 or any(ck.meta["classes"] != classes for ck in models):
            raise ConfigError("every model must have the same two classes")
        split_seeds = {split_seed(ck.meta["config"]) for ck in models}
        scored: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
        for ck in models:
            cfg, root = ck.meta["config"], args.data or ck.meta.get("data", {}).get("root")
            if root is None:
                raise ConfigError(f"{ck.meta['run']} does not say where its data is: give --data ROOT")
            splits = config_splits(cfg, Path(root))
            # Validation only when it is one set of images for all: averaging the probabilities of
            # different images would not be an ensemble.
            for split, samples in (("test", splits.test), ("validation", splits.val if len(split_seeds) == 1 else [])):
                if not samples:
                    continue
                y, prob, bad = predict_samples(ck, samples, desc=f"{ck.meta['run']} {split}")
                if bad:
                    raise ConfigError(f"{len(bad)} unreadable {split} image(s), e.g. {bad[0]}")
                prob = prob[:, -1] if prob.ndim == 2 else prob
                ys, ps = scored.setdefault(split, (y, []))
                ps.append(prob.astype(np.float64))
    except DeepCovidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "test" not in scored:
        print("error: no test/ images next to the checkpoints' train/ (give --data ROOT)", file=sys.stderr)
        return 2
    print(f"\n{len(models)} models, threshold {args.threshold:g}; mean ± sd over the subsets of each size\n")
    print("| split | models | subsets | accuracy | F1 | specificity | AUC |")
    print("|---|---|---|---|---|---|---|")
    for split, (y, ps) in scored.items():
        for r in size_table(y, np.stack(ps), classes, args.threshold, args.max_subsets):
            cells = [f"{100 * r[k][0]:.2f} ± {100 * r[k][1]:.2f}%" for k in KEYS[:3]]
            print(f"| {split} | {r['n']} | {r['subsets']} | " + " | ".join(cells)
                  + f" | {r['auc'][0]:.4f} ± {r['auc'][1]:.4f} |")
    if len(split_seeds) > 1:
        print(f"\n(validation left out: the models come from {len(split_seeds)} different validation splits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
