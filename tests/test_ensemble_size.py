import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_TRAIN, make_train_test
from deepcovid.checkpoint import read_checkpoint
from deepcovid.data import load_splits
from deepcovid.metrics import compute_metrics
from deepcovid.training import fit, fit_ensemble, predict_samples, resolve_config

REPO = Path(__file__).resolve().parents[1]
FAST = {**FAST_TRAIN, "epochs": 1, "threshold": "0.5"}


@pytest.fixture
def size():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ensemble_size

    return ensemble_size


def test_size_table_scores_every_subset_of_each_size(size):
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.6, 0.1, 0.7, 0.8], [0.2, 0.3, 0.4, 0.9], [0.1, 0.2, 0.9, 0.3]])
    rows = size.size_table(y, probs, ["N", "P"], 0.5)
    assert [(r["n"], r["subsets"]) for r in rows] == [(1, 3), (2, 3), (3, 1)]
    # one model at a time: accuracies 3/4, 3/4 and 3/4; all three: the mean probability's
    assert rows[0]["accuracy"] == pytest.approx((0.75, 0.0))
    whole = compute_metrics(y, probs.mean(0), ["N", "P"], 0.5)
    assert rows[2]["accuracy"] == pytest.approx((whole["accuracy"], 0.0)) and rows[2]["auc"][0] == whole["auc"]
    assert rows[0]["specificity"] == pytest.approx((np.mean([0.5, 1, 1]), np.std([0.5, 1, 1])))
    assert rows[1]["accuracy"] == pytest.approx((1.0, 0.0))  # each pair's mean is right where its members err
    # more subsets than the limit: that many distinct ones, drawn at random
    many = size.combinations(12, 6, 50, np.random.default_rng(0))
    assert len(many) == len(set(many)) == 50 and all(len(c) == 6 and list(c) == sorted(c) for c in many)


