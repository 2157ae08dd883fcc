"""Classification metrics for one run and their uncertainty, as pure NumPy functions.

Perfusion is the positive class (label 1), ventilation the negative class (label 0), as in the
paper and in ``docs/internals.md``. Every function here takes plain arrays and returns plain
Python numbers or lists, so its result can go straight into ``metrics.json``.

Why our own implementations instead of scikit-learn: the bootstrap needs the metrics for 2000
resamples at once (vectorised over resamples), and the confusion-matrix metrics must stay
defined - as ``nan`` with a note - when a class is missing, where scikit-learn warns and returns
0. The tests check every function against scikit-learn on random cases, ties included.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

log = logging.getLogger(__name__)

#: Keys of the metrics that :func:`bootstrap_ci` gives an interval for.
CI_METRICS: tuple[str, ...] = ("acc", "sensitivity", "specificity", "f1", "auc", "ppv", "npv")


# --------------------------------------------------------------------------- input checks
def _check_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty: no images to score")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"{name} must be numeric 0/1 labels, got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(
            f"{name} must hold only 0 (ventilation) and 1 (perfusion); "
            f"found {np.unique(y[bad])[:5].tolist()}"
        )
    return y.astype(np.int64)


def _check_scores(prob: Any, n: int, name: str = "prob") -> np.ndarray:
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {p.shape}")
    if p.shape[0] != n:
        raise ValueError(f"{name} has {p.shape[0]} values but y_true has {n}")
    if not np.all(np.isfinite(p)):
        raise ValueError(
            f"{name} contains nan or inf at positions {np.flatnonzero(~np.isfinite(p))[:5].tolist()}"
        )
    return p


def _div(num: float, den: float) -> float:
    """num/den, or nan when the denominator is zero (metric undefined, not 0)."""
    return float(num) / float(den) if den else math.nan


# --------------------------------------------------------------------------- point metrics
def auc_score(y_true: Any, prob: Any) -> float:
    """Area under the ROC curve in its Mann-Whitney form.

    AUC = P(score of a random perfusion image > score of a random ventilation image), ties
    counting 1/2. Computed from average ranks, O(n log n). Returns ``nan`` when one class is
    absent, because the quantity is then undefined (scikit-learn raises instead).
    """
    y = _check_labels(y_true)
    s = _check_scores(prob, y.size)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = rankdata(s, method="average")
    u = ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def _confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.sum((y == 1) & (pred == 1)))
    tn = int(np.sum((y == 0) & (pred == 0)))
    fp = int(np.sum((y == 0) & (pred == 1)))
    fn = int(np.sum((y == 1) & (pred == 0)))
    return tn, fp, fn, tp


def binary_metrics(
    y_true: Any,
    prob: Any,
    threshold: float = 0.5,
    *,
    pred: Any | None = None,
) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, F1, PPV, NPV, AUC and the confusion matrix.

    ``pred = prob >= threshold`` unless ``pred`` is given. Pass the model's own argmax
    predictions as ``pred`` when the table must agree with ``predictions.csv`` to the image:
    torch's argmax sends an exact 0.5 tie to class 0, while ``prob >= 0.5`` sends it to 1.

    Undefined ratios (e.g. sensitivity on a set without perfusion images) are ``nan``, never a
    silent 0, and a sentence in ``notes`` says why. ``confusion_matrix`` is
    ``[[tn, fp], [fn, tp]]`` (rows: true ventilation, true perfusion), scikit-learn's layout.

    Returns keys: n, n_pos, n_neg, threshold, acc, sensitivity, specificity, f1, ppv, npv, auc,
    confusion_matrix, notes.
    """
    y = _check_labels(y_true)
    s = _check_scores(prob, y.size)
    if pred is None:
        yhat = (s >= threshold).astype(np.int64)
    else:
        yhat = _check_labels(pred, name="pred")
        if yhat.size != y.size:
            raise ValueError(f"pred has {yhat.size} values but y_true has {y.size}")
    tn, fp, fn, tp = _confusion(y, yhat)
    n_pos, n_neg = tp + fn, tn + fp
    notes: list[str] = []
    if n_pos == 0:
        notes.append("no perfusion (positive) images: sensitivity and AUC are undefined (nan)")
    if n_neg == 0:
        notes.append("no ventilation (negative) images: specificity and AUC are undefined (nan)")
    if tp + fp == 0:
        notes.append("nothing predicted perfusion: PPV is undefined (nan)")
    if tn + fn == 0:
        notes.append("nothing predicted ventilation: NPV is undefined (nan)")
    for note in notes:
        log.warning("binary_metrics: %s", note)
    return {
        "n": int(y.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": float(threshold) if pred is None else None,
        "acc": _div(tp + tn, y.size),
        "sensitivity": _div(tp, n_pos),
        "specificity": _div(tn, n_neg),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "auc": auc_score(y, s),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "notes": notes,
    }


def roc_points(y_true: Any, prob: Any, *, drop_intermediate: bool = True) -> dict[str, list[float]]:
    """ROC curve points of ``sklearn.metrics.roc_curve`` (same defaults), as plain lists.

    Why a wrapper and not a call: the labels and scores get this module's checks (0/1 labels,
    finite scores), the result goes straight into ``metrics.json``, and a test set with one class
    gives all-``nan`` ``fpr`` (no negatives) or ``tpr`` (no positives) without scikit-learn's
    warning, as the other metrics here do. An image counts as perfusion when
    ``prob >= threshold``; the first point is (0, 0) at threshold ``+inf``; ``drop_intermediate``
    drops points that lie mid-way on a straight segment (the curve and its area are unchanged).

    Note: ``thresholds[0]`` is ``inf``; ``json.dump`` writes it as ``Infinity`` (valid for
    Python's json, not for strict JSON readers).
    """
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve

    y = _check_labels(y_true)
    s = _check_scores(prob, y.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # one class: nan, said above
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=drop_intermediate)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


# --------------------------------------------------------------------------- bootstrap
def _metrics_batch(
    y_rows: np.ndarray, s_rows: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """The CI metrics for many resamples at once; rows are resamples.

    Undefined values are nan (e.g. sensitivity of a resample without positives).
    """
    pos = y_rows == 1
    pred = s_rows >= threshold
    tp = np.sum(pos & pred, axis=1).astype(np.float64)
    fn = np.sum(pos & ~pred, axis=1).astype(np.float64)
    fp = np.sum(~pos & pred, axis=1).astype(np.float64)
    tn = np.sum(~pos & ~pred, axis=1).astype(np.float64)
    n1 = tp + fn
    n0 = tn + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "acc": (tp + tn) / y_rows.shape[1],
            "sensitivity": tp / n1,
            "specificity": tn / n0,
            "f1": 2 * tp / (2 * tp + fp + fn),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
        }
        # Mann-Whitney AUC per row from average ranks within the row.
        ranks = rankdata(s_rows, method="average", axis=1)
        u = np.sum(np.where(pos, ranks, 0.0), axis=1) - n1 * (n1 + 1) / 2.0
        out["auc"] = u / (n1 * n0)
    return out


def bootstrap_ci(
    y_true: Any,
    prob: Any,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
    threshold: float = 0.5,
) -> dict[str, list[float]]:
    """Percentile bootstrap confidence intervals of the metrics in :data:`CI_METRICS`.

    A test set of 40 images gives wide intervals; the paper reports none, this makes the width
    visible. ``stratified=True`` resamples each class within itself, keeping the class counts
    fixed, so every resample has both classes and sensitivity, specificity and AUC are always
    defined (the design fixes the test counts per class, so this is also the right model of the
    sampling). With ``stratified=False`` resamples that lack a class give nan for those metrics
    and are left out of their percentiles (the number left out is logged).

    All resamples are drawn and scored at once (arrays of shape ``(n_boot, n)``); the same seed
    gives the same intervals. Returns ``{metric: [lo, hi]}`` at level ``1 - alpha``; an interval
    is ``[nan, nan]`` when the metric is undefined in every resample.
    """
    y = _check_labels(y_true)
    s = _check_scores(prob, y.size)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    n = y.size
    if stratified:
        # Columns keep their class: first the positives, then the negatives.
        pos_idx = np.flatnonzero(y == 1)
        neg_idx = np.flatnonzero(y == 0)
        parts = [
            idx[rng.integers(0, idx.size, size=(n_boot, idx.size))]
            for idx in (pos_idx, neg_idx)
            if idx.size
        ]
        rows = np.concatenate(parts, axis=1)
    else:
        rows = rng.integers(0, n, size=(n_boot, n))
    stats = _metrics_batch(y[rows], s[rows], threshold)
    q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    out: dict[str, list[float]] = {}
    for key in CI_METRICS:
        vals = stats[key]
        ok = np.isfinite(vals)
        if not ok.any():
            out[key] = [math.nan, math.nan]
            continue
        if not ok.all():
            log.info("bootstrap_ci: %s undefined in %d of %d resamples", key, (~ok).sum(), n_boot)
        lo, hi = np.percentile(vals[ok], q)
        out[key] = [float(lo), float(hi)]
    return out


# --------------------------------------------------------------------------- across seeds
def summarise_seeds(
    metric_dicts: Sequence[Mapping[str, Any]],
) -> dict[str, tuple[float, float]]:
    """Mean and sample SD (ddof=1) of each numeric metric over repeated runs (seeds).

    The paper reports the mean of 5 repetitions; the SD shows how much of a difference between
    models is seed noise. SD is nan for a single run. Only scalar numeric keys present in every
    dict are summarised (nested values such as the confusion matrix are skipped, see
    :func:`pool_confusion`); keys missing from some runs are named in a warning. A nan in any
    run makes that metric's mean nan - an undefined value is not quietly averaged away.
    """
    if len(metric_dicts) == 0:
        raise ValueError("summarise_seeds needs at least one metrics dict")

    def numeric_keys(d: Mapping[str, Any]) -> set[str]:
        return {
            k
            for k, v in d.items()
            if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        }

    sets = [numeric_keys(d) for d in metric_dicts]
    common = set.intersection(*sets)
    partial = set.union(*sets) - common
    if partial:
        log.warning(
            "summarise_seeds: keys missing from some runs, not summarised: %s", sorted(partial)
        )
    order = [k for k in metric_dicts[0] if k in common]
    out: dict[str, tuple[float, float]] = {}
    for key in order:
        vals = np.array([float(d[key]) for d in metric_dicts], dtype=np.float64)
        mean = float(vals.mean())
        sd = float(vals.std(ddof=1)) if vals.size > 1 else math.nan
        out[key] = (mean, sd)
    return out


def pool_confusion(metric_dicts: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """Sum of the runs' ``confusion_matrix`` entries: the paper's matrix "over 5 repetitions"."""
    if len(metric_dicts) == 0:
        raise ValueError("pool_confusion needs at least one metrics dict")
    total = np.zeros((2, 2), dtype=np.int64)
    for i, d in enumerate(metric_dicts):
        cm = np.asarray(d.get("confusion_matrix"))
        if cm.shape != (2, 2):
            raise ValueError(f"run {i}: confusion_matrix must be 2x2, got {cm.tolist()!r}")
        total += cm.astype(np.int64)
    return total.tolist()
