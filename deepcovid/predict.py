"""The ``deepcovid predict`` subcommand: image files and folders -> a CSV, overlays, activation maps.

Folders are walked recursively (hidden files and folders skipped; files whose extension is
not supported are skipped too). A file named explicitly on the command line is always tried,
so a bad one becomes an error row instead of vanishing. One bad image never stops the run:
its row carries the error and the exit code is 1 (0 when every image succeeded).

``DIR/predictions.csv`` is written progressively: the header first, then one complete line
per image (a single ``write`` + flush each), so an interrupted run leaves a valid CSV of the
images done so far. Overlays go to ``DIR/overlays/<stem>_<hash8>.png`` and, with
``--activations``, activation grids to ``DIR/activations/<stem>_<hash8>.png``; ``hash8`` comes
from the image's absolute path, so same-named files in different folders do not collide.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np

from .cam import CAM_METHODS, COLORMAPS, SLOW_CAM_MESSAGE, SLOW_CAM_METHODS
from .errors import DataError
from .inference import BACKENDS, PRECISIONS

BASE_COLUMNS = ("path", "label", "probability", "threshold", "error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (walked recursively)")
    parser.add_argument("--checkpoint", default="best",
                        help="a .safetensors file, a run folder, or 'best' (highest validation F1 under "
                             "--checkpoints-dir; default)")
    parser.add_argument("--checkpoints-dir", default="checkpoints", help="where 'best' is looked for (default: %(default)s)")
    parser.add_argument("--cam", default="gradcam", choices=CAM_METHODS, metavar="METHOD",
                        help=f"CAM method: {', '.join(CAM_METHODS)} (default: %(default)s; scorecam is very slow)")
    parser.add_argument("--out", default="predictions", metavar="DIR",
                        help="output folder for predictions.csv, overlays/ and activations/ (default: %(default)s)")
    parser.add_argument("--activations", action="store_true", help="also save activation-map grids of early layers")
    parser.add_argument("--no-cam", action="store_true", help="predictions only (fastest: no CAM, batched)")
    parser.add_argument("--target", default=None, metavar="CLASS",
                        help="explain this class instead of the predicted one")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity in the overlay, 0..1 (default: %(default)s)")
    parser.add_argument("--colormap", default="jet", choices=sorted(COLORMAPS), metavar="NAME",
                        help="OpenCV colour map for the heat map (jet, inferno, viridis, turbo, ...; default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward with --no-cam (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all this process may use)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto (default) or fp32: float32 on every device (TF32 off on CUDA), or bf16 (bfloat16 autocast for "
                             "the predictions: faster on CPUs with AVX512-BF16/AMX, probabilities within ~1e-2 of "
                             "fp32; explanations stay float32)")
    parser.add_argument("--backend", default="eager", choices=BACKENDS,
                        help="eager (default), compile (torch.compile: tens of seconds to start, needs a C++ "
                             "compiler) or onnx (onnxruntime on the CPU, float32). Only --no-cam predictions use it; "
                             "explanations always run eagerly")
    parser.add_argument("--no-fold-bn", action="store_true",
                        help="serve the checkpoint's BatchNorm layers as they are instead of folding them into the "
                             "convolutions before them (folding is the default: the same probabilities to float "
                             "rounding, 1.2-2x faster on a CPU)")


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------

def collect_inputs(paths) -> list[Path]:
    """Explicit files as given (even unsupported ones), supported files under folders, in order,
    without duplicates. A path that does not exist is returned as is (it becomes an error row)."""
    from .imageio import is_supported

    out: list[Path] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(p)

    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    f = Path(root) / name
                    if f.is_file() and is_supported(f):
                        add(f)
        else:
            add(p)
    return out


def output_name(path: Path) -> str:
    """``<stem>_<hash8>``: unique per absolute path, readable, filesystem-safe."""
    digest = hashlib.sha1(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    stem = "".join(ch if (ch.isalnum() or ch in "-_.") else "_" for ch in path.stem)[:80] or "image"
    return f"{stem}_{digest}"


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------

class CsvLog:
    """predictions.csv written row by row; each row is one complete line, flushed at once."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = Path(path)
        self.columns = columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", encoding="utf-8", newline="")
        self._write(dict(zip(columns, columns)))

    def _write(self, row: dict) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([row.get(c, "") for c in self.columns])
        self._f.write(buf.getvalue())
        self._f.flush()

    def write(self, row: dict) -> None:
        self._write(row)

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            try:
                os.fsync(self._f.fileno())
            except OSError:
                pass
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 image
        raise RuntimeError(f"could not encode {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def stack_grids(grids: list[np.ndarray]) -> np.ndarray:
    """Activation grids of several layers, one under the other, padded to a common width."""
    width = max(g.shape[1] for g in grids)
    parts = []
    for g in grids:
        pad = np.full((g.shape[0], width - g.shape[1], 3), 24, dtype=np.uint8)
        parts.append(np.concatenate([g, pad], axis=1))
        parts.append(np.full((4, width, 3), 255, dtype=np.uint8))
    return np.concatenate(parts[:-1], axis=0)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def _error_text(exc: BaseException) -> str:
    from .errors import DeepCovidError

    msg = str(exc).replace("\n", " ").strip()
    return msg if isinstance(exc, DeepCovidError) else f"{type(exc).__name__}: {msg}"


# ---------------------------------------------------------------------------------------
# the subcommand
# ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .errors import ConfigError
    from .inference import Predictor

    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if args.no_cam and args.activations:
        raise ConfigError("--activations needs the CAM pass; drop --no-cam")
    inputs = collect_inputs(args.paths)
    if not inputs:
        raise DataError(f"no supported image files found in {', '.join(map(str, args.paths))}")

    backend = getattr(args, "backend", "eager")
    if not args.no_cam and backend != "eager":
        print(f"deepcovid predict: note: --backend {backend} only speeds up --no-cam predictions; "
              "explanations run eagerly", file=sys.stderr)
        backend = "eager"
    predictor = Predictor.from_checkpoint(args.checkpoint, args.checkpoints_dir, device=args.device,
                                          num_threads=args.threads, precision=getattr(args, "precision", "auto"),
                                          backend=backend, fold_bn=not getattr(args, "no_fold_bn", False))
    if args.target is not None:
        predictor.class_index(args.target)  # ConfigError now, not one per image
    if not args.no_cam and args.cam in SLOW_CAM_METHODS:
        print(f"deepcovid predict: note: {SLOW_CAM_MESSAGE}", file=sys.stderr)

    out = Path(args.out)
    columns = list(BASE_COLUMNS) + [f"p_{c}" for c in predictor.classes]
    failed = 0

    def row_for(path: Path, pred=None, error: str | None = None) -> dict:
        row = {"path": str(path)}
        if error is not None:
            row["error"] = error
            return row
        row.update(label=pred.label, probability=_fmt(pred.probability), threshold=_fmt(pred.threshold), error="")
        row.update({f"p_{c}": _fmt(p) for c, p in pred.probabilities.items()})
        return row

    with CsvLog(out / "predictions.csv", columns) as log, \
            tqdm(total=len(inputs), unit="img", desc="predict", file=sys.stderr, dynamic_ncols=True) as bar:
        if args.no_cam:
            for start in range(0, len(inputs), args.batch_size):
                chunk = inputs[start:start + args.batch_size]
                ready, rows = [], {}
                for path in chunk:
                    try:
                        ready.append((path, predictor.prepare(path)))
                    except Exception as exc:  # one bad file never stops the run
                        rows[path] = row_for(path, error=_error_text(exc))
                if ready:
                    try:
                        preds = predictor.predict_batch([p for _, p in ready], batch_size=args.batch_size)
                        for (path, _), pred in zip(ready, preds):
                            rows[path] = row_for(path, pred)
                    except Exception as exc:
                        for path, _ in ready:
                            rows[path] = row_for(path, error=_error_text(exc))
                for path in chunk:
                    failed += bool(rows[path].get("error"))
                    log.write(rows[path])
                bar.update(len(chunk))
        else:
            for path in inputs:
                try:
                    exp = predictor.explain(path, cam_method=args.cam, target_class=args.target, alpha=args.alpha,
                                            colormap=args.colormap, activations=bool(args.activations))
                    name = output_name(path)
                    write_png(out / "overlays" / f"{name}.png", exp.overlay)
                    if exp.activations:
                        write_png(out / "activations" / f"{name}.png", stack_grids([g for _, g in exp.activations]))
                    row = row_for(path, exp)
                except Exception as exc:  # one bad file never stops the run
                    row = row_for(path, error=_error_text(exc))
                    failed += 1
                log.write(row)
                bar.update(1)

    done = len(inputs) - failed
    print(f"deepcovid predict: {done} of {len(inputs)} image(s) predicted"
          + (f", {failed} failed (see the error column)" if failed else "")
          + f"; wrote {out / 'predictions.csv'}. Research use only; not a medical device.", file=sys.stderr)
    return 1 if failed else 0
