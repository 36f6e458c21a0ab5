import math

import numpy as np
import pytest

from deepcovid.metrics import best_f1_threshold, binary_metrics, format_table, multiclass_metrics


def test_binary_metrics_match_a_hand_worked_confusion_matrix():
    # labels:  1 1 1 1 0 0 0 0 0 0 ; predictions at 0.5: TP=3 FN=1 FP=2 TN=4
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.7, 0.2, 0.6, 0.55, 0.1, 0.3, 0.4, 0.05]
    m = binary_metrics(y, p, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 4)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    # AUC by hand: positive/negative pairs ranked correctly: 0.9,0.8,0.7 beat all 6 negatives (18),
    # 0.2 beats 0.1 and 0.05 (2) -> 20/24
    assert m["auc"] == pytest.approx(20 / 24)


def test_best_threshold_maximises_f1():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.35, 0.3, 0.8, 0.9])
    t = best_f1_threshold(y, p)
    f1_at = binary_metrics(y, p, t)["f1"]
    assert all(f1_at >= binary_metrics(y, p, c)["f1"] - 1e-12 for c in np.linspace(0, 1, 101))
    assert best_f1_threshold([1, 1], [0.2, 0.3]) == 0.5


def test_multiclass_metrics():
    y = [0, 1, 2, 2]
    probs = np.eye(3)[[0, 1, 1, 2]]
    m = multiclass_metrics(y, probs, ["A", "B", "C"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["C"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["B"]["precision"] == pytest.approx(0.5)
    assert m["tp"] == 3 and m["fn"] == 1 and m["fp"] == 1


def test_undefined_auc_is_nan_and_table_prints_it():
    m = binary_metrics([1, 1], [0.9, 0.8])
    assert math.isnan(m["auc"])
    assert "nan" in format_table({"x": m})
