"""deepcovid.device: freed CPU memory is reused instead of faulted in again (keep_freed_memory);
forked loader workers get one OpenCV thread without hanging (opencv_single_threaded_forks)."""

import json
import subprocess
import sys

import pytest

# A child process (the setting is process-wide and one-way): steps that each allocate, touch
# and free 64 MiB, as a training step does with its activations; the page faults of 20 steps
# after 10 first ones (glibc settles on reusing a block after a few).
CHILD = """
import json, resource, sys
import torch
from deepcovid.device import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for step in range(30):
    if step == 10:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16, 1024, 1024)
    del x
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _child(mode: str, code: str = CHILD) -> dict:
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_not_faulted_in_again():
    default, kept = _child("default"), _child("keep")
    assert kept["applied"] is True
    # 20 x 64 MiB of 4 KiB pages is 330 k faults when every block goes back to the kernel
    assert default["faults"] > 100_000
    assert kept["faults"] < default["faults"] / 100


def test_the_cli_keeps_freed_memory_for_batch_work_only(monkeypatch, tmp_path):
    from deepcovid import cli, device

    calls = []
    monkeypatch.setattr(device, "keep_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    assert calls == [True]
    monkeypatch.setattr(cli, "SUBCOMMANDS", {**cli.SUBCOMMANDS, "serve": ("deepcovid.errors", "")})
    calls.clear()
    with pytest.raises(AttributeError):  # deepcovid.errors has no run(): only the order of calls matters here
        cli.main(["serve"])
    assert calls == []


# A child process, for a fresh OpenCV whose pool has run (a large image resized), as in a
# training process after its decoded cache: a forked process reports its OpenCV thread count,
# and calls cv2.setNumThreads, which waited forever in such a fork before the hooks existed.
FORK_CHILD = """
import json, multiprocessing as mp, sys
import cv2, numpy as np
from deepcovid.device import opencv_single_threaded_forks
cv2.setNumThreads(4)
cv2.resize(np.random.rand(2000, 2000).astype(np.float32), (1000, 1000))

def worker(q, set_threads):
    n = cv2.getNumThreads()
    if set_threads:
        cv2.setNumThreads(1)
    q.put(n)

def fork(set_threads):
    q = ctx.Queue()
    p = ctx.Process(target=worker, args=(q, set_threads))
    p.start()
    p.join(10)
    got = q.get() if p.exitcode == 0 else ("hung" if p.is_alive() else p.exitcode)
    p.kill()
    return got

ctx = mp.get_context("fork")
if sys.argv[1] == "hooks":
    with opencv_single_threaded_forks():
        with opencv_single_threaded_forks():  # nested: one pair of hooks, still active inside
            got = [fork(False)]
        got += [fork(True)]
    got += [fork(False)]  # outside: the hooks are registered but do nothing
else:
    got = [fork(False)]
print(json.dumps({"workers": got, "parent": cv2.getNumThreads()}))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "register_at_fork"), reason="no fork on this platform")
def test_forked_workers_get_one_opencv_thread_and_the_parent_keeps_its_own():
    assert _child("hooks", FORK_CHILD) == {"workers": [1, 1, 4], "parent": 4}


@pytest.mark.skipif(not hasattr(__import__("os"), "register_at_fork"), reason="no fork on this platform")
def test_without_the_hooks_a_fork_inherits_the_parents_threads():
    # The control, so that the 1 above means something: without the hooks a worker runs
    # OpenCV on the parent's 4 threads. (Setting the number there instead is what hung: the
    # CLAHE training test in test_training.py fails by its time limit with that, and on its
    # workers' thread counts without the hooks.)
    assert _child("none", FORK_CHILD) == {"workers": [4], "parent": 4}
