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
    f1s = re.findall(r"\| (?:uncached|cached)[^|]* \| [0-9.]+ \| ([0-9.]+) \|", out)
    assert len(f1s) == 5 and len(set(f1s)) == 1  # served, as trained and read from disk: one model
    assert float(re.search(r"features read from disk: ([0-9.]+)x", out).group(1)) > 0
    assert float(re.search(r"caching alone: ([0-9.]+)x", out).group(1)) > 0
    assert re.search(r"= [0-9.]+x served, \d+ x [0-9.]+ / [0-9.]+ = [0-9.]+x as trained\.", out)
    assert float(re.search(r"against the uncached run as trained: ([0-9.]+)x", out).group(1)) > 0
    # the allocator section ran both settings in their own processes
    assert re.search(r"\| freed memory kept \(`keep_freed_memory`\) \| [0-9.]+ \| [0-9.]+ \| \d+ \|", out)
    assert float(re.search(r"speed-up of a training step: ([0-9.]+)x", out).group(1)) > 0


def test_feature_cache_section_alone_with_freed_memory_kept():
    """``--only-feature-cache --keep-freed-memory`` on a few real X-rays, in its own process (the
    allocator setting lasts for the process): the five rows, one model, and the flag applied."""
    import subprocess

    from conftest import shared_data_or_skip

    shared_data_or_skip()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_training.py"), "--only-feature-cache",
                           "--keep-freed-memory", "--feature-images", "16", "--feature-epochs", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "freed memory kept for reuse (as `deepcovid train` runs): True" in out
    assert "## 1." not in out and "## 3." not in out and "## 4." not in out
    f1s = re.findall(r"\| (?:uncached|cached)[^|]* \| [0-9.]+ \| ([0-9.]+) \|", out)
    assert len(f1s) == 5 and len(set(f1s)) == 1
    assert float(re.search(r"caching alone: ([0-9.]+)x", out).group(1)) > 0
