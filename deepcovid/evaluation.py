"""``deepcovid evaluate``: Table-2 metrics of a checkpoint on a folder of class subfolders, at the
checkpoint's stored threshold and at 0.5, each with its 95 % bootstrap interval over the images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .checkpoint import DEFAULT_CHECKPOINTS_DIR, atomic_write_text, load_checkpoint
from .data import discover
from .errors import DataError
from .metrics import METRIC_KEYS, format_ci_list, format_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="best", help="a .safetensors file, a run folder, or 'best' (default)")
    p.add_argument("--checkpoints-dir", default=DEFAULT_CHECKPOINTS_DIR, help="where 'best' is looked up (default: checkpoints)")
    p.add_argument("--data", type=Path, required=True, help="a folder of class subfolders (e.g. ROOT/test)")
    p.add_argument("--json", type=Path, help="write the metrics here (and the ROC plot beside it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


def evaluate_folder(checkpoint, data: Path, *, checkpoints_dir=DEFAULT_CHECKPOINTS_DIR, out_dir: Path | None = None,
                    device: str = "auto") -> dict:
    from .training import evaluate_on_samples, select_device

    ckpt = load_checkpoint(checkpoint, checkpoints_dir)
    data = Path(data)
    if (data / "test").is_dir() and not any((data / c).is_dir() for c in ckpt.meta["classes"]):
        raise DataError(f"{data} looks like a dataset ROOT; pass the split folder, e.g. --data {data / 'test'}")
    _, samples = discover(data, ckpt.meta["classes"])
    dev = select_device(device)
    stored = evaluate_on_samples(ckpt, samples, out_dir, "eval", device=dev)
    at_half = stored.get("at_0.5")
    return {"checkpoint": str(ckpt.path), "arch": ckpt.meta["arch"], "data": str(data), "n": stored["n"],
            "skipped": stored["skipped"], **{k: stored[k] for k in METRIC_KEYS}, "threshold": stored["threshold"],
            "ci95": stored.get("ci95"),
            "at_0.5": {k: at_half[k] for k in (*METRIC_KEYS, "threshold", "ci95")} if at_half else None,
            **({"per_class": stored["per_class"]} if "per_class" in stored else {})}


def run(args: argparse.Namespace) -> int:
    out_dir = args.json.parent if args.json else None
    result = evaluate_folder(args.checkpoint, args.data, checkpoints_dir=args.checkpoints_dir, out_dir=out_dir,
                             device=args.device)
    rows = {f"stored threshold {result['threshold']:.3f}" if result["threshold"] is not None else "argmax": result}
    if result["at_0.5"]:
        rows["threshold 0.5"] = result["at_0.5"]
    print(f"{result['arch']} ({result['checkpoint']}) on {result['data']}: {result['n']} images"
          + (f", {len(result['skipped'])} unreadable skipped" if result["skipped"] else ""))
    print(format_table(rows))
    intervals = format_ci_list(rows)
    if intervals:
        print(intervals)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2, sort_keys=True) + "\n")
        roc = out_dir / "roc_eval.png"
        print(f"metrics: {args.json}" + (f"; ROC: {roc}" if roc.exists() else ""))
    return 0
