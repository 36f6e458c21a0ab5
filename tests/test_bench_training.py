import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_training_benchmarks_run_in_quick_mode(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_training

    assert bench_training.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for heading in ("decoded-image cache", "feature cache", "scaling", "CPU memory allocator"):
        assert heading in out
    ratios = [float(x) for x in re.findall(r"\| ([0-9.]+)x(?= \|)", out)]
    # 3 sources x 2 (augmentation on/off) cached/uncached ratios, then their 3 x 2 ceilings
    assert len(ratios) == 12 and all(r > 0 for r in ratios)
    assert "Where the time goes" in out
    assert float(re.search(r"Ceiling for \d+ epochs, set-up excluded: .* = ([0-9.]+)x", out).group(1)) > 0
    speedup = float(re.search(r"speed-up: ([0-9.]+)x", out).group(1))
    assert speedup > 0
    # the cached and uncached head-only runs agree (seeded, no augmentation)
    f1s = re.findall(r"\| (?:uncached|cached|cached, features read from disk[^|]*) \| [0-9.]+ \| ([0-9.]+) \|", out)
    assert len(f1s) == 3 and f1s[0] == f1s[1] == f1s[2]
    assert float(re.search(r"features read from disk: ([0-9.]+)x", out).group(1)) > 0
    # the allocator section ran both settings in their own processes
    assert re.search(r"\| freed memory kept \(`keep_freed_memory`\) \| [0-9.]+ \| [0-9.]+ \| \d+ \|", out)
    assert float(re.search(r"speed-up of a training step: ([0-9.]+)x", out).group(1)) > 0
