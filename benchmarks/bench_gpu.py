"""ResNet50 fine-tuning images/s on a GPU: where the time goes between the image files and the
tensor cores, each row a ratio against the model alone on a batch already on the device.
All rows train through deepcovid's own ``train_one_epoch`` (AMP and channels_last on CUDA).

  model only                a fixed random batch already on the device: the ceiling
  + loss read every step    the same, reading the loss on the host after every step (what
                            the training loop did before; it now reads it every 20 batches)
  + ... copied in           a pinned float32 batch, or a uint8 one normalised on the device
  loader alone              the DataLoader with nothing else: the old float32 batches from 4
                            workers, float32 from all cores but one, the uint8 batches that
                            deepcovid's loader now yields, and uint8 without augmentation
  train: ...                the whole step fed by those loaders, from the JPEGs or the
                            decoded-image cache
  on the device             deepcovid's CUDA default (--augment-on auto): the decoded train images
                            copied to the GPU once, each batch indexed, augmented (per-image
                            parameters, ``BatchAugment``) and normalised there: no workers, no
                            copies; alone, and feeding the training step
  torch.compile: ...        the same with ``torch.compile`` (``--compile``; a minute of compiling)

    python benchmarks/bench_gpu.py --data ../shared/data/chest_xray/train --compile
    python benchmarks/bench_gpu.py --quick     # CI mode: CPU, synthetic images, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Repeat:
    """A loader that yields the same batch ``n`` times (the model-only rows)."""

    def __init__(self, x, y, n: int, pinned_source=None):
        self.x, self.y, self.n, self.src = x, y, n, pinned_source

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield (self.src if self.src is not None else self.x), self.y


def _time_epochs(model, loader, criterion, opt, device, amp, epochs: int, sync_every=None, prepare=None) -> float:
    """images/s over ``epochs`` passes, after one warm-up pass (cuDNN autotuning, worker start)."""
    from deepcovid.training import train_one_epoch

    kw = dict(amp=amp, sync_every=sync_every, prepare=prepare)
    train_one_epoch(model, loader, criterion, opt, device, epoch=0, max_batches=3, **kw)
    _sync(device)
    n = 0
    t0 = time.perf_counter()
    for e in range(epochs):
        _, y, _ = train_one_epoch(model, loader, criterion, opt, device, epoch=e + 1, **kw)
        n += len(y)
    _sync(device)
    return n / (time.perf_counter() - t0)


def _loader(images, dc, batch: int, workers: int, augment: bool, device, uint8: bool = True):
    """uint8=True is deepcovid's loader (uint8 batches, one OpenCV thread per worker); False is
    the loader before (normalised float32 from the workers, OpenCV's default thread pool)."""
    from torch.utils.data import DataLoader

    from deepcovid.data import XRayDataset
    from deepcovid.transforms import AugmentConfig, build_augment

    aug = build_augment(AugmentConfig(), images.size) if augment else None
    ds = XRayDataset(images, dc.mean, dc.std, "rgb", aug, normalize=not uint8)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return _OneThreadForks(loader) if uint8 else loader


class _OneThreadForks:
    """A loader whose workers are forked with OpenCV on one thread, as ``deepcovid train``'s are
    (deepcovid.device.opencv_single_threaded_forks): the workers start in ``iter``."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from deepcovid.device import opencv_single_threaded_forks

        with opencv_single_threaded_forks():
            return iter(self.loader)


def _loader_only(loader, device, epochs: int) -> float:
    """images/s of the loader alone, batches copied to the device and nothing else."""
    def one(n_max=None):
        n = 0
        for i, (x, _) in enumerate(loader):
            if n_max is not None and i >= n_max:
                break
            x.to(device, non_blocking=True)
            n += len(x)
        _sync(device)
        return n

    one(3)
    t0 = time.perf_counter()
    n = sum(one() for _ in range(epochs))
    return n / (time.perf_counter() - t0)


def _on_device(cache, dc, b: int, device, seed: int = 0):
    """deepcovid's CUDA path: the decoded train images kept on the device, each batch indexed and
    augmented there (``DeviceBatches`` + ``BatchAugment``), then normalised."""
    from deepcovid.data import DeviceBatches
    from deepcovid.training import batch_normalizer
    from deepcovid.transforms import AugmentConfig, BatchAugment

    loader = DeviceBatches(cache, b, device, generator=torch.Generator().manual_seed(seed))
    aug, norm = BatchAugment(AugmentConfig(), cache.size), batch_normalizer(dc.mean, dc.std, "rgb")
    return loader, lambda t: norm(aug(t))


def _on_device_only(loader, prepare, device, epochs: int) -> float:
    """images/s of indexing + augmenting + normalising on the device, and nothing else."""
    def one():
        n = 0
        for x, _ in loader:
            prepare(x)
            n += len(x)
        _sync(device)
        return n

    one()
    t0 = time.perf_counter()
    n = sum(one() for _ in range(epochs))
    return n / (time.perf_counter() - t0)


def run(args) -> list[tuple[str, float | None, str]]:
    from deepcovid.data import DecodedImages, discover
    from deepcovid.device import resolve_device
    from deepcovid.models import build_model, get_spec
    from deepcovid.training import autocast_for, batch_normalizer, default_workers, make_criterion

    device = resolve_device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dc = get_spec(args.arch).data_config
    s = args.input_size or dc.input_size
    model = build_model(args.arch, 2, weights="none", freeze="none").to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    crit = make_criterion(2, [1, 1], "none", 0.1).to(device)
    amp, _ = autocast_for(device)
    workers = args.workers if args.workers is not None else default_workers(device)
    old_workers = 4 if device.type == "cuda" else workers
    prepare = batch_normalizer(dc.mean, dc.std, "rgb")
    b = args.batch_size
    rows: list[tuple[str, float | None, str]] = []

    def row(name, fn, note=""):
        t0 = time.perf_counter()
        try:
            v = fn()
        except Exception as exc:  # one failing variant must not lose the others' numbers
            v, note = None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append((name, v, note))
        print(f"  {name}: {v if v is None else round(v, 1)} img/s ({time.perf_counter() - t0:.1f} s) {note}", flush=True)

    def train(m, loader, ep, **kw):
        return _time_epochs(m, loader, crit, opt, device, amp, ep, **kw)

    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (b,), device=device)
    steps = args.model_steps
    row("model only (batch on the device)", lambda: train(model, _Repeat(x, y, steps), 2))
    row("+ loss read on the host every step", lambda: train(model, _Repeat(x, y, steps), 2, sync_every=1))
    pin = device.type == "cuda"
    f32 = torch.randn(b, 3, s, s).pin_memory() if pin else torch.randn(b, 3, s, s)
    u8 = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8)
    u8 = u8.pin_memory() if pin else u8
    row("+ float32 batch copied in every step", lambda: train(model, _Repeat(x, y, steps, f32), 2))
    row("+ uint8 batch copied in and normalised on the device",
        lambda: train(model, _Repeat(x, y, steps, u8), 2, prepare=prepare))

    _, samples = discover(Path(args.data))
    if args.max_images:
        samples = samples[: args.max_images]
    ep = args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        jpeg = DecodedImages(samples, s, "off")
        t1 = time.perf_counter()
        cache = DecodedImages(samples, s, "disk", cache_dir=Path(tmp), workers=max(1, workers))
        print(f"  {len(samples)} images; JPEG check {t1 - t0:.1f} s, cache build {time.perf_counter() - t1:.1f} s", flush=True)
        row(f"loader alone: float32 from {old_workers} workers (before)",
            lambda: _loader_only(_loader(cache, dc, b, old_workers, True, device, uint8=False), device, ep))
        row(f"loader alone: float32 from {workers} workers",
            lambda: _loader_only(_loader(cache, dc, b, workers, True, device, uint8=False), device, ep))
        row(f"loader alone: uint8 from {workers} workers", lambda: _loader_only(_loader(cache, dc, b, workers, True, device), device, ep))
        row("loader alone: uint8, no augmentation", lambda: _loader_only(_loader(cache, dc, b, workers, False, device), device, ep))
        row(f"train: decoded cache, float32 from {old_workers} workers (before)",
            lambda: train(model, _loader(cache, dc, b, old_workers, True, device, uint8=False), ep))
        row(f"train: JPEG decoded every epoch, uint8, {workers} workers",
            lambda: train(model, _loader(jpeg, dc, b, workers, True, device), ep, prepare=prepare))
        row(f"train: decoded cache, uint8, {workers} workers (deepcovid train)",
            lambda: train(model, _loader(cache, dc, b, workers, True, device), ep, prepare=prepare))
        row("train: decoded cache, uint8, no augmentation",
            lambda: train(model, _loader(cache, dc, b, workers, False, device), ep, prepare=prepare))
        dev_loader, dev_prepare = _on_device(cache, dc, b, device)
        row("on the device alone: index, augment, normalise", lambda: _on_device_only(dev_loader, dev_prepare, device, ep))
        row("train: images kept on the device, augmented there (deepcovid train on CUDA)",
            lambda: train(model, dev_loader, ep, prepare=dev_prepare))
        if args.compile:
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            row("torch.compile: model only", lambda: train(compiled, _Repeat(x, y, steps), 2))
            rows[-1] = (*rows[-1][:2], f"first call incl. compiling: {time.perf_counter() - t0:.0f} s")
            row(f"torch.compile: decoded cache, uint8, {workers} workers",
                lambda: train(compiled, _loader(cache, dc, b, workers, True, device), ep, prepare=prepare))
            row("torch.compile: images kept on the device, augmented there (--compile)",
                lambda: train(compiled, dev_loader, ep, prepare=dev_prepare))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a train folder (<CLASS>/<images>)")
    p.add_argument("--quick", action="store_true", help="CI mode: CPU, synthetic images, seconds")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--input-size", type=int)
    p.add_argument("--workers", type=int, help="loader processes (default: training's default for the device)")
    p.add_argument("--epochs", type=int, default=2, help="timed passes over the data per loader row")
    p.add_argument("--model-steps", type=int, default=20, help="steps per timed pass in the model-only rows")
    p.add_argument("--max-images", type=int)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (a minute or more of compiling)")
    args = p.parse_args(argv)

    tmp = None
    if args.quick:
        from _synthetic import synthetic_folder

        tmp = tempfile.TemporaryDirectory()
        args.data = synthetic_folder(Path(tmp.name) / "train", {"NORMAL": 4, "PNEUMONIA": 4}, size=48)
        args.device, args.batch_size, args.input_size, args.workers = "cpu", 4, 32, 0
        args.epochs, args.model_steps = 1, 2
    if args.data is None:
        p.error("--data is required (or --quick)")

    from deepcovid.device import resolve_device

    dev = resolve_device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# deepcovid GPU training benchmark ({args.arch}, batch {args.batch_size}, {card}, torch {torch.__version__})\n",
          flush=True)
    rows = run(args)
    base = rows[0][1]
    print("\n| path | images/s | × model only | note |\n|---|---|---|---|")
    for name, v, note in rows:
        ratio = f"{v / base:.2f}" if v and base else "-"
        # whole images/s, but two significant digits below 10 (a quick run on a busy CPU can be
        # slower than one image a second, which would print as 0)
        shown = f"{v:.0f}" if v and v >= 10 else f"{v:.2g}" if v else "-"
        print(f"| {name} | {shown} | {ratio} | {note} |" if v else f"| {name} | - | - | {note} |")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
