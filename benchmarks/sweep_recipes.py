"""Recipe variants × seeds: one model per (variant, seed), on one fixed patient-level validation
split, with validation and test/ metrics at the run's threshold, their mean and spread over seeds,
and the seed ensembles (mean probability) of each variant.

Seeds matter on this data: two seeds of one recipe differ by up to 0.02 in test/ AUC, so a
change is only worth keeping if it moves the mean by more than the spread. test/ is reported
for comparing recipes, as the data README allows; nothing here chooses an epoch or a threshold.

    python benchmarks/sweep_recipes.py --data ../shared/data/chest_xray --preset cpu-fast \\
        --variants '{"base": {}, "zoom": {"augment": {"zoom": 0.1}}}' --seeds 0,1,2 --out runs/sweep
    python benchmarks/sweep_recipes.py --quick     # CI mode: CPU, synthetic images, seconds

Writes OUT/results.jsonl (one line per run) and OUT/probs.npz (labels and probabilities).
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
    print(summary(rows, probs, variants, seeds, classes, thr))
    return rows


def summary(rows, probs, variants, seeds, classes, thr) -> str:
    from deepcovid.metrics import compute_metrics

    lines = ["| variant | split | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for name in variants:
        for part in ("val", "test"):
            got = [r[part] for r in rows if r["variant"] == name and part in r]
            if not got:
                continue
            cells = [f"{np.mean([g[k] for g in got]):.4f} ± {np.std([g[k] for g in got]):.4f}" for k in KEYS]
            lines.append(f"| {name} (mean ± sd of {len(got)} seeds) | {part} | " + " | ".join(cells) + " |")
            for n in sorted({2, len(seeds)}):
                if len(seeds) < n or n < 2:
                    continue
                y = probs[f"{name}/{seeds[0]}/{part}/y"]
                p = np.mean([probs[f"{name}/{s}/{part}/p"] for s in seeds[:n]], axis=0)
                m = compute_metrics(y, p, classes, thr)
                lines.append(f"| {name} (ensemble of seeds {seeds[:n]}) | {part} | " + " | ".join(f"{m[k]:.4f}" for k in KEYS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="ROOT with train/ (and test/)")
    p.add_argument("--preset", default="cpu-fast")
    p.add_argument("--base", help="JSON overrides applied to the preset for every variant, e.g. '{\"device\": \"cuda\"}'")
    p.add_argument("--variants", default='{"base": {}}', help="JSON {name: overrides}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, help="where runs and results go (default runs/sweep; --quick: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="CI mode: CPU, synthetic images, seconds")
    args = p.parse_args(argv)
    tmp = None
    if args.quick:
        from _synthetic import fast_train_config, synthetic_folder

        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        synthetic_folder(root / "data" / "train", {"NORMAL": 12, "PNEUMONIA": 12}, size=40)
        synthetic_folder(root / "data" / "test", {"NORMAL": 4, "PNEUMONIA": 4}, size=40, seed=7)
        args.data, args.out, args.seeds = root / "data", args.out or root / "out", "0,1"
        args.base = json.dumps({**fast_train_config(), "epochs": 1, "device": "cpu", "cache_dir": str(root / "cache")})
    if args.data is None:
        p.error("--data is required (or --quick)")
    args.out = args.out or Path("runs/sweep")
    from deepcovid.errors import DeepCovidError

    try:
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
