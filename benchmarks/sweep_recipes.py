"""Recipe variants × seeds: one model per (variant, seed), on one fixed patient-level validation
split, with validation and test/ metrics at the run's threshold, their mean and spread over seeds,
and the seed ensembles (mean probability) of each variant; with --ensembles, ensembles across
variants too (one model of each named variant, same seed), which is how ensemble recipes whose
members are variants are compared without training any member twice.

Seeds matter on this data: two seeds of one recipe differ by up to 0.02 in test/ AUC, so a
change is only worth keeping if it moves the mean by more than the spread. test/ is reported
for comparing recipes, as the data README allows; nothing here chooses an epoch or a threshold.

    python benchmarks/sweep_recipes.py --data ../shared/data/chest_xray --preset cpu-fast \\
        --variants '{"base": {}, "zoom": {"augment": {"zoom": 0.1}}}' --seeds 0,1,2 --out runs/sweep
    python benchmarks/sweep_recipes.py --data ../shared/data/chest_xray --preset cpu-fast --members \\
        --variants '{"base": {}, "noblur": {"augment": {"blur": 0, "blur_p": 0}}}' --seeds 0,1,2 --out runs/sweep
    python benchmarks/sweep_recipes.py --quick     # CI mode: CPU, synthetic images, seconds
    python benchmarks/sweep_recipes.py --out runs/sweep --summarize \\
        --ensembles '{"l0+l1": ["l0", "l1"], "l0+l1+l2": ["l0", "l1", "l2"]}'   # no training

--members trains each variant once per member of the preset's ensemble (the variant's overrides
on top of the member's), as variants NAME-m0, NAME-m1, ..., and adds each variant's members as
an ensemble NAME to the tables: whole ensemble recipes compared in one command.

--errors N lists the test/ images that the ensembles get wrong most often (named with --data),
and --rethreshold RULE scores the ensembles again at the threshold a validation rule (e.g.
recall=0.9) picks on each one's own validation probabilities, nothing retrained.

Writes OUT/results.jsonl (one line per run) and OUT/probs.npz (labels and probabilities);
--summarize reads them back instead of training, with --also DIR for more sweep folders of the
same split (a sweep spread over several processes or machines).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEYS = ("accuracy", "f1", "specificity", "auc")
KIND = ("negative", "positive")  # the two classes of a two-class sweep, as its labels 0 and 1


def run(args) -> list[dict]:
    from deepcovid.checkpoint import read_checkpoint
    from deepcovid.data import load_splits
    from deepcovid.errors import ConfigError
    from deepcovid.metrics import compute_metrics
    from deepcovid.training import fit, member_config, predict_samples, resolve_config, validate_config

    try:
        variants = json.loads(args.variants)
        base_overrides = json.loads(args.base or "{}")
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"--variants and --base take JSON objects, --seeds integers: {exc}") from exc
    if not variants or not seeds:
        raise ConfigError("--variants and --seeds must each name at least one")
    base = resolve_config(base_overrides, args.preset)
    member_ensembles = {}
    if args.members:
        variants, member_ensembles = expand_members(variants, base.get("ensemble"))
    ensembles = {**member_ensembles, **(parse_ensembles(args.ensembles, variants) if args.ensembles else {})} or None  # a typo fails before any training
    base["ensemble"] = None  # one model per (variant, seed): ensembles are formed below from their outputs
    split = int(base["seed"] if base.get("split_seed") is None else base["split_seed"])
    splits = load_splits(args.data, val_fraction=base["val_fraction"], seed=split, positive_class=base["positive_class"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, probs = [], {}
    for (name, overrides), seed in itertools.product(variants.items(), seeds):
        cfg = {**member_config(base, overrides), "seed": seed, "split_seed": split, "run_name": f"{name}-s{seed}"}
        validate_config(cfg)
        t0 = time.perf_counter()
        res = fit(cfg, args.data, out / "runs")
        wall = time.perf_counter() - t0
        ckpt = read_checkpoint(res.run_dir / "best.safetensors")
        classes, thr = ckpt.meta["classes"], ckpt.meta["threshold"]
        row = {"variant": name, "seed": seed, "seconds": round(wall, 1), "epoch": res.best_epoch, "threshold": thr}
        for part, samples in (("val", splits.val), ("test", splits.test)):
            if not samples:
                continue
            y, p, _ = predict_samples(ckpt, samples, cfg=cfg, desc=part)
            probs[f"{name}/{seed}/{part}/y"], probs[f"{name}/{seed}/{part}/p"] = y, p
            row[part] = {k: float(v) for k, v in compute_metrics(y, p, classes, thr).items() if k in KEYS}
        rows.append(row)
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        np.savez_compressed(out / "probs.npz", **probs)  # after every run: a cut-short sweep keeps its runs
    print_tables(rows, probs, variants, seeds, classes, thr, ensembles, args.errors, names_of_test_images(args),
                 args.rethreshold)
    return rows


def print_tables(rows, probs, variants, seeds, classes, thr, ensembles=None, errors: int = 0, names=None,
                 rule: str | None = None) -> None:
    print(summary(rows, probs, variants, seeds, classes, thr))
    if ensembles:
        print(ensemble_summary(probs, ensembles, seeds, classes, thr))
        if rule:
            print(ensemble_summary(probs, ensembles, seeds, classes, thr, rule))
    if errors:
        print(error_summary(probs, ensembles or {v: [v] for v in variants}, seeds, thr, errors, names))


def error_summary(probs, ensembles: dict[str, list[str]], seeds, thr, top: int, names=None) -> str:
    """Which test/ images the ensembles get wrong, pooled over every ensemble and seed: for each
    class, the ``top`` images wrong most often, and how many images are wrong in at least 90 %
    and 50 % of the ensembles. An image that almost every recipe and seed gets wrong bounds what
    a change of recipe can gain; an image wrong in some seeds only is the seed spread."""
    from deepcovid.errors import ConfigError

    y, scores = None, []
    for members in ensembles.values():
        for s in seeds:
            keys = [f"{m}/{s}/test/p" for m in members]
            if not all(k in probs for k in keys):
                continue
            y_s = probs[f"{members[0]}/{s}/test/y"]
            if y is not None and not np.array_equal(y, y_s):
                raise ConfigError("the runs' test/ labels differ; --errors needs one test/ folder")
            y = y_s
            scores.append(np.mean([probs[k] for k in keys], axis=0))
    if not scores or np.asarray(scores[0]).ndim != 1:
        return "--errors: no two-class test/ probabilities in this sweep"
    wrong = (np.asarray(scores) >= thr) != (y == 1)  # (ensembles x seeds, images)
    rate = wrong.mean(0)
    if names is not None and len(names) != len(y):
        raise ConfigError(f"--data's test/ has {len(names)} readable images, the sweep scored {len(y)}")
    label = (lambda i: names[i]) if names is not None else (lambda i: f"image {i}")
    lines = [f"test/ images wrong most often, over {len(scores)} ensembles (every ensemble at every seed, threshold {thr}):",
             "| class | image | wrong in |", "|---|---|---|"]
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        for i in idx[np.argsort(-rate[idx], kind="stable")][:top]:
            lines.append(f"| {KIND[c]} | {label(i)} | {rate[i] * 100:.1f} % |")
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        lines.append(f"{KIND[c]}s: {int((rate[idx] >= 0.9).sum())} of {len(idx)} images wrong in >= 90 % of the ensembles, "
                     f"{int((rate[idx] >= 0.5).sum())} in >= 50 %; {wrong[:, idx].sum(1).mean():.1f} wrong per ensemble on average")
    return "\n".join(lines)


def mean_sd_cells(got: list[dict]) -> list[str]:
    """``mean ± sd`` over seeds of each of KEYS, for the tables' cells."""
    return [f"{np.mean([g[k] for g in got]):.4f} ± {np.std([g[k] for g in got]):.4f}" for k in KEYS]


