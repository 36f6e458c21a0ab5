import math

import numpy as np
import pytest

from deepcovid.metrics import (CI_KEYS, _class_sample_metrics, best_f1_threshold, binary_metrics, bootstrap_ci, format_ci,
                               format_ci_list, format_table, multiclass_metrics)


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


# --- bootstrap intervals -----------------------------------------------------------------------

def test_vectorised_interval_statistic_equals_scikit_learn_on_every_resample():
    rng = np.random.default_rng(0)
    y = np.array([1] * 30 + [0] * 20)
    p = np.round(rng.random(50), 1)  # rounded: many ties, which AUC must count as half
    for thr in (0.05, 0.5, 0.95):
        batch = rng.integers(0, 30, (7, 30)), rng.integers(30, 50, (7, 20))
        got = _class_sample_metrics(p[batch[0]], p[batch[1]], thr)  # 7 resamples at once
        for i in range(7):
            ref = binary_metrics(np.r_[np.ones(30), np.zeros(20)], np.r_[p[batch[0][i]], p[batch[1][i]]], thr)
            assert got[:, i] == pytest.approx([ref[k] for k in CI_KEYS])
    # the resample axis may come first (scipy decides)
    a, b = rng.random((30, 4)), rng.random((20, 4))
    assert np.allclose(_class_sample_metrics(a, b, 0.5, axis=0), _class_sample_metrics(a.T, b.T, 0.5))


def test_bootstrap_interval_brackets_the_score_narrows_with_more_images_and_keeps_class_counts():
    rng = np.random.default_rng(1)
    y = np.array([1] * 60 + [0] * 40)
    p = np.clip(np.where(y == 1, 0.65, 0.35) + rng.normal(0, 0.2, 100), 0, 1)
    m, ci = binary_metrics(y, p, 0.5), bootstrap_ci(y, p, 0.5)
    for k in CI_KEYS:
        lo, hi = ci[k]
        assert lo <= m[k] <= hi and lo < hi
    assert ci["confidence"] == 0.95 and ci == bootstrap_ci(y, p, 0.5)  # seeded: the same interval each time
    big = bootstrap_ci(np.tile(y, 16), np.tile(p, 16), 0.5)  # 16x the images, same scores: about 1/4 the width
    width = lambda c: c["auc"][1] - c["auc"][0]
    assert 0.15 < width(big) / width(ci) < 0.4
    # resampling within each class: normals all below the threshold stay a specificity of exactly 1
    sep = np.where(y == 1, p, np.minimum(p, 0.4))
    assert bootstrap_ci(y, sep, 0.5)["specificity"] == [1.0, 1.0]
    # a class with fewer than two images has no interval
    assert bootstrap_ci([1, 1, 1, 0], [0.9, 0.8, 0.7, 0.1]) is None
    lo, hi = ci["auc"]
    assert f"AUC {lo:.3f}-{hi:.3f}" in format_ci(ci) and format_ci(ci).startswith("95 % intervals") and format_ci(None) == ""
    listed = format_ci_list({"a": {"ci95": ci}, "b": {"ci95": None}, "c": {"ci95": big}})
    assert listed.startswith("95 % intervals") and listed.count("\n- ") == 2 and f"- a: {format_ci(ci, method=False)}" in listed
    assert format_ci_list({"b": {}}) == ""


def test_roc_plot_legend_shows_auc_to_three_decimals(tmp_path, monkeypatch):
    """A validation AUC of 0.995 must not read "AUC = 1.00" (sklearn's default rounding)."""
    import numpy as np

    from deepcovid import plots
    from deepcovid.metrics import binary_metrics

    y = np.array([0] * 100 + [1] * 100)
    p = np.linspace(0.0, 1.0, 200)
    p[[80, 120]] = p[[120, 80]]  # 40 of the 10,000 pairs ranked the wrong way round: AUC 0.996
    expected = binary_metrics(y, p, 0.5)["auc"]
    assert abs(expected - 0.996) < 1e-9 and f"{expected:.2f}" == "1.00"
    legends = []
    save = plots._save

    def spy(fig, path):
        legends.append([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    out = plots.plot_roc(y, p, tmp_path / "roc.png")
    assert out.is_file() and out.stat().st_size > 1000
    assert legends == [[f"AUC = {expected:.3f}"]], legends


def test_curves_mark_whole_epochs_only(tmp_path, monkeypatch):
    from deepcovid import plots

    seen = {}
    save = plots._save

    def spy(fig, path):
        seen["ticks"] = [list(ax.get_xticks()) for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_accuracy": 0.8 + e / 100,
                "val_accuracy": 0.79 + e / 100} for e in (1, 2, 3, 4)]
    out = plots.plot_curves(history, tmp_path / "curves.png")
    assert out.is_file() and out.stat().st_size > 0
    assert len(seen["ticks"]) == 2 and all(ticks and all(float(t).is_integer() for t in ticks) for ticks in seen["ticks"])
