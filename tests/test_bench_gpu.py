import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_in_quick_mode_on_the_cpu(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gpu

    assert bench_gpu.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([^|]+?) \| ([0-9]+|-) \| ([0-9.]+|-) \|", out, flags=re.M)
    names = [r[0] for r in rows]
    assert names[0] == "model only (batch on the device)" and rows[0][2] == "1.00"
    for needed in ("loader alone: uint8", "JPEG decoded every epoch", "decoded cache, uint8", "augmentation on the GPU"):
        assert any(needed in n for n in names), needed
    # every variant ran (a failing one prints '-' and the error instead of a number)
    assert len(rows) >= 13 and all(r[1] != "-" and float(r[1]) > 0 and float(r[2]) > 0 for r in rows), rows
    assert "failed:" not in out


def test_gpu_augment_draws_per_image_parameters_and_keeps_the_range():
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_gpu import gpu_augment

    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(6, 1, 1, 1)
    y = gpu_augment(x)
    assert y.shape == (6, 3, 32, 32) and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1
    # six copies of one image come out different: the parameters are drawn per image, not per batch
    assert all(not torch.allclose(y[0], y[i]) for i in range(1, 6))
