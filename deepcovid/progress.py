"""Progress bars (tqdm) with ETA in a terminal. When stderr is not a terminal (CI, ``nohup``,
``> train.log``) bars are off, because redraws turn a log into noise; the long phases log a line
when they start and every epoch logs its result instead. ``DEEPCOVID_PROGRESS=1`` forces bars on."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    forced = os.environ.get("DEEPCOVID_PROGRESS")
    on = sys.stderr.isatty() if forced is None else forced == "1"
    kwargs.setdefault("disable", not on)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
