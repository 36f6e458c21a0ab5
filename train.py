"""Thin launcher: ``python train.py ...`` is ``deepcovid train ...``."""

import sys

from deepcovid.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
