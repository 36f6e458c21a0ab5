"""``deepcovid predict``: folders and files -> predictions.csv, overlays, activation grids."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder, synthetic_xray
from deepcovid import cli
from deepcovid.predict import collect_inputs, output_name

COLUMNS = ["path", "label", "probability", "threshold", "error", "p_NORMAL", "p_PNEUMONIA"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def predict(*args) -> int:
    return cli.main(["predict", *map(str, args)])


@pytest.fixture
def good_folder(tmp_path) -> Path:
    root = make_image_folder(tmp_path / "good", {"NORMAL": 2, "PNEUMONIA": 2})
    wide = synthetic_xray(np.random.default_rng(9), 80, positive=True)[:50]  # 80 wide, 50 high
    Image.fromarray(wide).save(root / "PNEUMONIA" / "wide.png")
    return root


@pytest.fixture
def mixed_folder(good_folder) -> Path:
    root = good_folder
    real = next((root / "NORMAL").glob("*.jpeg")).read_bytes()
    (root / "NORMAL" / "corrupt.jpeg").write_bytes(real[: len(real) // 3])  # truncated JPEG
    (root / "NORMAL" / "text.png").write_text("this is not an image\n")
    (root / "PNEUMONIA" / "empty.jpeg").write_bytes(b"")
    (root / "PNEUMONIA" / "readme.txt").write_text("skipped: unsupported extension inside a folder")
    (root / ".hidden.png").write_bytes(b"skipped: hidden")
    hidden_dir = root / ".cache"
    hidden_dir.mkdir()
    shutil.copy(next((root / "NORMAL").glob("*.jpeg")), hidden_dir / "copy.jpeg")
    return root


def test_collect_inputs_walks_folders_and_keeps_explicit_files(mixed_folder):
    found = collect_inputs([mixed_folder, mixed_folder / "PNEUMONIA" / "readme.txt", mixed_folder / "NORMAL"])
    names = [p.name for p in found]
    assert "readme.txt" in names  # named explicitly: tried, so it becomes an error row
    assert names.count("readme.txt") == 1
    assert ".hidden.png" not in names and "copy.jpeg" not in names
    assert len(names) == len(set(map(str, found)))  # NORMAL/ given twice, listed once
    assert sum(n.endswith((".jpeg", ".png")) for n in names) == 8


def test_mixed_folder_rows_errors_overlays_and_exit_1(mixed_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    rc = predict(mixed_folder, "--checkpoint", tiny_checkpoint, "--out", out)
    assert rc == 1
    rows = {Path(r["path"]).name: r for r in read_csv(out / "predictions.csv")}
    bad = {"corrupt.jpeg", "text.png", "empty.jpeg"}
    assert set(rows) == bad | {p.name for p in mixed_folder.rglob("*")
                               if p.suffix in (".jpeg", ".png") and p.name not in bad
                               and ".cache" not in p.parts and not p.name.startswith(".")}
    assert len(rows) == 8
    for name, r in rows.items():
        if name in bad:
            assert r["error"] and not r["label"] and not r["probability"]
        else:
            assert not r["error"]
            assert r["label"] in ("NORMAL", "PNEUMONIA")
            p = float(r["probability"])
            assert p == pytest.approx(float(r["p_PNEUMONIA"]))
            assert float(r["p_NORMAL"]) + p == pytest.approx(1.0, abs=2e-6)
            assert float(r["threshold"]) == 0.5
            assert r["label"] == ("PNEUMONIA" if p >= 0.5 else "NORMAL")
    assert "empty" in rows["empty.jpeg"]["error"]
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 5
    wide = out / "overlays" / f"{output_name(mixed_folder / 'PNEUMONIA' / 'wide.png')}.png"
    assert np.asarray(Image.open(wide)).shape == (50, 80, 3)  # the original's own size and aspect
    assert not (out / "activations").exists()


def test_all_good_folder_exit_0_and_no_cam_is_consistent(good_folder, tiny_checkpoint, tmp_path):
    rc = predict(good_folder, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "cam", "--activations",
                 "--cam", "layercam", "--alpha", "0.3")
    assert rc == 0
    cam_rows = read_csv(tmp_path / "cam" / "predictions.csv")
    assert len(cam_rows) == 5 and not any(r["error"] for r in cam_rows)
    assert len(list((tmp_path / "cam" / "activations").glob("*.png"))) == 5
    grid = np.asarray(Image.open(next((tmp_path / "cam" / "activations").glob("*.png"))))
    assert grid.ndim == 3 and grid.shape[2] == 3

    rc = predict(good_folder, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "fast", "--no-cam",
                 "--batch-size", "3")
    assert rc == 0
    fast_rows = read_csv(tmp_path / "fast" / "predictions.csv")
    assert not (tmp_path / "fast" / "overlays").exists() or not any((tmp_path / "fast" / "overlays").iterdir())
    assert [r["path"] for r in fast_rows] == [r["path"] for r in cam_rows]
    for a, b in zip(cam_rows, fast_rows):
        assert a["label"] == b["label"]
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=2e-6)


def test_no_cam_mixed_folder_error_rows(mixed_folder, tiny_checkpoint, tmp_path):
    rc = predict(mixed_folder, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "o", "--no-cam")
    assert rc == 1
    rows = read_csv(tmp_path / "o" / "predictions.csv")
    assert len(rows) == 8 and sum(bool(r["error"]) for r in rows) == 3
    assert not (tmp_path / "o" / "overlays").exists()


def test_explicit_bad_files_and_missing_paths_become_error_rows(good_folder, tiny_checkpoint, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    good = next(good_folder.rglob("*.jpeg"))
    rc = predict(good, notes, tmp_path / "missing.png", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "o")
    assert rc == 1
    rows = read_csv(tmp_path / "o" / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == [good.name, "notes.txt", "missing.png"]
    assert not rows[0]["error"] and rows[1]["error"] and rows[2]["error"]


def test_target_class_and_config_errors(good_folder, tiny_checkpoint, tmp_path, capsys):
    assert predict(good_folder, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "a", "--target", "NORMAL") == 0
    assert predict(good_folder, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "b", "--target", "COVID") == 2
    assert "unknown class 'COVID'" in capsys.readouterr().err
    assert predict(good_folder, "--checkpoint", tmp_path / "nothing-here", "--out", tmp_path / "c") == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict(empty, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "d") == 2
    with pytest.raises(SystemExit):  # argparse: unknown CAM method
        predict(good_folder, "--checkpoint", tiny_checkpoint, "--cam", "magic")


def test_scorecam_prints_the_slow_warning(good_folder, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from deepcovid import inference
    from deepcovid.cam import SLOW_CAM_MESSAGE

    calls = []

    def explain(self, image, **kw):  # Score-CAM itself is tested in test_inference; here only the CLI
        calls.append(kw)
        raise RuntimeError("stub")

    monkeypatch.setattr(inference.Predictor, "explain", explain)
    rc = predict(good_folder / "NORMAL", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "s", "--cam", "scorecam")
    assert rc == 1
    assert SLOW_CAM_MESSAGE in capsys.readouterr().err
    assert calls and calls[0]["cam_method"] == "scorecam"
    rows = read_csv(tmp_path / "s" / "predictions.csv")
    assert rows and all(r["error"] == "RuntimeError: stub" for r in rows)


def test_interrupted_run_leaves_a_valid_csv_of_the_rows_done(good_folder, tiny_checkpoint, tmp_path, monkeypatch):
    from deepcovid import inference

    real = inference.Predictor.explain
    seen = []

    def explain(self, image, **kw):
        seen.append(image)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(self, image, **kw)

    monkeypatch.setattr(inference.Predictor, "explain", explain)
    rc = predict(good_folder, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "o")
    assert rc == 130
    rows = read_csv(tmp_path / "o" / "predictions.csv")
    assert len(rows) == 2 and all(r["label"] and not r["error"] for r in rows)
