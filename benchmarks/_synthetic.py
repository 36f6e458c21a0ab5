"""Synthetic X-ray folders for the benchmarks' ``--quick`` (CI) modes: the test suite's own
generator (``tests/conftest.py``), so the quick modes and the tests run on the same images."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _conftest():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import conftest

    return conftest


def synthetic_folder(root: Path, counts: dict[str, int], size: int, seed: int = 0) -> Path:
    """``root/<CLASS>/<patient>-<k>.jpeg`` images, as ``conftest.make_image_folder`` writes them."""
    return _conftest().make_image_folder(Path(root), counts, size=size, seed=seed)


def fast_train_config() -> dict:
    """The test suite's seconds-long training config (real offline weights, tiny inputs)."""
    return dict(_conftest().FAST_TRAIN)
