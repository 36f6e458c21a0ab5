"""How much does an explanation cost? One run, one model, one input, three ways.

(a) bare eager forward in ``torch.inference_mode`` (the floor);
(b) ``Predictor.explain``: prediction + Grad-CAM + overlay on the original image + activation
    maps, from one forward and a backward through the model's tail only;
(c) the plain grad-cam recipe: a separate forward for the prediction, then ``GradCAM`` with
    parameter gradients on (``requires_grad=True``) and an input tensor that requires grad.

(d) ``Predictor.predict`` and (e) ``explain`` without the activation maps are listed too, to show
where (b)'s time goes, and (f) the bare forward of the checkpoint's own modules: (a), (b), (d)
and (e) run the model as the ``Predictor`` serves it, with BatchNorm folded into the
convolutions (``deepcovid/bnfold.py``), TensorFlow 'same' convolutions without their padding
copy (``deepcovid/samepad.py``) and convolution weights packed once for oneDNN, each ReLU/ReLU6
after one applied by it (``deepcovid/prepack.py``); (c) and (f) run it as the checkpoint rebuilds it. Image
decoding is excluded from all rows (the image is decoded once up front); (b) includes drawing
the heat map and overlay at the original image's size.

A second table compares the CPU speed options of ``Predictor.predict`` (``precision`` x
``backend`` x memory layout x BatchNorm folding x padding x weight packing x activation fusion) in the same run: median latency of one
image, the ratio to fp32 eager NCHW with the checkpoint's modules (the pre-optimisation path), and the
largest |probability difference| from it over the test images (tolerance 1e-3 for fp32
variants, 1e-2 for bf16). A variant is worth
adopting only if it is both faster and within tolerance. Below it, the Grad-CAM agreement of the
channels_last model, and of bf16 autocast (why ``explain`` stays float32 under bf16).

    python benchmarks/bench_inference.py            # efficientnet_lite0 @ 224, ImageNet weights
    python benchmarks/bench_inference.py --quick    # seconds: random init @ 64 px, no torch.compile (CI)
    python benchmarks/bench_inference.py --no-variants --tta hflip   # the first table for a flip-TTA model
    python benchmarks/bench_inference.py --no-variants --checkpoint best   # a trained checkpoint, as served

With ``--tta hflip`` the model is the one a ``--tta hflip`` checkpoint serves: (a) is its own
forward (the image and its mirror as one batch, mean probability), (b) explains both views as
``predict``/``explain`` do, and (c) runs the plain recipe on both views.

Uses real X-rays from ../shared/data/chest_xray/train when present (one for the first table,
16 for the second), else synthetic ones.
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


def find_images(n: int, data_dir: Path = DATA) -> tuple[list, str]:
    """Up to ``n`` real X-rays (classes alternating) if the shared data set is there, else ``n``
    synthetic (H, W) uint8 arrays."""
    if data_dir.is_dir():
        per_class = [[f for f in sorted(cls.iterdir()) if f.suffix.lower() in (".jpeg", ".jpg", ".png")]
                     for cls in sorted(p for p in data_dir.iterdir() if p.is_dir())]
        picked = []
        for k in range(n):
            for files in per_class:
                if len(picked) < n and k < len(files):
                    picked.append(files[k])
        if picked:
            return picked, f"{len(picked)} real X-rays from {data_dir.name}/"
    rng = np.random.default_rng(1)
    out = []
    for k in range(n):
        h, w = 300 + 17 * k, 360 + 11 * k
        yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
        img = 0.3 + 0.3 * np.exp(-((xx - 0.5) ** 2) / 0.02)
        img += 0.3 * (k % 2) * np.exp(-(((xx - rng.uniform(0.2, 0.8)) ** 2) + (yy - 0.5) ** 2) / 0.01)
        out.append((np.clip(img + rng.normal(0, 0.03, (h, w)), 0, 1) * 255).astype(np.uint8))
    return out, f"{n} synthetic images"


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


def build(quick: bool, arch: str, size: int | None, weights: str, threads: int | None = None, tta: str = "none",
          checkpoint: str | None = None, checkpoints_dir: str = "checkpoints"):
    """(the Predictor, its model (rewritten in place for serving: BatchNorm folded, no 'same'
    padding copy, packed weights), a copy of the checkpoint's modules as rebuilt). With
    ``checkpoint`` the model, its size and its test-time augmentation are the checkpoint's."""
    from deepcovid.inference import Predictor
    from deepcovid.models import build_model, check_tta, get_spec

    if checkpoint is not None:
        from deepcovid.checkpoint import load_checkpoint

        loaded = load_checkpoint(checkpoint, checkpoints_dir)
        model, meta = loaded.build_model(), dict(loaded.meta)
        meta["run"] = str(loaded.path)
    else:
        spec = get_spec(arch)
        torch.manual_seed(0)
        model = build_model(arch, 2, weights=weights)
        model.tta = check_tta(tta)  # as build_from_meta sets it from a checkpoint
        dc = spec.data_config
        meta = {
            "arch": arch, "classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA", "num_outputs": 1,
            "input_size": int(size or (64 if quick else dc.input_size)), "mean": list(dc.mean), "std": list(dc.std),
            "color_space": "rgb", "threshold": 0.5, "val_metrics": {}, "run": f"bench-{weights}",
        }
    unfolded = copy.deepcopy(model)  # the checkpoint's modules; the Predictor folds its model in place
    predictor = Predictor(model, meta, device="cpu", num_threads=threads)
    unfolded.eval().requires_grad_(False)
    unfolded.to(memory_format=torch.channels_last if predictor.channels_last else torch.contiguous_format)
    return predictor, model, unfolded


def run_benchmark(quick: bool = False, arch: str = "efficientnet_lite0", size: int | None = None,
                  weights: str | None = None, reps: int | None = None, warmup: int | None = None,
                  image=None, threads: int | None = None, tta: str = "none", checkpoint: str | None = None,
                  checkpoints_dir: str = "checkpoints") -> dict:
    from pytorch_grad_cam import GradCAM

    from deepcovid.cam import LogitTarget
    from deepcovid.models import merge_tta, tta_views

    weights = weights or ("none" if quick else "imagenet")
    reps = reps or (3 if quick else 30)
    warmup = warmup if warmup is not None else (1 if quick else 5)
    predictor, model, unfolded = build(quick, arch, size, weights, threads, tta, checkpoint, checkpoints_dir)
    if checkpoint is not None:
        arch, weights, tta = f"{predictor.arch} ({predictor.meta['run']})", "checkpoint", predictor.tta
    if image is None:
        image, source = find_image()
    else:
        source = "given image"
    prepared = predictor.prepare(image)  # decoded once: decoding is not what is measured
    x = prepared.tensor

    # (a) the floor: the served (folded) model
    def bare():
        with torch.inference_mode():
            return model(x)

    # (f) the same forward on the checkpoint's modules
    def bare_unfolded():
        with torch.inference_mode():
            return unfolded(x)

    # (b) ours
    def ours():
        return predictor.explain(prepared, cam_method="gradcam", activations=True)

    # (c) the usual recipe, on an independent copy of the checkpoint's model with gradients on
    plain = copy.deepcopy(unfolded).eval().requires_grad_(True)
    plain.tta = "none"  # the recipe makes the views itself (grad-cam needs one output per view)
    layers = [plain.backbone.get_submodule(n) for n in predictor.cam_layer_names]

    def recipe():
        views = tta_views(x, tta)
        with torch.no_grad():
            p = torch.sigmoid(merge_tta(plain(views), tta, 1))[0, 0].item()
        target = LogitTarget(+1 if p >= 0.5 else -1)
        xg = views.detach().clone().requires_grad_(True)  # input gradient on, as in the usual recipe
        with GradCAM(model=plain, target_layers=layers) as cam:
            return cam(input_tensor=xg, targets=[target] * xg.shape[0])[0]

    def predict_only():
        return predictor.predict(prepared)

    results = {
        "arch": arch, "input_size": predictor.input_size, "weights": weights, "source": source, "tta": tta,
        "original_size": tuple(prepared.image.pixels.shape[1::-1]), "threads": torch.get_num_threads(),
        "reps": reps, "rows": [],
    }
    rows = [
        (f"(a) bare forward, inference_mode (served: {served_steps(predictor)})", bare),
        ("(b) Predictor.explain (pred+Grad-CAM+overlay+activations)", ours),
        ("(c) plain grad-cam recipe (fwd + GradCAM, param+input grads)", recipe),
        ("(d) Predictor.predict (reference)", predict_only),
        ("(e) Predictor.explain without the activation maps", lambda: predictor.explain(prepared, cam_method="gradcam")),
        ("(f) bare forward, the checkpoint's modules (as rebuilt)", bare_unfolded),
    ]
    for (name, _), ms in zip(rows, median_ms([fn for _, fn in rows], reps, warmup)):
        results["rows"].append({"name": name, "ms": ms})
    base = results["rows"][0]["ms"]
    for r in results["rows"]:
        r["ratio"] = r["ms"] / base
    return results


# ---------------------------------------------------------------------------------------
# predict: speed options
# ---------------------------------------------------------------------------------------

# (key, label, Predictor keyword arguments, tolerance on |probability - fp32 eager NCHW|)
# Rows without fold_bn / unpad_same / prepack fold BatchNorm, drop the 'same' padding copy and
# pack the convolution weights, as the Predictor does by default; the first two serve the
# checkpoint's modules as they are.
AS_IS = dict(fold_bn=False, unpad_same=False, prepack=False)
VARIANTS = [
    ("fp32", "fp32 eager NCHW (baseline)", dict(precision="fp32", channels_last=False, **AS_IS), 1e-3),
    ("cl", "fp32 eager channels_last", dict(precision="fp32", channels_last=True, **AS_IS), 1e-3),
    ("cl_fold", "fp32 channels_last+BN fold", dict(precision="fp32", channels_last=True, unpad_same=False,
                                                    prepack=False), 1e-3),
    ("cl_fold_unpad", "fp32 cl+BN fold+no pad copy", dict(precision="fp32", channels_last=True, prepack=False), 1e-3),
    ("cl_fold_unpad_pack", "fp32 cl+fold+no pad+packed", dict(precision="fp32", channels_last=True, fuse_act=False),
     1e-3),
    ("cl_fold_unpad_pack_fuse", "fp32 cl+fold+no pad+packed+ReLU fused (default)", dict(precision="fp32",
                                                                                      channels_last=True), 1e-3),
    ("bf16", "bf16 eager NCHW+BN fold", dict(precision="bf16", channels_last=False), 1e-2),
    ("bf16_cl", "bf16 channels_last+BN fold", dict(precision="bf16", channels_last=True), 1e-2),
    ("compile", "fp32 torch.compile (freezing)", dict(precision="fp32", backend="compile"), 1e-3),
    ("compile_bf16", "bf16 torch.compile (freezing)", dict(precision="bf16", backend="compile"), 1e-2),
    ("onnx", "fp32 onnxruntime", dict(precision="fp32", backend="onnx"), 1e-3),
]


def _cam_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Pearson correlation, max |a - b|) of two normalised CAMs; a constant CAM correlates 1
    with an equal one and 0 otherwise."""
    diff = float(np.abs(a - b).max())
    if a.std() == 0 or b.std() == 0:
        return (1.0 if diff < 1e-3 else 0.0), diff
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), diff


def run_variants(quick: bool = False, arch: str = "efficientnet_lite0", size: int | None = None,
                 weights: str | None = None, reps: int | None = None, warmup: int | None = None,
                 threads: int | None = None, n_images: int | None = None, compile: bool | None = None,
                 images=None, checkpoint: str | None = None, checkpoints_dir: str = "checkpoints") -> dict:
    """Every speed option of ``Predictor.predict`` against fp32 eager NCHW, in one run."""
    from deepcovid.errors import DeepCovidError
    from deepcovid.inference import Predictor

    weights = weights or ("none" if quick else "imagenet")
    reps = reps or (3 if quick else 20)
    warmup = warmup if warmup is not None else (1 if quick else 3)
    n_images = n_images or (4 if quick else 16)
    compile = (not quick) if compile is None else compile
    base_predictor, _, model = build(quick, arch, size, weights, threads, checkpoint=checkpoint,
                                     checkpoints_dir=checkpoints_dir)  # the unfolded model
    if checkpoint is not None:
        arch, weights = f"{base_predictor.arch} ({base_predictor.meta['run']})", "checkpoint"
    state = copy.deepcopy(model.state_dict())
    if images is None:
        images, source = find_images(n_images)
    else:
        source = f"{len(images)} given images"
    prepared = [base_predictor.prepare(im) for im in images]  # decoded once, shared by all variants

    results = {"arch": arch, "input_size": base_predictor.input_size, "weights": weights, "source": source,
               "threads": torch.get_num_threads(), "reps": reps, "rows": [], "cam": []}
    built = []
    for key, label, kwargs, tol in VARIANTS:
        row = {"key": key, "name": label, "tol": tol, "ms": None, "ratio": None, "max_dprob": None,
               "build_s": None, "error": None}
        results["rows"].append(row)
        if not compile and kwargs.get("backend") == "compile":
            row["error"] = "skipped (--quick / --no-compile)"
            continue
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        t0 = time.perf_counter()
        try:
            p = Predictor(m, dict(base_predictor.meta), device="cpu", num_threads=threads, **kwargs)
        except DeepCovidError as exc:
            row["error"] = f"unavailable: {exc}"[:120]
            continue
        row["build_s"] = time.perf_counter() - t0
        built.append((row, p))

    ref = built[0][1]
    ref_probs = np.stack([pr.probabilities[ref.classes[-1]] for pr in [ref.predict(q) for q in prepared]])
    for row, p in built:
        probs = np.stack([p.predict(q).probabilities[p.classes[-1]] for q in prepared])
        row["max_dprob"] = float(np.abs(probs - ref_probs).max())
    one = prepared[0]
    times = median_ms([(lambda p=p: p.predict(one)) for _, p in built], reps, warmup)
    for (row, _), ms in zip(built, times):
        row["ms"] = ms
        row["ratio"] = ms / times[0]
        row["within_tol"] = row["max_dprob"] <= row["tol"]
        row["faster"] = row["ratio"] < 1.0

    # Grad-CAM agreement with the fp32 NCHW eager explanation (predicted class).
    by_key = {row["key"]: p for row, p in built}
    ref_cams = [ref.explain(q).cam for q in prepared]
    checks = [("fp32 channels_last + BN folded + no pad copy + packed + ReLU fused (adopted)",
               by_key.get("cl_fold_unpad_pack_fuse"),
               None)]
    if "bf16_cl" in by_key:
        checks.append(("bf16 autocast (not adopted: explain stays fp32)", by_key["bf16_cl"], torch.bfloat16))
    for label, p, force in checks:
        if p is None:
            continue
        saved = p.explain_amp_dtype
        p.explain_amp_dtype = force if force is not None else saved
        try:
            stats = [_cam_agreement(r, p.explain(q).cam) for r, q in zip(ref_cams, prepared)]
        finally:
            p.explain_amp_dtype = saved
        results["cam"].append({"name": label, "min_corr": min(c for c, _ in stats),
                               "max_diff": max(d for _, d in stats)})
    torch.set_num_threads(results["threads"])
    return results


def served_steps(predictor) -> str:
    """What the Predictor did to the model it serves: the label of row (a) (nothing is fused in
    torchvision's ResNet50, for one, which reuses one ReLU module)."""
    steps = [("BN folded", predictor.fold_report is not None and predictor.fold_report.pairs),
             ("no pad", predictor.unpadded), ("packed", predictor.prepacked), ("ReLU fused", predictor.fused_acts)]
    return ", ".join(name for name, done in steps if done) or "as rebuilt"


def format_variants(res: dict) -> str:
    w = max([len("variant")] + [len(r["name"]) for r in res["rows"]]) + 2
    lines = [
        f"Predictor.predict speed options: {res['arch']} @ {res['input_size']} px, weights={res['weights']}, "
        f"CPU threads={res['threads']}, one image per call, median of {res['reps']} (interleaved); "
        f"max |dprob| vs fp32 eager NCHW over {res['source']}",
        f"{'variant':<{w}}{'build s':>9}{'median ms':>11}{'x fp32':>8}{'max |dprob|':>13}{'tol':>8}"
        f"{'in tol':>8}{'faster':>8}",
    ]
    for r in res["rows"]:
        if r["ms"] is None:
            lines.append(f"{r['name']:<{w}}{r['error']}")
            continue
        lines.append(f"{r['name']:<{w}}{r['build_s']:>9.2f}{r['ms']:>11.2f}{r['ratio']:>8.2f}{r['max_dprob']:>13.2e}"
                     f"{r['tol']:>8.0e}{('yes' if r['within_tol'] else 'NO'):>8}"
                     f"{('yes' if r['faster'] else 'no'):>8}")
    for c in res["cam"]:
        lines.append(f"Grad-CAM vs fp32 NCHW, {c['name']}: min correlation {c['min_corr']:.4f}, "
                     f"max |dCAM| {c['max_diff']:.4f}")
    return "\n".join(lines)


def format_table(res: dict) -> str:
    lines = [
        f"model {res['arch']} @ {res['input_size']} px, weights={res['weights']}, tta={res.get('tta', 'none')}, "
        f"input: {res['source']} "
        f"(original {res['original_size'][0]}x{res['original_size'][1]}), CPU threads={res['threads']}, "
        f"median of {res['reps']}",
    ]
    w = max([len("method")] + [len(r["name"]) for r in res["rows"]]) + 2
    lines.append(f"{'method':<{w}}{'median ms':>11}{'x (a)':>8}")
    for r in res["rows"]:
        lines.append(f"{r['name']:<{w}}{r['ms']:>11.2f}{r['ratio']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from deepcovid.models import TTA_CHOICES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI mode: random init at 64 px, 3 repetitions")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the backbone's own, 64 with --quick)")
    ap.add_argument("--weights", default=None, help="imagenet (default) or none (default with --quick)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all available)")
    ap.add_argument("--images", type=int, default=None,
                    help="images for the speed-options table's agreement check (default 16, 4 with --quick)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="include the torch.compile variants (default: yes, no with --quick)")
    ap.add_argument("--no-variants", action="store_true", help="only the explain-vs-bare-forward table")
    ap.add_argument("--tta", default="none", choices=TTA_CHOICES,
                    help="test-time augmentation of the first table's model (default: none)")
    ap.add_argument("--checkpoint", default=None,
                    help="measure a trained checkpoint instead (a .safetensors file, a run folder, or 'best' under "
                         "--checkpoints-dir), at its own input size and test-time augmentation, e.g. the preset's "
                         "ensemble; --arch, --size, --weights and --tta do not apply")
    ap.add_argument("--checkpoints-dir", default="checkpoints", help="where 'best' is looked up (default: checkpoints)")
    args = ap.parse_args(argv)
    if args.checkpoint is not None:
        given = [f for f, v in (("--size", args.size), ("--weights", args.weights)) if v is not None]
        given += [f"--{k}" for k in ("tta", "arch") if getattr(args, k) != ap.get_default(k)]
        if given:
            ap.error(f"{', '.join(given)} cannot be combined with --checkpoint (the checkpoint fixes them)")
    from deepcovid.errors import DeepCovidError

    try:
        res = run_benchmark(quick=args.quick, arch=args.arch, size=args.size, weights=args.weights, reps=args.reps,
                            warmup=args.warmup, threads=args.threads, tta=args.tta, checkpoint=args.checkpoint,
                            checkpoints_dir=args.checkpoints_dir)
    except DeepCovidError as exc:  # a missing or refused checkpoint, unavailable weights: no traceback
        print(f"bench_inference: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(res), flush=True)
    if not args.no_variants:
        var = run_variants(quick=args.quick, arch=args.arch, size=args.size, weights=args.weights, reps=args.reps,
                           warmup=args.warmup, threads=args.threads, n_images=args.images, compile=args.compile,
                           checkpoint=args.checkpoint, checkpoints_dir=args.checkpoints_dir)
        print()
        print(format_variants(var))
    return 0


if __name__ == "__main__":
    sys.exit(main())