def expand_members(variants: dict, members) -> tuple[dict, dict[str, list[str]]]:
    """Each variant once per ensemble member: ``{NAME-mK: member K's overrides, then the
    variant's}`` (augmentations merged, as ``member_config`` merges them), and the ensembles
    ``{NAME: [NAME-m0, NAME-m1, ...]}``."""
    from deepcovid.errors import ConfigError

    if not members:
        raise ConfigError("--members needs a preset (or --base) with an ensemble; this one has a single model")
    out, ensembles = {}, {}
    for name, overrides in variants.items():
        ensembles[name] = []
        for k, member in enumerate(members):
            combo = {**member, **overrides}
            if "augment" in member or "augment" in overrides:
                combo["augment"] = {**member.get("augment", {}), **overrides.get("augment", {})}
            out[f"{name}-m{k}"] = combo
            ensembles[name].append(f"{name}-m{k}")
    return out, ensembles


def member_groups(variants) -> dict[str, list[str]]:
    """The ensembles ``expand_members`` named, recovered from the variants' names (NAME-m0, ...)."""
    groups: dict[str, list[str]] = {}
    for v in variants:
        name, sep, k = v.rpartition("-m")
        if sep and k.isdigit():
            groups.setdefault(name, []).append(v)
    return groups


def parse_ensembles(text: str, variants) -> dict[str, list[str]]:
    from deepcovid.errors import ConfigError

    try:
        ensembles = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--ensembles takes a JSON object {{name: [variant, ...]}}: {exc}") from exc
    if not isinstance(ensembles, dict) or not all(isinstance(m, list) and m for m in ensembles.values()):
        raise ConfigError("--ensembles takes a JSON object {name: [variant, ...]}, each list non-empty")
    unknown = sorted({v for m in ensembles.values() for v in m} - set(variants))
    if unknown:
        raise ConfigError(f"--ensembles names variants the sweep does not have: {', '.join(map(str, unknown))}; "
                          f"it has: {', '.join(variants)}")
    return ensembles


