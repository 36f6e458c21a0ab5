"""How much does an explanation cost? One run, one model, one input, three ways.

(a) bare eager forward in ``torch.inference_mode`` (the floor);
(b) ``Predictor.explain``: prediction + Grad-CAM + overlay on the original image + activation
    maps, from one forward and a backward through the model's tail only;
(c) the plain grad-cam recipe: a separate forward for the prediction, then ``GradCAM`` with
    parameter gradients on (``requires_grad=True``) and an input tensor that requires grad.

(d) ``Predictor.predict`` is listed too, for reference. Image decoding is excluded from all rows
(the image is decoded once up front); (b) includes drawing the heat map and overlay at the
original image's size.

    python benchmarks/bench_inference.py            # efficientnet_lite0 @ 224, ImageNet weights
    python benchmarks/bench_inference.py --quick    # seconds: random init @ 64 px (CI)

Uses a real X-ray from ../shared/data/chest_xray/train when present, else a synthetic one.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = (REPO.parent / "shared" / "data" / "chest_xray" / "train").resolve()


def find_image(data_dir: Path = DATA):
    """A real X-ray path if the shared data set is there, else a synthetic (H, W) uint8 array."""
    if data_dir.is_dir():
        for cls in sorted(p for p in data_dir.iterdir() if p.is_dir()):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower() in (".jpeg", ".jpg", ".png"):
                    return f, f"real X-ray {f.relative_to(data_dir.parent)}"
    rng = np.random.default_rng(0)
    h, w = 1200, 1500
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.3 + 0.3 * np.exp(-((xx - 0.5) ** 2) / 0.02) + rng.normal(0, 0.03, (h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), f"synthetic {w}x{h} image"


def median_ms(fns, reps: int, warmup: int) -> list[float]:
    """Median wall time of each function. Calls are interleaved (rep by rep, in rotating order)
    so that load changes on a shared machine hit every method alike and the ratios stay fair."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(reps):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            t0 = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - t0) * 1000.0)
    return [statistics.median(t) for t in times]


def build(quick: bool, arch: str, size: int | None, weights: str, threads: int | None = None):
    from deepcovid.inference import Predictor
    from deepcovid.models import build_model, get_spec

    spec = get_spec(arch)
    torch.manual_seed(0)
    model = build_model(arch, 2, weights=weights)
    dc = spec.data_config
    meta = {
        "arch": arch, "classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA", "num_outputs": 1,
        "input_size": int(size or (64 if quick else dc.input_size)), "mean": list(dc.mean), "std": list(dc.std),
        "color_space": "rgb", "threshold": 0.5, "val_metrics": {}, "run": f"bench-{weights}",
    }
    return Predictor(model, meta, device="cpu", num_threads=threads), model


def run_benchmark(quick: bool = False, arch: str = "efficientnet_lite0", size: int | None = None,
                  weights: str | None = None, reps: int | None = None, warmup: int | None = None,
                  image=None, threads: int | None = None) -> dict:
    from pytorch_grad_cam import GradCAM

    from deepcovid.cam import LogitTarget

    weights = weights or ("none" if quick else "imagenet")
    reps = reps or (3 if quick else 30)
    warmup = warmup if warmup is not None else (1 if quick else 5)
    predictor, model = build(quick, arch, size, weights, threads)
    if image is None:
        image, source = find_image()
    else:
        source = "given image"
    prepared = predictor.prepare(image)  # decoded once: decoding is not what is measured
    x = prepared.tensor

    # (a) the floor
    def bare():
        with torch.inference_mode():
            return model(x)

    # (b) ours
    def ours():
        return predictor.explain(prepared, cam_method="gradcam", activations=True)

    # (c) the usual recipe, on an independent copy of the same weights with gradients on
    plain = copy.deepcopy(model).eval().requires_grad_(True)
    layers = [plain.backbone.get_submodule(n) for n in predictor.cam_layer_names]

    def recipe():
        with torch.no_grad():
            p = torch.sigmoid(plain(x))[0, 0].item()
        target = LogitTarget(+1 if p >= 0.5 else -1)
        xg = x.detach().clone().requires_grad_(True)  # input gradient on, as in the usual recipe
        with GradCAM(model=plain, target_layers=layers) as cam:
            return cam(input_tensor=xg, targets=[target])[0]

    def predict_only():
        return predictor.predict(prepared)

    results = {
        "arch": arch, "input_size": predictor.input_size, "weights": weights, "source": source,
        "original_size": tuple(prepared.image.pixels.shape[1::-1]), "threads": torch.get_num_threads(),
        "reps": reps, "rows": [],
    }
    rows = [
        ("(a) bare forward, inference_mode", bare),
        ("(b) Predictor.explain (pred+Grad-CAM+overlay+activations)", ours),
        ("(c) plain grad-cam recipe (fwd + GradCAM, param+input grads)", recipe),
        ("(d) Predictor.predict (reference)", predict_only),
    ]
    for (name, _), ms in zip(rows, median_ms([fn for _, fn in rows], reps, warmup)):
        results["rows"].append({"name": name, "ms": ms})
    base = results["rows"][0]["ms"]
    for r in results["rows"]:
        r["ratio"] = r["ms"] / base
    return results


def format_table(res: dict) -> str:
    lines = [
        f"model {res['arch']} @ {res['input_size']} px, weights={res['weights']}, input: {res['source']} "
        f"(original {res['original_size'][0]}x{res['original_size'][1]}), CPU threads={res['threads']}, "
        f"median of {res['reps']}",
        f"{'method':<64}{'median ms':>11}{'x (a)':>8}",
    ]
    for r in res["rows"]:
        lines.append(f"{r['name']:<64}{r['ms']:>11.2f}{r['ratio']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI mode: random init at 64 px, 3 repetitions")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the backbone's own, 64 with --quick)")
    ap.add_argument("--weights", default=None, help="imagenet (default) or none (default with --quick)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all available)")
    args = ap.parse_args(argv)
    res = run_benchmark(quick=args.quick, arch=args.arch, size=args.size, weights=args.weights, reps=args.reps,
                        warmup=args.warmup, threads=args.threads)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
