"""Training-side speed benchmarks, each a ratio against its own baseline measured in the same run.

1. Decoded-image cache: data-pipeline images/s (decode + resize + Table-1 augmentation +
   normalise) from the memory-mapped uint8 cache, against decoding the JPEG every time.
   Measured on the shared 224 px JPEGs and on copies re-encoded at 1024 px (the original
   Kermany release has grayscale JPEGs of about 1000-2900 px; real data looks like that).
2. Frozen-backbone feature cache: wall time of a head-only run with cached features against
   the same run computing the backbone every epoch (its frozen layers served, as deepcovid train
   runs them, and as trained), and their validation metrics side by side; also a later run that
   reads the features the first one left on disk.
3. Scaling: seconds per training epoch at 1x, 2x and 4x a base subset (by repetition) and at
   several input sizes.
4. CPU memory allocator: a full fine-tuning step with glibc's default malloc against the same
   step with freed memory kept for reuse (``deepcovid.device.keep_freed_memory``, which the
   ``deepcovid`` command applies for train, evaluate and predict), each in a fresh process.

    python benchmarks/bench_training.py            # full mode (minutes on a 2-core CPU)
    python benchmarks/bench_training.py --quick    # CI mode (seconds, synthetic data)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "chest_xray"


def _samples(root: Path, n: int, seed: int = 0):
    from deepcovid.data import discover

    _, samples = discover(root)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(samples), size=min(n, len(samples)), replace=False)
    return [samples[i] for i in sorted(idx)]


def _synthetic_root(tmp: Path, n: int, size: int) -> Path:
    from _synthetic import synthetic_folder

    return synthetic_folder(tmp / "train", {"NORMAL": n // 2, "PNEUMONIA": n - n // 2}, size=size)


def _reencode(samples, out: Path, size: int):
    """Copies of the images as grayscale JPEGs of ``size`` px, like the original release."""
    from PIL import Image

    from deepcovid.data import Sample

    out.mkdir(parents=True, exist_ok=True)
    res = []
    for i, s in enumerate(samples):
        p = out / f"{i:05d}_{Path(s.path).name}"
        Image.open(s.path).convert("L").resize((size, size), Image.BICUBIC).save(p, quality=90)
        res.append(Sample(str(p), s.label, s.patient))
    return res


def bench_pipeline(samples, size: int, cache_dir: Path, passes: int, augment: bool = True) -> dict:
    from deepcovid.data import DecodedImages, XRayDataset
    from deepcovid.transforms import AugmentConfig, build_augment

    aug = build_augment(AugmentConfig(), size) if augment else None
    out = {}
    for mode in ("off", "disk"):
        t0 = time.perf_counter()
        images = DecodedImages(samples, size, mode, cache_dir=cache_dir)
        setup = time.perf_counter() - t0
        ds = XRayDataset(images, (0.5,) * 3, (0.5,) * 3, "rgb", aug)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(passes):
            for i in range(len(ds)):
                ds[i]
        dt = time.perf_counter() - t0
        out[mode] = {"img_per_s": passes * len(ds) / dt, "setup_s": setup}
    return out


def pipeline_components(samples, size: int, cache_dir: Path) -> dict:
    """Milliseconds per image of each pipeline stage, to show where the cache's ratio is capped:
    the cache removes only the decode, so the ratio cannot exceed
    (decode + augment + normalise) / (read + augment + normalise)."""
    from deepcovid.data import DecodedImages, decode_for_training
    from deepcovid.transforms import AugmentConfig, build_augment, normalize

    images = DecodedImages(samples, size, "disk", cache_dir=cache_dir)
    aug = build_augment(AugmentConfig(), size)
    arrays = [images.get(i) for i in range(len(images))]
    tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]

    def per_image(fn, items) -> float:
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        return (time.perf_counter() - t0) / len(items) * 1000

    torch.manual_seed(0)
    ms = {"decode": per_image(lambda s: decode_for_training(s.path, size), samples),
          "read": per_image(images.get, range(len(images))),
          "augment": per_image(aug, tensors),
          "normalise": per_image(lambda x: normalize(x, (0.5,) * 3, (0.5,) * 3), tensors)}
    rest = ms["augment"] + ms["normalise"]
    ms["ceiling_aug"] = (ms["decode"] + rest) / (ms["read"] + rest)
    ms["ceiling_noaug"] = (ms["decode"] + ms["normalise"]) / (ms["read"] + ms["normalise"])
    return ms


def bench_feature_cache(root: Path, size: int, epochs: int, arch: str, max_images: int | None) -> dict:
    from deepcovid.data import load_splits
    from deepcovid.training import fit, resolve_config

    splits = load_splits(root.parent if root.name == "train" else root, val_fraction=0.1, seed=0)
    if max_images:
        rng = np.random.default_rng(0)
        splits.train = [splits.train[i] for i in sorted(rng.choice(len(splits.train), min(max_images, len(splits.train)), replace=False))]
        nv = min(len(splits.val), max(20, max_images // 8))
        splits.val = [splits.val[i] for i in sorted(rng.choice(len(splits.val), nv, replace=False))]
    splits.test = None
    import deepcovid.training as training

    out, extract_s = {}, []
    real_build, real_serve = training.FeatureCache.build, training.serve_frozen

    def timed_build(*a, **k):  # the cached run's one pass over the frozen backbone
        t0 = time.perf_counter()
        try:
            return real_build(*a, **k)
        finally:
            extract_s.append(time.perf_counter() - t0)

    def as_trained(prefix, example, amp, purpose="caching"):  # the frozen layers as the model trains them
        return prefix

    training.FeatureCache.build = timed_build
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # uncached (the frozen layers served every epoch, as deepcovid train runs them since
            # 2026-12-06) and uncached with the layers as trained (the baseline before); cached
            # (features computed in the run, by the frozen layers served); the same with the layers
            # as trained (what caching alone gains); then twice with the feature cache on disk: the
            # first writes it, the second is a later run on the same data, backbone and views
            # (another --lr, say), which reads the features instead.
            for name, cached, cache in (("uncached", False, "memory"), ("uncached as trained", False, "memory"),
                                        ("cached", True, "memory"), ("as trained", True, "memory"),
                                        ("writes disk cache", True, "disk"), ("reused", True, "disk")):
                cfg = resolve_config({"arch": arch, "weights": "imagenet", "freeze": "backbone", "epochs": epochs,
                                      "input_size": size, "no_augment": True, "patience": 0, "cache": cache,
                                      "cache_dir": str(Path(tmp) / "cache"), "feature_cache": cached, "lr": 1e-3})
                extract_s.clear()
                training.serve_frozen = as_trained if "as trained" in name else real_serve
                t0 = time.perf_counter()
                res = fit({**cfg, "run_name": name.replace(" ", "-")}, splits.root, Path(tmp), splits=splits)
                seconds = time.perf_counter() - t0
                with (res.run_dir / "history.csv").open() as f:
                    epoch_s = [float(row["seconds"]) for row in csv.DictReader(f)]
                out[name] = {"seconds": seconds, "epoch_s": epoch_s, **res.val_metrics,
                             "extract_s": extract_s[0] if extract_s else float("nan")}
    finally:
        training.FeatureCache.build, training.serve_frozen = real_build, real_serve
    return out


def bench_scaling(samples, sizes: list[int], reps: list[int], arch: str, batch: int) -> list[dict]:
    from torch.utils.data import ConcatDataset, DataLoader

    from deepcovid.data import DecodedImages, XRayDataset
    from deepcovid.models import build_model
    from deepcovid.training import make_criterion, train_one_epoch
    from deepcovid.transforms import AugmentConfig, build_augment

    rows = []
    dev = torch.device("cpu")
    for size in sizes:
        images = DecodedImages(samples, size, "memory")
        ds = XRayDataset(images, (0.5,) * 3, (0.5,) * 3, "rgb", build_augment(AugmentConfig(), size))
        for r in reps:
            torch.manual_seed(0)
            model = build_model(arch, 2, weights="none", freeze="none")
            opt = torch.optim.Adam(model.parameters(), 1e-4)
            loader = DataLoader(ConcatDataset([ds] * r), batch_size=batch, shuffle=True)
            crit = make_criterion(2, [1, 1], "none", 0.0)
            # one untimed batch first: oneDNN builds its kernels for a new input shape once per
            # process, a one-off that is not part of any epoch
            train_one_epoch(model, loader, crit, opt, dev, epoch=0, max_batches=1)
            t0 = time.perf_counter()
            train_one_epoch(model, loader, crit, opt, dev, epoch=1)
            dt = time.perf_counter() - t0
            rows.append({"size": size, "images": len(ds) * r, "seconds": dt, "img_per_s": len(ds) * r / dt})
    return rows


# One child process per allocator setting (the setting is process-wide and one-way): a few
# training steps on random inputs; time, kernel time and page faults per step.
_ALLOCATOR_CHILD = """
import json, resource, sys, time
import torch
from deepcovid.device import keep_freed_memory
from deepcovid.models import build_model
arch, size, batch, steps, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
applied = keep_freed_memory() if keep else False
torch.set_num_threads(int(sys.argv[6]))
torch.manual_seed(0)
model = build_model(arch, 2, weights="none", freeze="none").train().to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.rand(batch, 1)
loss_fn = torch.nn.BCEWithLogitsLoss()
def step():
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    opt.step()
for _ in range(2):  # oneDNN's kernels for this shape, and the allocator's first blocks
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"applied": applied, "step_s": dt / steps, "sys_s": (r1.ru_stime - r0.ru_stime) / steps,
                  "faults": (r1.ru_minflt - r0.ru_minflt) / steps}))
