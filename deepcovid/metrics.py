"""Table-2 metrics (the Deep Covid preprint's) computed with scikit-learn.

Two classes: ``prob`` is the positive class's probability, labels are 1 for positive.
K classes: one-vs-rest counts are summed and precision/recall/F1/specificity are macro
averages; ``per_class`` holds each class's own numbers.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

METRIC_KEYS = ("tp", "tn", "fp", "fn", "accuracy", "precision", "recall", "specificity", "f1", "auc")


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def _auc(y_true: np.ndarray, score: np.ndarray) -> float:
    # AUC is undefined with one class present; report NaN rather than crash mid-training.
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, score))


def binary_metrics(y_true, prob, threshold: float = 0.5) -> dict:
    y_true = np.asarray(y_true).astype(int).ravel()
    prob = np.asarray(prob, dtype=np.float64).ravel()
    y_pred = (prob >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return {
        "tp": int(tp), "tn": int(tn), "fp": int(fp), "fn": int(fn),
        "accuracy": _safe_div(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "specificity": _safe_div(tn, tn + fp),
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "auc": _auc(y_true, prob),
        "threshold": float(threshold),
    }


def multiclass_metrics(y_true, probs, classes) -> dict:
    y_true = np.asarray(y_true).astype(int).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    y_pred = probs.argmax(1)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    per_class = {}
    totals = dict(tp=0, tn=0, fp=0, fn=0)
    for i, name in enumerate(classes):
        tp = int(cm[i, i]); fp = int(cm[:, i].sum() - tp); fn = int(cm[i, :].sum() - tp); tn = int(cm.sum() - tp - fp - fn)
        p, r = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
        per_class[name] = {"tp": tp, "tn": tn, "fp": fp, "fn": fn, "precision": p, "recall": r,
                           "specificity": _safe_div(tn, tn + fp), "f1": _safe_div(2 * p * r, p + r),
                           "auc": _auc((y_true == i).astype(int), probs[:, i])}
        for key in totals:
            totals[key] += per_class[name][key]
    macro = {m: float(np.mean([per_class[c][m] for c in classes])) for m in ("precision", "recall", "specificity", "f1")}
    aucs = [per_class[c]["auc"] for c in classes if not math.isnan(per_class[c]["auc"])]
    return {**totals, "accuracy": _safe_div(np.trace(cm), cm.sum()), **macro,
            "auc": float(np.mean(aucs)) if aucs else float("nan"), "threshold": None, "per_class": per_class}


def compute_metrics(y_true, probs, classes, threshold: float | None = 0.5) -> dict:
    """Dispatch on the number of classes. ``probs``: (N,) positive prob for 2 classes, (N,K) otherwise."""
    probs = np.asarray(probs)
    if len(classes) == 2:
        p = probs[:, 1] if probs.ndim == 2 else probs
        return binary_metrics(y_true, p, 0.5 if threshold is None else threshold)
    return multiclass_metrics(y_true, probs, classes)


CI_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def _class_sample_metrics(pos: np.ndarray, neg: np.ndarray, threshold: float, axis: int = -1) -> np.ndarray:
    """(accuracy, precision, recall, specificity, F1, AUC) from the positives' and the negatives'
    scores, vectorised along ``axis`` (scipy's bootstrap passes many resamples at once).

    Written here because ``binary_metrics`` (scikit-learn) takes one resample per call; AUC is
    the Mann-Whitney form (average ranks for ties), which equals ``roc_auc_score``."""
    from scipy.stats import rankdata

    pos, neg = np.moveaxis(pos, axis, -1), np.moveaxis(neg, axis, -1)
    n1, n0 = pos.shape[-1], neg.shape[-1]
    ranks = rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    auc = (ranks[..., :n1].sum(-1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    tp = (pos >= threshold).sum(-1).astype(np.float64)
    tn = (neg < threshold).sum(-1).astype(np.float64)
    fp, fn = n0 - tn, n1 - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)  # 0 when nothing is called positive, as _safe_div
    return np.stack([(tp + tn) / (n1 + n0), precision, tp / n1, tn / n0, 2 * tp / (2 * tp + fp + fn), auc])


def bootstrap_ci(y_true, prob, threshold: float = 0.5, *, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> dict | None:
    """Percentile-bootstrap intervals of the two-class metrics (:data:`CI_KEYS`) over images.

    ``scipy.stats.bootstrap`` resamples the positives and the negatives as two independent
    samples, so every resample keeps the evaluated set's class counts (AUC stays defined, and
    specificity is always over the same number of normals). What it measures is how much the
    score depends on which images were drawn, not how much it would change if the model were
    trained again. None when a class has fewer than two images.
    """
    from scipy.stats import bootstrap

    y_true = np.asarray(y_true).astype(int).ravel()
    prob = np.asarray(prob, dtype=np.float64).ravel()
    pos, neg = prob[y_true == 1], prob[y_true == 0]
    if len(pos) < 2 or len(neg) < 2:
        return None
    res = bootstrap((pos, neg), lambda a, b, axis=-1: _class_sample_metrics(a, b, threshold, axis), paired=False,
                    vectorized=True, n_resamples=int(n_resamples), confidence_level=float(confidence),
                    method="percentile", rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    out = {k: [float(a), float(b)] for k, a, b in zip(CI_KEYS, lo, hi)}
    return {"confidence": float(confidence), "n_resamples": int(n_resamples), "method": "percentile bootstrap over images, within each class",
            **out}


def format_ci(ci: dict | None, method: bool = True) -> str:
    """One line: '95 % intervals (<method>): accuracy 90.4-95.8 %, ..., AUC 0.927-0.979';
    ``method=False``: the intervals only (under a heading that names the method). '' without."""
    if not ci:
        return ""
    names = {"f1": "F1", "auc": "AUC"}
    parts = ", ".join(f"{names.get(k, k)} " + (f"{ci[k][0]:.3f}-{ci[k][1]:.3f}" if k == "auc"
                                               else f"{100 * ci[k][0]:.1f}-{100 * ci[k][1]:.1f} %") for k in CI_KEYS)
    return f"{_ci_heading(ci)}: {parts}" if method else parts


def _ci_heading(ci: dict) -> str:
    return f"{100 * ci['confidence']:.0f} % intervals ({ci['method']}, {ci['n_resamples']} resamples)"


def format_ci_list(rows: dict[str, dict]) -> str:
    """A markdown list of each row's ``ci95`` under one heading ('' when no row has one)."""
    cis = {name: m["ci95"] for name, m in rows.items() if m.get("ci95")}
    if not cis:
        return ""
    head = next(iter(cis.values()))
    return (f"{_ci_heading(head)}: how much each score depends on which images were drawn\n\n"
            + "\n".join(f"- {name}: {format_ci(ci, method=False)}" for name, ci in cis.items()))


