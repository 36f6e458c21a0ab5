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