"""


def bench_allocator(arch: str, size: int, batch: int, steps: int) -> dict:
    out = {}
    for name, keep in (("default", "0"), ("kept", "1")):
        res = subprocess.run([sys.executable, "-c", _ALLOCATOR_CHILD, arch, str(size), str(batch), str(steps), keep,
                              str(torch.get_num_threads())], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def print_allocator(args) -> None:
    a_size, a_batch, a_steps = (32, 4, 2) if args.quick else (224, 32, args.allocator_steps)
    print(f"\n## 4. CPU memory allocator (full fine-tuning step of {args.arch}, batch {a_batch}, {a_size} px, "
          f"{a_steps} steps after 2 untimed ones, each setting in a fresh process)\n")
    r = bench_allocator(args.arch, a_size, a_batch, a_steps)
    print("| glibc malloc | seconds per step | kernel seconds per step | page faults per step |\n|---|---|---|---|")
    for name, label in (("default", "default (freed blocks go back to the kernel)"),
                        ("kept", "freed memory kept (`keep_freed_memory`)" + ("" if r["kept"]["applied"] else ", not available here"))):
        print(f"| {label} | {r[name]['step_s']:.3f} | {r[name]['sys_s']:.3f} | {r[name]['faults']:.0f} |")
    print(f"\nspeed-up of a training step: {r['default']['step_s'] / r['kept']['step_s']:.2f}x")


def print_feature_cache(train_root: Path, fe_size: int, fe_epochs: int, arch: str, fe_images: int | None) -> None:
    """Section 2, printed."""
    print(f"\n## 2. frozen-backbone feature cache ({arch}, {fe_epochs} head-only epochs, {fe_size} px, no augmentation)\n")
    r = bench_feature_cache(train_root, fe_size, fe_epochs, arch, fe_images)
    print("| path | seconds | val F1 | val AUC | val loss |\n|---|---|---|---|---|")
    labels = {"uncached": "uncached (frozen layers served every epoch: the default)",
              "uncached as trained": "uncached, frozen layers as trained (the default before 2026-12-06)",
              "cached": "cached (frozen layers served: the default)",
              "as trained": "cached, frozen layers as trained (caching alone)",
              "reused": "cached, features read from disk (a later run: same data, backbone, views)"}
    for k, label in labels.items():
        print(f"| {label} | {r[k]['seconds']:.1f} | {r[k]['f1']:.4f} | {r[k]['auc']:.4f} | {r[k]['loss']:.4f} |")
    print(f"\nspeed-up: {r['uncached']['seconds'] / r['cached']['seconds']:.1f}x, both as deepcovid train runs them "
          f"(caching alone: {r['uncached as trained']['seconds'] / r['as trained']['seconds']:.1f}x with the frozen "
          f"layers as trained in both; against the uncached run as "
          f"trained: {r['uncached as trained']['seconds'] / r['cached']['seconds']:.1f}x; "
          f"features read from disk: {r['uncached']['seconds'] / r['reused']['seconds']:.1f}x)")
    unc_epoch = float(np.median(r["uncached"]["epoch_s"]))
    unc_trained = float(np.median(r["uncached as trained"]["epoch_s"]))
    served, trained = r["cached"]["extract_s"], r["as trained"]["extract_s"]
    print(f"\nThe cached run must still pass every image through the frozen backbone once: that pass took "
          f"{served:.1f} s served ({trained:.1f} s as trained), one uncached epoch "
          f"{unc_epoch:.1f} s served ({unc_trained:.1f} s as trained; medians), one cached epoch "
          f"{float(np.median(r['cached']['epoch_s'])):.3f} s. Ceiling for {fe_epochs} epochs, set-up excluded: "
          f"{fe_epochs} x {unc_epoch:.1f} / {served:.1f} = {fe_epochs * unc_epoch / served:.1f}x served, "
          f"{fe_epochs} x {unc_trained:.1f} / {trained:.1f} = {fe_epochs * unc_trained / trained:.1f}x as trained.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI mode: synthetic data, seconds")
    p.add_argument("--pipeline-images", type=int, default=400)
    p.add_argument("--feature-epochs", type=int, default=20)
    p.add_argument("--feature-images", type=int, default=None, help="subset of train/ for the feature-cache run (default: all)")
    p.add_argument("--scaling-base", type=int, default=128, help="images in the 1x set of the scaling benchmark")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--allocator-steps", type=int, default=8, help="timed training steps per allocator setting")
    p.add_argument("--only-allocator", action="store_true", help="run section 4 only")
    p.add_argument("--only-feature-cache", action="store_true", help="run section 2 only (on train/ of the shared data)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed memory for reuse, as the deepcovid command does (section 4), for the whole run")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    if args.keep_freed_memory:
        from deepcovid.device import keep_freed_memory

        print(f"freed memory kept for reuse (as `deepcovid train` runs): {keep_freed_memory()}")
    if args.only_allocator:
        print_allocator(args)
        return 0
    if args.only_feature_cache:
        if not (SHARED / "train").is_dir():
            raise SystemExit(f"--only-feature-cache needs {SHARED / 'train'}")
        print_feature_cache(SHARED / "train", 224, args.feature_epochs, args.arch, args.feature_images)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick or not (SHARED / "train").is_dir():
            train_root = _synthetic_root(tmp / "syn", 32 if args.quick else 400, 224)
            n_pipe, bigs, fe_epochs, fe_images, base, sizes = 12, (512, 1024), 2, None, 8, [32, 48]
            fe_size, reps = 32, [1, 2]
        else:
            train_root = SHARED / "train"
            # the original Kermany JPEGs are about 1000-2900 px: 1024 and 2048 bracket them
            n_pipe, bigs, fe_epochs, fe_images, base, sizes = (args.pipeline_images, (1024, 2048), args.feature_epochs,
                                                              args.feature_images, args.scaling_base, [160, 224, 299])
            fe_size, reps = 224, [1, 2, 4]
        print(f"# deepcovid training benchmarks ({'quick' if args.quick else 'full'}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads, {os.cpu_count()} cores)\n")

        samples = _samples(train_root, n_pipe)
        print("## 1. decoded-image cache (decode + resize [+ Table 1 augmentation] + normalise, images/s)\n")
        print("| source | augmentation | JPEG decoded every time | memory-mapped cache | ratio | cache build (s) |\n"
              "|---|---|---|---|---|---|")
        sources = [("shared 224 px JPEG", samples)]
        sources += [(f"{big} px grayscale JPEG", _reencode(samples, tmp / f"big{big}", big)) for big in bigs]
        for augment in (True, False):
            for label, smp in sources:
                r = bench_pipeline(smp, 224, tmp / "cache", passes=2, augment=augment)
                print(f"| {label} | {'on' if augment else 'off'} | {r['off']['img_per_s']:.0f} | {r['disk']['img_per_s']:.0f} | "
                      f"{r['disk']['img_per_s'] / r['off']['img_per_s']:.2f}x | {r['disk']['setup_s']:.1f} |")
        print("\nWhere the time goes (ms per image) and the highest ratio the cache can reach, since it removes only "
              "the decode:\n\n| source | decode | cache read | augment | normalise | ceiling, aug on | ceiling, aug off |\n"
              "|---|---|---|---|---|---|---|")
        for label, smp in sources:
            c = pipeline_components(smp, 224, tmp / "cache")
            print(f"| {label} | {c['decode']:.2f} | {c['read']:.3f} | {c['augment']:.2f} | {c['normalise']:.2f} | "
                  f"{c['ceiling_aug']:.2f}x | {c['ceiling_noaug']:.2f}x |")

        print_feature_cache(train_root, fe_size, fe_epochs, args.arch, fe_images)

        print(f"\n## 3. scaling (full fine-tune of {args.arch}, seconds per epoch)\n")
        rows = bench_scaling(_samples(train_root, base), sizes, reps, args.arch, 8 if args.quick else 16)
        print("| input | images | seconds | images/s | s per 1x |\n|---|---|---|---|---|")
        for row in rows:
            one_x = next(x for x in rows if x["size"] == row["size"])
            print(f"| {row['size']} | {row['images']} | {row['seconds']:.1f} | {row['img_per_s']:.1f} | "
                  f"{row['seconds'] / (row['images'] / one_x['images']):.1f} |")

    print_allocator(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