def best_f1_threshold(y_true, prob) -> float:
    """The probability threshold that maximises F1 on (validation) data; 0.5 if undefined."""
    y_true = np.asarray(y_true).astype(int).ravel()
    prob = np.asarray(prob, dtype=np.float64).ravel()
    if y_true.sum() == 0 or y_true.sum() == len(y_true):
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y_true, prob)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    # precision/recall have one more entry than thresholds (the final point has no threshold).
    best = int(np.nanargmax(f1[:-1]))
    return float(thresholds[best])


def recall_threshold(y_true, prob, target: float) -> float:
    """The highest probability threshold whose recall on (validation) data is at least
    ``target``: the operating point fixed by sensitivity, as a clinical test is specified. From
    scikit-learn's ROC curve, every threshold kept, so the recall is exact; 0.5 if undefined."""
    y_true = np.asarray(y_true).astype(int).ravel()
    prob = np.asarray(prob, dtype=np.float64).ravel()
    if y_true.sum() == 0 or y_true.sum() == len(y_true):
        return 0.5
    _, tpr, thresholds = roc_curve(y_true, prob, drop_intermediate=False)
    # thresholds fall and tpr rises along the curve; the first is +inf (nothing called positive)
    return float(thresholds[int(np.argmax(tpr >= target - 1e-12))])


def roc_points(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), np.asarray(prob, dtype=np.float64))
    return fpr, tpr


def format_table(rows: dict[str, dict], keys=("tp", "tn", "fp", "fn", "accuracy", "precision", "recall",
                                               "specificity", "f1", "auc")) -> str:
    """A markdown table in the shape of the paper's Table 2: one row per model/split."""
    head = "| model | " + " | ".join(k.upper() if len(k) <= 3 else k for k in keys) + " |"
    sep = "|---|" + "---|" * len(keys)
    lines = [head, sep]
    for name, m in rows.items():
        cells = []
        for k in keys:
            v = m.get(k)
            if isinstance(v, float):
                cells.append("nan" if math.isnan(v) else (f"{v:.4f}" if k == "auc" else f"{100 * v:.2f}%"))
            else:
                cells.append(str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