def test_members_of_an_ensemble_and_single_runs_are_averaged(size, tmp_path, capsys):
    data = make_train_test(tmp_path / "ds", 12, 4, size=48)
    cfg = resolve_config(FAST)
    fit_ensemble({**cfg, "run_name": "ens", "ensemble": [{"seed": 1}, {"seed": 2}]}, data, tmp_path / "runs")
    fit({**cfg, "run_name": "single", "seed": 3, "split_seed": 0}, data, tmp_path / "runs")
    runs = tmp_path / "runs"
    assert size.main(["--checkpoint", str(runs / "ens"), "--checkpoint", str(runs / "single")]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (test|validation) \| (\d) \| (\d) \| ([\d.]+) ±", out, flags=re.M)
    assert [(s, n, k) for s, n, k, _ in rows] == [("test", "1", "3"), ("test", "2", "3"), ("test", "3", "1"),
                                                  ("validation", "1", "3"), ("validation", "2", "3"),
                                                  ("validation", "3", "1")]
    # the three-model row is the mean probability of the two members and the single run on test/
    splits = load_splits(data, val_fraction=cfg["val_fraction"], seed=0)
    ps = []
    for run in (runs / "ens" / "members" / "m1-efficientnet_lite0", runs / "ens" / "members" / "m2-efficientnet_lite0",
                runs / "single"):
        y, p, _ = predict_samples(read_checkpoint(run / "best.safetensors"), splits.test)
        ps.append(p)
    whole = compute_metrics(y, np.mean(ps, 0), ["NORMAL", "PNEUMONIA"], 0.5)
    assert float(rows[2][3]) == pytest.approx(100 * whole["accuracy"], abs=0.006)
    assert "3 models, threshold 0.5" in out


def test_bad_input_is_refused(size, tmp_path, tiny_checkpoint, capsys):
    assert size.main(["--checkpoint", str(tmp_path / "nothing-here"), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert size.main(["--checkpoint", str(tiny_checkpoint)]) == 2
    assert "at least two models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        size.main(["--checkpoint", str(tiny_checkpoint), "--threshold", "1.5"])


def test_error_agreement_counts_images_by_how_many_models_err(size):
    y = np.array([0, 0, 0, 0, 1, 1])
    # columns: images; rows: 4 models. Normal 0 wrong on all, normal 1 on 3 of 4, normal 2 on 2
    # of 4 (half: not more than half), normal 3 on none; positive 4 wrong on 1, positive 5 on none
    # (0.5 counts as positive, as in deepcovid.metrics).
    probs = np.array([[0.9, 0.6, 0.7, 0.1, 0.2, 0.5],
                      [0.8, 0.5, 0.6, 0.2, 0.9, 0.9],
                      [0.7, 0.7, 0.3, 0.3, 0.8, 0.8],
                      [0.6, 0.4, 0.2, 0.4, 0.7, 0.7]])
    neg, pos = size.error_agreement(y, probs, 0.5)
    assert neg == {"class": 0, "images": 4, "all": 1, "at_least_90": 1, "more_than_half": 2, "some": 1, "none": 1}
    assert pos == {"class": 1, "images": 2, "all": 0, "at_least_90": 0, "more_than_half": 0, "some": 1, "none": 1}
    # a higher threshold turns positive 5's 0.5 into an error on one model
    assert size.error_agreement(y, probs, 0.6)[1]["some"] == 2


def _fake_sweep(path, runs, val_y=(0, 1, 1), test_y=(0, 0, 1, 1)):
    arrays = {}
    for (variant, seed), (pv, pt) in runs.items():
        arrays[f"{variant}/{seed}/val/y"], arrays[f"{variant}/{seed}/val/p"] = np.array(val_y), np.array(pv)
        arrays[f"{variant}/{seed}/test/y"], arrays[f"{variant}/{seed}/test/p"] = np.array(test_y), np.array(pt)
    path.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path / "probs.npz", **arrays)
    return path


def test_sweep_models_are_read_from_probs_npz(size, tmp_path, capsys):
    runs = {("a", 0): ([0.2, 0.7, 0.9], [0.6, 0.1, 0.8, 0.9]),
            ("a", 1): ([0.1, 0.8, 0.4], [0.7, 0.2, 0.9, 0.3]),
            ("b", 0): ([0.3, 0.9, 0.8], [0.9, 0.3, 0.6, 0.7])}
    first = _fake_sweep(tmp_path / "s1", {k: v for k, v in runs.items() if k[0] == "a"})
    second = _fake_sweep(tmp_path / "s2", {("b", 0): runs[("b", 0)], ("c", 0): ([0.9] * 3, [0.9] * 4)})
    assert size.main(["--sweep", str(first), "--sweep", str(second / "probs.npz"),
                      "--variant", "a", "--variant", "b"]) == 0
    out = capsys.readouterr().out
    assert "3 models, threshold 0.5" in out
    # all three together: the mean probability of the three runs (variant c left out)
    whole = compute_metrics(np.array([0, 0, 1, 1]), np.mean([v[1] for v in runs.values()], 0), ["n", "p"], 0.5)
    row = re.search(r"^\| test \| 3 \| 1 \| ([\d.]+) ±", out, flags=re.M)
    assert float(row.group(1)) == pytest.approx(100 * whole["accuracy"], abs=0.006)
    # test/ normal 0 is wrong on all three models, normal 1 on none; positive 3 on one of three
    assert "| test | negative | 2 | 1 | 1 | 1 | 0 | 1 |" in out
    assert "| test | positive | 2 | 0 | 0 | 0 | 1 | 1 |" in out
    assert "| validation | positive | 2 | 0 | 0 | 0 | 1 | 1 |" in out


def test_bad_sweeps_are_refused(size, tmp_path, tiny_checkpoint, capsys):
    good = _fake_sweep(tmp_path / "good", {("a", 0): ([0.2, 0.7, 0.9], [0.6, 0.1, 0.8, 0.9]),
                                           ("a", 1): ([0.1, 0.8, 0.4], [0.7, 0.2, 0.9, 0.3])})
    other = _fake_sweep(tmp_path / "other", {("a", 2): ([0.2, 0.7, 0.9], [0.6, 0.1, 0.8, 0.9])}, test_y=(0, 1, 1, 1))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    assert size.main(["--sweep", str(good), "--sweep", str(other)]) == 2
    assert "other test images" in capsys.readouterr().err
    assert size.main(["--sweep", str(tmp_path / "junk.npz")]) == 2
    assert "is not a sweep_recipes.py probs.npz" in capsys.readouterr().err
    assert size.main(["--sweep", str(tmp_path / "missing")]) == 2
    assert size.main(["--sweep", str(good), "--variant", "zzz"]) == 2
    assert "no runs of variant(s) zzz" in capsys.readouterr().err
    assert size.main(["--sweep", str(good), "--variant", "a", "--max-subsets", "5"]) == 0
    capsys.readouterr()
    # one sweep named twice, as its folder and as its file: its two models once each
    assert size.main(["--sweep", str(good), "--sweep", str(good / "probs.npz")]) == 0
    out = capsys.readouterr().out
    assert "2 models, threshold 0.5" in out
    assert re.findall(r"^\| test \| (\d) \| (\d) \|", out, flags=re.M) == [("1", "2"), ("2", "1")]
    for argv in (["--sweep", str(good), "--checkpoint", str(tiny_checkpoint)], [],
                 ["--checkpoint", str(tiny_checkpoint), "--variant", "a"]):
        with pytest.raises(SystemExit):
            size.main(argv)
