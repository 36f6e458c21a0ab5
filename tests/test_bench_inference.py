"""benchmarks/bench_inference.py --quick runs and prints a table of positive timings and ratios."""

from __future__ import annotations

import importlib.util
import re
from types import SimpleNamespace

import torch

from conftest import REPO
from deepcovid import prepack
from deepcovid.bnfold import FoldReport


def load_bench():
    path = REPO / "benchmarks" / "bench_inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_benchmark_prints_the_table(capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    try:
        # the speed-options table has its own test below (on one thread: much faster here)
        assert bench.main(["--quick", "--size", "32", "--reps", "2", "--warmup", "0", "--no-variants"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "efficientnet_lite0 @ 32 px" in out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^\((a|b|c|d|e|f)\) .*?\s+([0-9.]+)\s+([0-9.]+)$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert set(rows) == {"a", "b", "c", "d", "e", "f"}, out
    for ms, ratio in rows.values():
        assert ms > 0 and ratio > 0
    assert rows["a"][1] == 1.0
    prepacked = prepack.available()
    served = "BN folded, no pad" + (", packed, ReLU fused" if prepacked else "")
    assert f"(a) bare forward, inference_mode (served: {served})" in out
    for key, (ms, ratio) in rows.items():
        assert abs(ratio - ms / rows["a"][0]) < 0.02 * ratio + 0.01


def test_row_a_names_only_the_rewrites_the_predictor_made():
    bench = load_bench()
    done = SimpleNamespace(fold_report=FoldReport(pairs=[("c", "bn")]), unpadded=["c"], prepacked=["c"],
                           fused_acts=[("c", "act")])
    assert bench.served_steps(done) == "BN folded, no pad, packed, ReLU fused"
    resnet = SimpleNamespace(fold_report=FoldReport(pairs=[("c", "bn")]), unpadded=[], prepacked=["c"], fused_acts=[])
    assert bench.served_steps(resnet) == "BN folded, packed"
    plain = SimpleNamespace(fold_report=None, unpadded=[], prepacked=[], fused_acts=[])
    assert bench.served_steps(plain) == "as rebuilt"


def test_synthetic_input_when_no_data(tmp_path):
    bench = load_bench()
    img, source = bench.find_image(tmp_path / "nothing")
    assert source.startswith("synthetic") and img.ndim == 2 and img.dtype.name == "uint8"


def test_quick_speed_options_table(capsys):
    """The speed-options table: baseline ratio 1, every built variant timed and checked against
    fp32 eager NCHW, torch.compile skipped in quick mode."""
    bench = load_bench()
    threads = torch.get_num_threads()
    try:
        res = bench.run_variants(quick=True, size=32, reps=2, warmup=0, threads=1, n_images=2)
    finally:
        torch.set_num_threads(threads)
    rows = {r["key"]: r for r in res["rows"]}
    assert list(rows) == [k for k, *_ in bench.VARIANTS]
    assert rows["fp32"]["ratio"] == 1.0 and rows["fp32"]["max_dprob"] == 0.0
    assert rows["compile"]["ms"] is None and "skipped" in rows["compile"]["error"]
    for key in ("cl", "cl_fold", "cl_fold_unpad", "cl_fold_unpad_pack", "cl_fold_unpad_pack_fuse", "bf16", "bf16_cl"):
        r = rows[key]
        assert r["ms"] > 0 and r["ratio"] > 0 and r["within_tol"], r
    if rows["onnx"]["ms"] is not None:
        assert rows["onnx"]["within_tol"]
    assert [c["name"].split()[0] for c in res["cam"]] == ["fp32", "bf16"]
    assert res["cam"][0]["min_corr"] > 0.999
    text = bench.format_variants(res)
    assert "fp32 eager NCHW (baseline)" in text and "x fp32" in text and "skipped" in text
    assert len([ln for ln in text.splitlines() if ln.endswith(("yes", "no"))]) >= 4


def test_quick_benchmark_of_a_flip_tta_model_runs_both_views_in_every_row(monkeypatch):
    """--tta hflip: every row (bare forward, explain, the plain recipe, predict) runs the image
    and its mirror as one batch of two, as a --tta hflip checkpoint is served."""
    bench = load_bench()
    batches = []
    build = bench.build

    def spy_build(*args, **kwargs):
        predictor, model, unfolded = build(*args, **kwargs)
        for m in (model, unfolded):
            m.backbone.register_forward_pre_hook(lambda _m, inp: batches.append(inp[0].shape[0]))
        return predictor, model, unfolded

    monkeypatch.setattr(bench, "build", spy_build)
    threads = torch.get_num_threads()
    try:
        res = bench.run_benchmark(quick=True, size=32, reps=2, warmup=0, tta="hflip")
    finally:
        torch.set_num_threads(threads)
    assert res["tta"] == "hflip" and "tta=hflip" in bench.format_table(res)
    assert len(res["rows"]) == 6 and all(r["ms"] > 0 for r in res["rows"])
    assert batches and set(batches) == {2}, batches


def test_bad_tta_flag_is_a_usage_error(capsys):
    bench = load_bench()
    try:
        bench.main(["--quick", "--no-variants", "--tta", "vflip"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--tta vflip was accepted")
    assert "--tta: invalid choice: 'vflip'" in capsys.readouterr().err


def test_quick_benchmark_of_a_checkpoint_uses_its_model_size_and_views(tiny_checkpoint, tmp_path, capsys):
    bench = load_bench()
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--reps", "2", "--warmup", "0", "--no-variants",
                           "--checkpoint", str(tiny_checkpoint)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"model efficientnet_lite0 ({tiny_checkpoint}" in out and "@ 64 px, weights=checkpoint" in out
    assert len([ln for ln in out.splitlines() if re.match(r"^\([a-f]\) ", ln)]) == 6
    # a missing checkpoint is a clear error, not a traceback; flags the checkpoint fixes are refused
    assert bench.main(["--quick", "--no-variants", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "bench_inference: error:" in capsys.readouterr().err
    try:
        bench.main(["--quick", "--checkpoint", str(tiny_checkpoint), "--size", "96"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--size with --checkpoint was accepted")
    assert "cannot be combined with --checkpoint" in capsys.readouterr().err
