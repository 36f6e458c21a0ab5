"""The ``deepcovid`` console script.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``deepcovid
--help`` stays fast. User errors (``DeepCovidError``) print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import DeepCovidError

SUBCOMMANDS = {
    "train": ("deepcovid.training", "fine-tune backbones on ROOT/{train,val,test}/<CLASS>/ images"),
    "evaluate": ("deepcovid.evaluation", "Table-2 metrics of a checkpoint on a folder of class subfolders"),
    "predict": ("deepcovid.predict", "predict (and explain) image files or folders into a CSV and overlays"),
    "serve": ("deepcovid.webapp", "serve the Gradio web page"),
}


def get_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepcovid", description="Chest X-ray classification with explanations. "
                                     "Research use only; not a medical device.")
    parser.add_argument("--version", action="version", version=f"deepcovid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (heavy: torch, gradio).
        if wanted == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_parser(argv)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    if args.command in ("train", "evaluate", "predict"):
        from .device import keep_freed_memory

        keep_freed_memory()  # batch work on the CPU (benchmarks/bench_training.py, section 4: 1.86x a training step)
    try:
        return int(module.run(args) or 0)
    except DeepCovidError as exc:
        print(f"deepcovid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepcovid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