def ensemble_summary(probs, ensembles: dict[str, list[str]], seeds, classes, thr, rule: str | None = None) -> str:
    """Each named ensemble at each seed: the mean probability of its variants' models of that
    seed (as ``fit_ensemble`` combines members), scored at the sweep's threshold, or with
    ``rule`` (a ``--threshold`` value such as "recall=0.9") at the threshold that rule picks on
    that ensemble's own validation probabilities; then the mean and spread of those scores over
    the seeds at which every member ran (a cut-short sweep leaves some out: their cells read "-")."""
    from deepcovid.errors import ConfigError
    from deepcovid.metrics import compute_metrics
    from deepcovid.training import choose_threshold

    lines = ["| ensemble of variants | split | " + " | ".join(KEYS) + " | " + " | ".join(f"f1 at seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * (len(KEYS) + len(seeds))]

    def mean_p(members, s, part):
        y = probs[f"{members[0]}/{s}/{part}/y"]
        if any(not np.array_equal(probs[f"{m}/{s}/{part}/y"], y) for m in members):
            raise ConfigError(f"the variants {', '.join(members)} have different {part} labels at seed {s}; they must share one split")
        return y, np.mean([probs[f"{m}/{s}/{part}/p"] for m in members], axis=0)

    for name, members in ensembles.items():
        for part in ("val", "test"):
            ran = [s for s in seeds if all(f"{m}/{s}/{part}/p" in probs for m in members)
                   and (rule is None or all(f"{m}/{s}/val/p" in probs for m in members))]
            if not ran:
                continue
            got = {}
            for s in ran:
                t = thr if rule is None else choose_threshold({"threshold": rule}, *mean_p(members, s, "val"), True)
                got[s] = compute_metrics(*mean_p(members, s, part), classes, t)
            of = "" if len(ran) == len(seeds) else f", {len(ran)} seeds"
            at = "" if rule is None else f", threshold {rule} on validation"
            lines.append(f"| {name} ({' + '.join(members)}{of}{at}) | {part} | " + " | ".join(mean_sd_cells(list(got.values()))) + " | "
                         + " | ".join(f"{got[s]['f1']:.4f}" if s in got else "-" for s in seeds) + " |")
    return "\n".join(lines)


def summarize(args) -> None:
    """Print the tables of a finished sweep from OUT/results.jsonl and OUT/probs.npz (and those of
    each --also folder), training nothing."""
    from deepcovid.errors import ConfigError

    rows, probs = [], {}
    for folder in [args.out, *(args.also or [])]:
        results, npz = folder / "results.jsonl", folder / "probs.npz"
        if not (results.is_file() and npz.is_file()):
            raise ConfigError(f"--summarize reads {results} and {npz}: run the sweep with --out {folder} first")
        got = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        seen = {(r["variant"], r["seed"]) for r in rows}
        clash = sorted({f"{r['variant']} seed {r['seed']}" for r in got if (r["variant"], r["seed"]) in seen})
        if clash:
            raise ConfigError(f"{folder} repeats runs already read: {', '.join(clash)}")
        rows += got
        with np.load(npz) as z:
            probs.update({k: z[k] for k in z.files})
    if not rows:
        raise ConfigError(f"{args.out / 'results.jsonl'} holds no runs")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    ensembles = {**(member_groups(variants) if args.members else {}),
                 **(parse_ensembles(args.ensembles, variants) if args.ensembles else {})} or None
    seeds = sorted({r["seed"] for r in rows})
    thresholds = {r["threshold"] for r in rows}
    if len(thresholds) != 1:
        raise ConfigError(f"the sweep's runs have different thresholds {sorted(thresholds)}; summarize them one at a time")
    p0 = next(v for k, v in probs.items() if k.endswith("/p"))
    # The sweep saves probabilities, not class names: two classes when each image has one score.
    classes = ["negative", "positive"] if p0.ndim == 1 else [str(i) for i in range(p0.shape[1])]
    print_tables(rows, probs, variants, seeds, classes, thresholds.pop(), ensembles, args.errors, names_of_test_images(args),
                 args.rethreshold)


def names_of_test_images(args) -> list[str] | None:
    """File names of ``--data``'s test/ images in the order the sweep scored them: ``load_splits``'s
    listing of test/ (classes in the training order, positive last), less the unreadable ones, as
    the sweep's decoding drops them. Listed without carving a validation split, which test/ does
    not depend on."""
    if not args.errors or args.data is None or not (Path(args.data) / "test").is_dir():
        return None
    from deepcovid.data import DecodedImages, discover, order_classes, positive_class_of

    classes, _ = discover(Path(args.data) / "train")
    _, test = discover(Path(args.data) / "test", order_classes(classes, positive_class_of(classes)))
    return [Path(s.path).name for s in DecodedImages(test, 16, "off").samples]


def summary(rows, probs, variants, seeds, classes, thr) -> str:
    from deepcovid.metrics import compute_metrics

    lines = ["| variant | split | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for name in variants:
        for part in ("val", "test"):
            got = [r[part] for r in rows if r["variant"] == name and part in r]
            if not got:
                continue
            lines.append(f"| {name} (mean ± sd of {len(got)} seeds) | {part} | " + " | ".join(mean_sd_cells(got)) + " |")
            own = [s for s in seeds if f"{name}/{s}/{part}/p" in probs]  # a cut-short sweep may lack some
            for n in sorted({2, len(own)}):
                if len(own) < n or n < 2:
                    continue
                y = probs[f"{name}/{own[0]}/{part}/y"]
                p = np.mean([probs[f"{name}/{s}/{part}/p"] for s in own[:n]], axis=0)
                m = compute_metrics(y, p, classes, thr)
                lines.append(f"| {name} (ensemble of seeds {own[:n]}) | {part} | " + " | ".join(f"{m[k]:.4f}" for k in KEYS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="ROOT with train/ (and test/)")
    p.add_argument("--preset", default="cpu-fast")
    p.add_argument("--base", help="JSON overrides applied to the preset for every variant, e.g. '{\"device\": \"cuda\"}'")
    p.add_argument("--variants", default='{"base": {}}', help="JSON {name: overrides}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, help="where runs and results go (default runs/sweep; --quick: a temporary folder)")
    p.add_argument("--ensembles", help="JSON {name: [variant, ...]}: ensembles across variants, per seed")
    p.add_argument("--members", action="store_true",
                   help="train each variant once per member of the preset's ensemble and score the ensembles")
    p.add_argument("--also", type=Path, action="append", metavar="DIR",
                   help="with --summarize: another sweep folder to read with --out (repeatable)")
    p.add_argument("--errors", type=int, default=0, metavar="N",
                   help="also list the N test/ images of each class that the ensembles (or, without any, the "
                        "variants' models) get wrong most often, pooled over seeds; names them with --data")
    p.add_argument("--rethreshold", metavar="RULE",
                   help="also score the ensembles at the threshold RULE (a --threshold rule: val-f1 or recall=R) "
                        "picks on each ensemble's own validation probabilities, with nothing retrained")
    p.add_argument("--summarize", action="store_true",
                   help="train nothing: print the tables of the sweep already in --out")
    p.add_argument("--quick", action="store_true", help="CI mode: CPU, synthetic images, seconds (--base still applies)")
    args = p.parse_args(argv)
    if args.rethreshold:
        from deepcovid.errors import ConfigError
        from deepcovid.training import threshold_rule

        usage = "--rethreshold takes a rule that picks a threshold on validation (val-f1 or recall=R)"
        try:
            fixed = threshold_rule({"threshold": args.rethreshold})
        except ConfigError as exc:
            p.error(f"{usage}: {exc}")
        if fixed is not None:
            p.error(f"{usage}: {args.rethreshold} is a fixed threshold")
    if args.errors < 0:
        p.error(f"--errors takes a number of images, 0 or more; got {args.errors}")
    if args.summarize and (args.quick or args.out is None):
        p.error("--summarize needs --out (the finished sweep's folder) and no --quick")
    tmp = None
    if args.quick:
        from _synthetic import fast_train_config, synthetic_folder

        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        synthetic_folder(root / "data" / "train", {"NORMAL": 12, "PNEUMONIA": 12}, size=40)
        synthetic_folder(root / "data" / "test", {"NORMAL": 4, "PNEUMONIA": 4}, size=40, seed=7)
        args.data, args.out, args.seeds = root / "data", args.out or root / "out", "0,1"
        # --base still applies on top (an ensemble for --members, say), but the images stay tiny
        args.base = json.dumps({**fast_train_config(), "epochs": 1, "device": "cpu", **json.loads(args.base or "{}"),
                                "cache_dir": str(root / "cache")})
    if args.data is None and not args.summarize:
        p.error("--data is required (or --quick)")
    args.out = args.out or Path("runs/sweep")
    from deepcovid.errors import DeepCovidError

    try:
        if args.summarize:
            summarize(args)
        else:
            run(args)
    except DeepCovidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
