"""lung_cls.evaluation.metrics against scikit-learn and against hand-made cases."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from lung_cls.evaluation.metrics import (
    CI_METRICS,
    _metrics_batch,
    auc_score,
    binary_metrics,
    bootstrap_ci,
    pool_confusion,
    roc_points,
    summarise_seeds,
)


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Both classes present; scores often rounded so that ties (within and across classes) occur."""
    n = int(rng.integers(4, 60))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    rng.shuffle(y)
    s = rng.random(n) * 0.6 + 0.4 * y * rng.random()
    decimals = int(rng.choice([1, 2, 16]))
    return y, np.round(s, decimals)


CASES = [_random_case(np.random.default_rng(seed)) for seed in range(60)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_binary_metrics_match_sklearn(case: int) -> None:
    y, s = CASES[case]
    m = binary_metrics(y, s, threshold=0.5)
    pred = (s >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["n"] == y.size
    assert m["acc"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    if tn + fn:
        assert m["npv"] == pytest.approx(tn / (tn + fn))
    else:
        assert math.isnan(m["npv"])
    if tp + fp:
        assert m["ppv"] == pytest.approx(precision_score(y, pred))
        assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc_score(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_roc_points_match_sklearn(case: int, drop: bool) -> None:
    y, s = CASES[case]
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=drop)
    r = roc_points(y, s, drop_intermediate=drop)
    np.testing.assert_allclose(r["fpr"], fpr)
    np.testing.assert_allclose(r["tpr"], tpr)
    np.testing.assert_array_equal(r["thresholds"], thr)


def test_roc_default_is_sklearn_default() -> None:
    # A case where dropping matters: many collinear points.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    fpr, tpr, _ = roc_curve(y, s)
    r = roc_points(y, s)
    assert len(r["fpr"]) == len(fpr) < 9
    np.testing.assert_allclose(r["tpr"], tpr)
    assert r["thresholds"][0] == math.inf


def test_all_tied_scores_give_auc_half() -> None:
    y = np.array([0, 1, 0, 1, 1])
    s = np.full(5, 0.7)
    assert auc_score(y, s) == 0.5
    assert roc_points(y, s)["fpr"] == [0.0, 1.0]


def test_one_class_absent_is_nan_with_note() -> None:
    m = binary_metrics([1, 1, 1], [0.9, 0.2, 0.6])
    assert math.isnan(m["auc"])
    assert math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert any("AUC" in note for note in m["notes"])
    assert math.isnan(auc_score([0, 0], [0.1, 0.2]))
    r = roc_points([0, 0, 0], [0.1, 0.2, 0.3])
    assert all(math.isnan(v) for v in r["tpr"])


def test_explicit_pred_overrides_threshold() -> None:
    y = np.array([1, 0, 1, 0])
    prob = np.array([0.5, 0.5, 0.9, 0.1])
    # argmax of two equal logits picks class 0: pass those predictions as pred.
    m = binary_metrics(y, prob, pred=[0, 0, 1, 0])
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]
    assert binary_metrics(y, prob)["confusion_matrix"] == [[1, 1], [0, 2]]


@pytest.mark.parametrize(
    ("y", "p", "msg"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], "only 0"),
        ([0, 1], [0.1, float("nan")], "nan"),
        ([0, 1, 1], [0.1, 0.2], "has 2 values"),
        ([], [], "empty"),
    ],
)
def test_bad_input_raises(y: list, p: list, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        binary_metrics(y, p)


def test_metrics_batch_equals_binary_metrics_per_row() -> None:
    rng = np.random.default_rng(5)
    y_rows = rng.integers(0, 2, (30, 15))
    y_rows[:, :2] = [0, 1]
    s_rows = np.round(rng.random((30, 15)), 1)
    batch = _metrics_batch(y_rows, s_rows, 0.5)
    for i in range(30):
        single = binary_metrics(y_rows[i], s_rows[i])
        for key in CI_METRICS:
            np.testing.assert_allclose(batch[key][i], single[key], equal_nan=True)


def _balanced(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_per_class, int), np.zeros(n_per_class, int)]
    s = 1 / (1 + np.exp(-(rng.normal(size=y.size) + 0.6 * (2 * y - 1))))
    return y, s


