"""How the scores grow with the number of models averaged. Each --checkpoint is a run folder of
one model or of an ensemble, whose members are taken one by one. Every model is scored once, with
its own test-time augmentation, on ROOT/test and, when all the models share one validation split,
on that split. Then, for each n, the mean probability of every combination of n models is
scored at the threshold (0.5 by default). The table gives the mean and the spread over the
combinations. Nothing is trained, and nothing here chooses anything: test/ is a report.

    python benchmarks/ensemble_size.py --checkpoint runs/seed0/ENSEMBLE --checkpoint runs/seed1/ENSEMBLE \\
        --checkpoint runs/seed2/ENSEMBLE            # 9 models: every subset of 1 to 9 of them
    python benchmarks/ensemble_size.py --sweep runs/nine --variant base-l0 --variant base-l1 --variant base-l2
                                                    # the models of a sweep_recipes.py run, from its probs.npz

It also counts, for each class, on how many of the models each image is wrong: images that
(nearly) every model gets wrong are errors that no average of such models removes.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import zipfile
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


def error_agreement(y: np.ndarray, probs: np.ndarray, threshold: float) -> list[dict]:
    """Per class (0, then 1): of its images, how many the models (``probs``: models x images,
    called positive at >= threshold, as deepcovid.metrics does) get wrong on every model, on at
    least 90 % of them, on more than half, on some but at most half, and on none."""
    wrong = ((probs >= threshold) != (y == 1)[None, :]).mean(axis=0)
    rows = []
    for c in (0, 1):
        w = wrong[y == c]
        rows.append({"class": c, "images": int(w.size), "all": int((w == 1).sum()), "at_least_90": int((w >= 0.9).sum()),
                     "more_than_half": int((w > 0.5).sum()), "some": int(((w > 0) & (w <= 0.5)).sum()),
                     "none": int((w == 0).sum())})
    return rows


def sweep_scores(specs, variants) -> tuple[int, dict[str, tuple[np.ndarray, list[np.ndarray]]]]:
    """(number of models, {split: (labels, [probabilities of each model])}) from the probs.npz of
    sweep_recipes.py runs (a folder holding one, or the file), every (variant, seed) of the named
    variants (all when none is named). A sweep's runs share one validation split."""
    from deepcovid.errors import ConfigError

    scored: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    seen: set[Path] = set()
    for spec in specs:
        npz = Path(spec) / "probs.npz" if Path(spec).is_dir() else Path(spec)
        if not npz.is_file():
            raise ConfigError(f"no {npz}: give a sweep_recipes.py --out folder or its probs.npz")
        if npz.resolve() in seen:  # a sweep named twice (its folder and its file) is one set of models
            continue
        seen.add(npz.resolve())
        try:
            with np.load(npz) as z:  # allow_pickle stays False: an .npz here holds only arrays
                runs = {k: (z[k[:-1] + "y"], z[k]) for k in z.files
                        if k.endswith("/p") and (not variants or k.split("/")[0] in variants)}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{npz} is not a sweep_recipes.py probs.npz ({exc})") from exc
        for key, (y, prob) in sorted(runs.items()):
            part = key.split("/")[-2]
            if prob.ndim != 1:
                raise ConfigError(f"{npz}: {key} is not a two-class probability")
            split = "validation" if part == "val" else part
            ys, ps = scored.setdefault(split, (y, []))
            if not np.array_equal(ys, y):
                raise ConfigError(f"{npz}: {key} is scored on other {split} images than the models before it")
            ps.append(prob.astype(np.float64))
    if variants and not scored:
        raise ConfigError(f"no runs of variant(s) {', '.join(variants)} in {', '.join(map(str, specs))}")
    return max((len(ps) for _, ps in scored.values()), default=0), scored


def main(argv=None) -> int:
    from deepcovid.errors import ConfigError, DeepCovidError
    from deepcovid.training import config_splits, predict_samples, split_seed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a run folder of a model or an ensemble (repeat; at least two models in all)")
    p.add_argument("--sweep", action="append", type=Path, default=[],
                   help="instead of --checkpoint: a sweep_recipes.py --out folder or its probs.npz (repeat)")
    p.add_argument("--variant", action="append", default=[], help="with --sweep: only this variant's runs (repeat)")
    p.add_argument("--data", type=Path, help="ROOT with train/ and test/ (default: each checkpoint's own)")
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold for every subset (default 0.5)")
    p.add_argument("--max-subsets", type=int, default=2000,
                   help="subsets scored per size, drawn at random beyond this (default 2000)")
    args = p.parse_args(argv)
    if not 0 < args.threshold < 1:
        p.error(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.max_subsets < 1:
        p.error("--max-subsets must be at least 1")
    if bool(args.checkpoint) == bool(args.sweep):
        p.error("give run folders with --checkpoint or sweeps with --sweep (one of the two)")
    if args.variant and not args.sweep:
        p.error("--variant picks runs of a --sweep")
    if args.sweep:
        try:
            n_models, scored = sweep_scores(args.sweep, args.variant)
            if n_models < 2:
                raise ConfigError(f"give at least two models; the sweep(s) hold {n_models}")
        except DeepCovidError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # A sweep saves probabilities, not class names.
        return report(scored, n_models, ["negative", "positive"], args, ())
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
    return report(scored, len(models), classes, args, split_seeds)


def report(scored, n_models: int, classes, args, split_seeds) -> int:
    if "test" not in scored:
        print("error: no test/ images next to the checkpoints' train/ (give --data ROOT)", file=sys.stderr)
        return 2
    print(f"\n{n_models} models, threshold {args.threshold:g}; mean ± sd over the subsets of each size\n")
    print("| split | models | subsets | accuracy | F1 | specificity | AUC |")
    print("|---|---|---|---|---|---|---|")
    for split, (y, ps) in scored.items():
        for r in size_table(y, np.stack(ps), classes, args.threshold, args.max_subsets):
            cells = [f"{100 * r[k][0]:.2f} ± {100 * r[k][1]:.2f}%" for k in KEYS[:3]]
            print(f"| {split} | {r['n']} | {r['subsets']} | " + " | ".join(cells)
                  + f" | {r['auc'][0]:.4f} ± {r['auc'][1]:.4f} |")
    if len(split_seeds) > 1:
        print(f"\n(validation left out: the models come from {len(split_seeds)} different validation splits)")
    print(f"\nImages by the number of the {n_models} models that get them wrong\n")
    print("| split | class | images | wrong on all | on at least 90 % | on more than half | on some, at most half | on none |")
    print("|---|---|---|---|---|---|---|---|")
    for split, (y, ps) in scored.items():
        for r in error_agreement(y, np.stack(ps), args.threshold):
            print(f"| {split} | {classes[r['class']]} | {r['images']} | {r['all']} | {r['at_least_90']} | "
                  f"{r['more_than_half']} | {r['some']} | {r['none']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
