import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_in_quick_mode_on_the_cpu(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gpu

    assert bench_gpu.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([^|]+?) \| ([0-9.]+|-) \| ([0-9.]+|-) \|", out, flags=re.M)
    names = [r[0] for r in rows]
    assert names[0] == "model only (batch on the device)" and rows[0][2] == "1.00"
    for needed in ("loader alone: uint8", "JPEG decoded every epoch", "decoded cache, uint8", "on the device alone", "kept on the device, augmented there"):
        assert any(needed in n for n in names), needed
    # every variant ran (a failing one prints '-' and the error instead of a number)
    assert len(rows) >= 13 and all(r[1] != "-" and float(r[1]) > 0 and float(r[2]) > 0 for r in rows), rows
    assert "failed:" not in out
