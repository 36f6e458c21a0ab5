"""deepcovid.device.keep_freed_memory: freed CPU memory is reused instead of faulted in again."""

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


def _child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120, check=True)
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
