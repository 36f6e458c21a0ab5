"""Where models run: the device ('auto' = CUDA, then MPS, then CPU), how many CPU threads
this process may use (and OpenCV's, in the loader processes it forks), and how its CPU memory
allocator reuses memory. Shared by training and inference."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import torch

from .errors import ConfigError

# Numeric precisions of a model's forward (and training) passes: float32 unless "bf16"; "auto"
# lets each caller pick its device's fast default. Shared by training's and inference's flags.
PRECISIONS = ("auto", "fp32", "bf16")


def available_threads() -> int:
    """CPU cores this process may use (affinity-aware)."""
    n = os.cpu_count() or 1
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        pass
    return max(1, n)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' = cuda > mps > cpu; an explicit device that is not available is a ConfigError."""
    d = str(device).strip().lower() if not isinstance(device, torch.device) else str(device)
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(d)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r} requested but MPS is not available here; use --device cpu or auto")
    return dev


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


_opencv_forks = {"registered": False, "active": 0}


@contextlib.contextmanager
def opencv_single_threaded_forks():
    """While inside, processes forked from this one (data-loader workers) start with OpenCV on
    one thread; the parent keeps its own number.

    Why not ``cv2.setNumThreads(1)`` in each worker: OpenCV's pthreads pool does not survive
    fork(). In the child of a process whose pool has run (CLAHE on the decoded cache, or the
    resize of a large X-ray, starts it), that call waits for the parent's pool threads, which do
    not exist there, forever. Every CLAHE run on a GPU machine (loader workers on CUDA) hung
    there, in the workers' first call. So the number is set in the parent around each fork: 1
    just before (the pool's threads stop while none of them runs), the parent's own number
    again just after; the child inherits the 1, so each worker decodes and augments one image
    at a time on its core instead of oversubscribing the cores that the other workers need.

    ``os.register_at_fork`` cannot be undone, so the hooks are registered once and do nothing
    outside this context; nested uses are fine. A no-op where there is no fork.
    """
    if hasattr(os, "register_at_fork") and not _opencv_forks["registered"]:
        import cv2

        saved: list[int] = []

        def before() -> None:
            if _opencv_forks["active"]:
                saved.append(cv2.getNumThreads())
                cv2.setNumThreads(1)

        def after_in_parent() -> None:
            if saved:
                cv2.setNumThreads(saved.pop())

        os.register_at_fork(before=before, after_in_parent=after_in_parent)
        _opencv_forks["registered"] = True
    _opencv_forks["active"] += 1
    try:
        yield
    finally:
        _opencv_forks["active"] -= 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    By default every large block a CPU model frees (activations, gradients: megabytes each) is
    unmapped or trimmed away, and the next step maps it afresh and page-faults on every page.
    Measured on this project's 2-core machine (``benchmarks/bench_training.py
    --only-allocator``), one efficientnet_lite0 training step (batch 32, 224 px) took 2.33 s,
    1.68 s of it in the kernel on 0.65 M page faults; with freed memory kept (large blocks from
    the heap, no trimming) 1.25 s, 0.001 s in the kernel, no page faults. jemalloc or tcmalloc would do the same, but only when preloaded before the process
    starts, and torch has no switch for its CPU allocator: hence two ``mallopt`` calls.

    Process-wide and one-way: the process then holds on to its peak memory, which a training or
    batch-prediction run reaches again on its next step anyway. Linux with glibc only; returns
    False (and changes nothing) elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    largest = 2**31 - 1  # mallopt takes an int: 2 GiB
    return mallopt(_M_MMAP_THRESHOLD, largest) == 1 and mallopt(_M_TRIM_THRESHOLD, largest) == 1