def test_bootstrap_contains_point_reproducible_and_narrows() -> None:
    y, s = _balanced(20, 1)
    point = binary_metrics(y, s)
    t0 = time.perf_counter()
    ci = bootstrap_ci(y, s, n_boot=2000, seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"2000 resamples of 40 images took {elapsed:.2f} s"
    assert set(ci) == set(CI_METRICS)
    for key in ("acc", "sensitivity", "specificity", "f1", "auc"):
        lo, hi = ci[key]
        assert lo <= point[key] <= hi, key
        assert lo < hi, key
    assert bootstrap_ci(y, s, n_boot=2000, seed=3) == ci
    assert bootstrap_ci(y, s, n_boot=2000, seed=4) != ci
    y_big, s_big = _balanced(400, 1)
    ci_big = bootstrap_ci(y_big, s_big, n_boot=500, seed=3)
    for key in ("acc", "auc", "sensitivity"):
        assert ci_big[key][1] - ci_big[key][0] < 0.6 * (ci[key][1] - ci[key][0]), key


def test_stratified_bootstrap_keeps_both_classes() -> None:
    # Only 2 positives: an ordinary bootstrap often draws none; the stratified one never does.
    y = np.r_[np.ones(2, int), np.zeros(10, int)]
    s = np.linspace(0.05, 0.95, 12)
    ci = bootstrap_ci(y, s, n_boot=300, seed=0, stratified=True)
    assert all(np.isfinite(ci[k]).all() for k in ("auc", "sensitivity", "specificity"))
    ci_plain = bootstrap_ci(y, s, n_boot=300, seed=0, stratified=False)
    assert np.isfinite(ci_plain["auc"]).all()  # resamples without positives are left out


def test_bootstrap_alpha_widens() -> None:
    y, s = _balanced(15, 2)
    ci90 = bootstrap_ci(y, s, n_boot=1000, alpha=0.10)
    ci99 = bootstrap_ci(y, s, n_boot=1000, alpha=0.01)
    assert ci99["auc"][0] <= ci90["auc"][0] and ci99["auc"][1] >= ci90["auc"][1]
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(y, s, alpha=1.5)


def test_summarise_seeds() -> None:
    runs = [
        {"acc": 0.9, "auc": 0.95, "n": 40, "confusion_matrix": [[19, 1], [3, 17]], "notes": []},
        {"acc": 0.8, "auc": 0.97, "n": 40, "confusion_matrix": [[18, 2], [6, 14]], "notes": []},
        {"acc": 1.0, "auc": 0.99, "n": 40, "confusion_matrix": [[20, 0], [0, 20]], "notes": []},
    ]
    out = summarise_seeds(runs)
    assert set(out) == {"acc", "auc", "n"}
    assert out["acc"][0] == pytest.approx(0.9)
    assert out["acc"][1] == pytest.approx(np.std([0.9, 0.8, 1.0], ddof=1))
    assert out["acc"][1] == pytest.approx(0.1)
    assert out["n"] == (40.0, 0.0)
    one = summarise_seeds(runs[:1])
    assert one["auc"][0] == 0.95 and math.isnan(one["auc"][1])
    nan_run = summarise_seeds([{"auc": 0.9}, {"auc": float("nan")}])
    assert math.isnan(nan_run["auc"][0])
    partial = summarise_seeds([{"acc": 0.5, "f1": 0.4}, {"acc": 0.7}])
    assert set(partial) == {"acc"}
    assert pool_confusion(runs) == [[57, 3], [9, 51]]
    with pytest.raises(ValueError):
        summarise_seeds([])
