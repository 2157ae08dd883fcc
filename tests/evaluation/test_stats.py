"""lung_cls.evaluation.stats against scipy, hand computations and independent reference code."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from lung_cls.evaluation.metrics import binary_metrics
from lung_cls.evaluation.stats import (
    cluster_bootstrap_ci,
    delong_ci,
    delong_test,
    fdr_bh,
    holm,
    image_means,
    mcnemar_test,
    permutation_maxT,
    pixelwise_ttest,
    significant_fractions,
)


# --------------------------------------------------------------------------- pixel-wise t-test
@pytest.mark.parametrize("equal_var", [True, False])
def test_pixelwise_ttest_equals_scipy_per_pixel(equal_var: bool) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (5, 4, 3))
    b = rng.normal(0.5, 2.0, (7, 4, 3))
    t, p = pixelwise_ttest(a, b, equal_var=equal_var)
    assert t.shape == p.shape == (4, 3)
    for i, j in itertools.product(range(4), range(3)):
        ref = sps.ttest_ind(a[:, i, j], b[:, i, j], equal_var=equal_var)
        assert t[i, j] == pytest.approx(ref.statistic, rel=1e-10)
        assert p[i, j] == pytest.approx(ref.pvalue, rel=1e-8)


def test_pixelwise_ttest_constant_pixels() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((4, 2, 2))
    b = rng.random((3, 2, 2))
    a[:, 0, 0] = 0.0  # constant and equal in both groups: no difference
    b[:, 0, 0] = 0.0
    a[:, 1, 1] = 0.1  # constant in each group, but different: a perfect split
    b[:, 1, 1] = 0.3
    t, p = pixelwise_ttest(a, b)
    assert (t[0, 0], p[0, 0]) == (0.0, 1.0)
    assert t[1, 1] == -math.inf and p[1, 1] == 0.0
    assert np.all(np.isfinite(t[[0, 1], [1, 0]]))
    # scipy agrees where it is defined
    ref = sps.ttest_ind(a[:, 0, 1], b[:, 0, 1])
    assert t[0, 1] == pytest.approx(ref.statistic)


def test_pixelwise_ttest_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="map shape"):
        pixelwise_ttest(np.zeros((3, 4, 4)), np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        pixelwise_ttest(np.zeros((1, 4, 4)), np.zeros((3, 4, 4)))


# --------------------------------------------------------------------------- FDR
def test_fdr_bh_hand_checked() -> None:
    # m = 6, alpha = 0.05.  p (given order) = .010 .040 .022 .004 .200 .045
    # sorted:           .004   .010   .022   .040   .045   .200
    # rank i:              1      2      3      4      5      6
    # p * m / i:        .024   .030   .044   .060   .054   .200
    # min over j >= i:  .024   .030   .044   .054   .054   .200   <- q (sorted)
    # step-up rule p_(i) <= i * .05 / 6 = .0083 .0167 .025 .0333 .0417 .05:
    #                   yes    yes    yes    no     no     no   -> reject the 3 smallest.
    # Note .045 < .05 is "significant" uncorrected but not after BH.
    p = np.array([0.010, 0.040, 0.022, 0.004, 0.200, 0.045])
    reject, q = fdr_bh(p, alpha=0.05)
    np.testing.assert_allclose(q, [0.030, 0.054, 0.044, 0.024, 0.200, 0.054])
    assert reject.tolist() == [True, False, True, True, False, False]


def _bh_reference(p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Textbook BH, written independently: step-up rule and O(m^2) q-values."""
    m = p.size
    order = np.argsort(p)
    below = [k for k in range(1, m + 1) if p[order[k - 1]] <= k * alpha / m]
    reject = np.zeros(m, bool)
    if below:
        reject[order[: max(below)]] = True
    ps = p[order]
    q_sorted = np.array([min(1.0, min(ps[j] * m / (j + 1) for j in range(i, m))) for i in range(m)])
    q = np.empty(m)
    q[order] = q_sorted
    return reject, q


@pytest.mark.parametrize("seed", range(8))
def test_fdr_bh_equals_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.random(30), rng.random(10) * 0.01])  # some true effects
    p = np.round(p, 3)  # ties
    reject, q = fdr_bh(p.reshape(5, 8), alpha=0.1)
    ref_reject, ref_q = _bh_reference(p, 0.1)
    assert reject.shape == (5, 8)
    np.testing.assert_allclose(q.ravel(), ref_q)
    assert reject.ravel().tolist() == ref_reject.tolist()


def test_fdr_bh_rejects_bad_p() -> None:
    with pytest.raises(ValueError):
        fdr_bh([0.1, 1.5])


# --------------------------------------------------------------------------- max-T permutation
def _smooth_noise(rng: np.random.Generator, n: int, size: int = 10) -> np.ndarray:
    return np.stack([gaussian_filter(rng.normal(size=(size, size)), 1.0) for _ in range(n)])


def test_maxT_pure_noise_mask_nearly_empty() -> None:
    rng = np.random.default_rng(2)
    a, b = _smooth_noise(rng, 10), _smooth_noise(rng, 10)
    mask, p_fwer = permutation_maxT(a, b, n_perm=400, seed=0)
    _, p = pixelwise_ttest(a, b)
    assert mask.shape == p_fwer.shape == (10, 10)
    assert mask.sum() <= 2
    # FWER-adjusted p is never below the uncorrected one's order of magnitude and never < 1/(B+1)
    assert p_fwer.min() >= 1 / 401
    assert np.all(p_fwer >= p - 1e-12)


def test_maxT_implanted_effect_is_found() -> None:
    rng = np.random.default_rng(3)
    a, b = _smooth_noise(rng, 12), _smooth_noise(rng, 12)
    sd = a.std()
    a[:, 2:5, 6:9] += 4 * sd  # strong effect in a 3x3 region
    mask, p_fwer = permutation_maxT(a, b, n_perm=400, seed=1)
    region = np.zeros((10, 10), bool)
    region[2:5, 6:9] = True
    assert mask[region].all()
    assert mask[~region].sum() <= 3
    # no shuffle beats the observed labelling: p is the floor (1 + 0) / (400 + 1), never 0
    np.testing.assert_allclose(p_fwer[region], 1 / 401)


def test_maxT_matches_exhaustive_enumeration() -> None:
    # 3 vs 3 maps: only C(6,3) = 20 labellings. The exact max-T p of each pixel is the share of
    # labellings whose map maximum reaches the observed |t|; Monte Carlo must approach it.
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3, 2, 3))
    b = rng.normal(size=(3, 2, 3))
    a[:, 0, 0] += 3.0
    pooled = np.concatenate([a, b]).reshape(6, -1)
    t_obs = np.abs(pixelwise_ttest(a, b)[0]).ravel()
    maxima = []
    for grp in itertools.combinations(range(6), 3):
        rest = [i for i in range(6) if i not in grp]
        t = sps.ttest_ind(pooled[list(grp)], pooled[rest], axis=0).statistic
        maxima.append(np.abs(t).max())
    maxima = np.array(maxima)
    exact = np.array([np.mean(maxima >= t - 1e-9) for t in t_obs])
    _, p_fwer = permutation_maxT(a, b, n_perm=4000, seed=0)
    np.testing.assert_allclose(p_fwer.ravel(), exact, atol=0.03)


def test_maxT_independent_of_chunking_and_reproducible() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.random((5, 4, 4)), rng.random((6, 4, 4))
    a[:, 0, 0] = 0.0
    b[:, 0, 0] = 0.0  # constant pixel: p = 1
    m1, p1 = permutation_maxT(a, b, n_perm=200, seed=7)
    m2, p2 = permutation_maxT(a, b, n_perm=200, seed=7, max_chunk_elems=16)
    np.testing.assert_array_equal(p1, p2)
    assert p1[0, 0] == 1.0
    _, p_w = permutation_maxT(a, b, n_perm=200, seed=7, equal_var=False)
    assert p_w.shape == (4, 4)


def test_significant_fractions() -> None:
    p = np.array([[0.001, 0.02], [0.04, 0.5]])
    out = significant_fractions(p, alpha=0.05, p_fwer=np.array([[0.01, 0.3], [0.6, 1.0]]))
    # uncorrected: 3 of 4; Bonferroni (p < .0125): 1 of 4;
    # BH q: .004, .04, .0533, .5 -> 2 of 4; maxT: 1 of 4
    assert out == {
        "n_pixels": 4.0,
        "uncorrected": 0.75,
        "bonferroni": 0.25,
        "fdr": 0.5,
        "maxT": 0.25,
    }


# --------------------------------------------------------------------------- DeLong
def _delong_reference(y: np.ndarray, scores: list[np.ndarray]) -> tuple[list[float], np.ndarray]:
    """DeLong 1988 written out with explicit O(n^2) loops over positive-negative pairs."""

    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    pos = [i for i in range(y.size) if y[i] == 1]
    neg = [j for j in range(y.size) if y[j] == 0]
    m, n = len(pos), len(neg)
    v10 = np.array([[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in scores])
    v01 = np.array([[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in scores])
    aucs = [float(r.mean()) for r in v10]
    k = len(scores)
    s10 = np.array(
        [
            [np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(k)]
            for a in range(k)
        ]
    )
    s01 = np.array(
        [
            [np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(k)]
            for a in range(k)
        ]
    )
    return aucs, s10 / m + s01 / n


@pytest.mark.parametrize("seed", range(5))
def test_delong_matches_reference_and_mann_whitney(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(9, int), np.zeros(11, int)]
    rng.shuffle(y)
    sa = np.round(rng.random(20) + 0.5 * y, 1)  # ties on purpose
    sb = np.round(0.6 * sa + 0.4 * rng.random(20), 1)
    res = delong_test(y, sa, sb)
    u = sps.mannwhitneyu(sa[y == 1], sa[y == 0]).statistic
    assert res["auc_a"] == pytest.approx(u / (9 * 11))
    assert res["auc_b"] == pytest.approx(roc_auc_score(y, sb))
    aucs, cov = _delong_reference(y, [sa, sb])
    var_diff = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert res["diff"] == pytest.approx(aucs[0] - aucs[1])
    assert res["se"] == pytest.approx(math.sqrt(var_diff))
    assert res["z"] == pytest.approx(res["diff"] / res["se"])
    assert res["p"] == pytest.approx(2 * sps.norm.sf(abs(res["z"])))
    lo, hi = res["ci95"]
    assert lo < res["diff"] < hi
    single = delong_ci(y, sa)
    assert single["auc"] == pytest.approx(aucs[0])
    assert single["se"] == pytest.approx(math.sqrt(cov[0, 0]))


def test_delong_identical_predictions() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(10, int), np.zeros(10, int)]
    s = rng.random(20)
    res = delong_test(y, s, s.copy())
    assert (res["diff"], res["se"], res["z"], res["p"]) == (0.0, 0.0, 0.0, 1.0)


def test_delong_null_calibration_and_power() -> None:
    # Two models of equal quality with independent errors: p should be roughly uniform.
    rng = np.random.default_rng(11)
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    ps = []
    for _ in range(200):
        base = rng.normal(size=40) + 1.0 * y
        ps.append(delong_test(y, base + rng.normal(size=40), base + rng.normal(size=40))["p"])
    ps = np.array(ps)
    assert 0.01 <= np.mean(ps < 0.05) <= 0.12
    assert 0.35 <= np.mean(ps < 0.5) <= 0.65
    # A clearly better model is detected.
    good = 3.0 * y + rng.normal(size=40)
    poor = 0.2 * y + rng.normal(size=40)
    assert delong_test(y, good, poor)["p"] < 0.01


def test_delong_ci_and_errors() -> None:
    y = np.array([1, 1, 1, 0, 0, 0])
    perfect = delong_ci(y, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert perfect["auc"] == 1.0 and perfect["ci"] == [1.0, 1.0]
    res = delong_ci(y, [0.9, 0.4, 0.7, 0.5, 0.2, 0.1])
    assert 0.0 <= res["ci"][0] < res["auc"] <= res["ci"][1] <= 1.0
    with pytest.raises(ValueError, match="at least 2"):
        delong_test([1, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


# --------------------------------------------------------------------------- McNemar, Holm
def _paired(b: int, c: int, both_right: int = 5, both_wrong: int = 2):
    """Labels and two prediction vectors with b (A right, B wrong) and c (A wrong, B right)."""
    y = np.ones(b + c + both_right + both_wrong, int)
    pa = np.r_[np.ones(b), np.zeros(c), np.ones(both_right), np.zeros(both_wrong)].astype(int)
    pb = np.r_[np.zeros(b), np.ones(c), np.ones(both_right), np.zeros(both_wrong)].astype(int)
    return y, pa, pb


@pytest.mark.parametrize(("b", "c"), [(0, 0), (1, 0), (7, 2), (3, 9), (12, 12), (0, 6)])
def test_mcnemar_exact_equals_binomtest(b: int, c: int) -> None:
    res = mcnemar_test(*_paired(b, c))
    assert (res["b"], res["c"], res["method"]) == (b, c, "exact binomial")
    expected = 1.0 if b + c == 0 else sps.binomtest(min(b, c), b + c, 0.5).pvalue
    assert res["p"] == pytest.approx(expected)


def test_mcnemar_exact_hand_value() -> None:
    # b = 7, c = 2: P[X <= 2] for X ~ Bin(9, 1/2) = (1 + 9 + 36) / 512; two-sided p = 92 / 512.
    res = mcnemar_test(*_paired(7, 2))
    assert res["p"] == pytest.approx(92 / 512)


def test_mcnemar_chi_square_hand_value() -> None:
    # b = 30, c = 12 (b + c = 42 >= 25): chi2 = (|30 - 12| - 1)^2 / 42 = 289 / 42;
    # the 1-df chi-square tail is erfc(sqrt(x / 2)).
    res = mcnemar_test(*_paired(30, 12))
    assert res["method"].startswith("chi-square")
    assert res["statistic"] == pytest.approx(289 / 42)
    assert res["p"] == pytest.approx(math.erfc(math.sqrt(289 / 42 / 2)))
    forced = mcnemar_test(*_paired(7, 2), exact=False)
    assert forced["statistic"] == pytest.approx(16 / 9)
    assert mcnemar_test(*_paired(30, 12), exact=True)["method"] == "exact binomial"


def test_holm_hand_checked() -> None:
    # p = .01 .04 .03 .005; sorted .005 .01 .03 .04 times (4, 3, 2, 1) = .02 .03 .06 .04;
    # running max = .02 .03 .06 .06; back in order: .03 .06 .06 .02.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    assert holm([]).size == 0


# --------------------------------------------------------------------------- the unit: images
def test_image_means_averages_each_images_seeds() -> None:
    maps = np.arange(5 * 2 * 2, dtype=float).reshape(5, 2, 2)
    means, labels, ids, n = image_means(maps, [1, 0, 1, 0, 1], ["b", "a", "b", "a", "c"])
    assert ids.tolist() == ["a", "b", "c"] and labels.tolist() == [0, 1, 1]
    assert n.tolist() == [2, 2, 1]
    np.testing.assert_allclose(means[0], (maps[1] + maps[3]) / 2)
    np.testing.assert_allclose(means[1], (maps[0] + maps[2]) / 2)
    np.testing.assert_allclose(means[2], maps[4])
    with pytest.raises(ValueError, match="'a' carries different labels"):
        image_means(maps[:2], [0, 1], ["a", "a"])


def _null_sweep(rng: np.random.Generator, n_img: int = 24, n_seeds: int = 5, size: int = 8):
    """A sweep under the null: each image has its own CAM pattern, which every seed repeats up
    to seed noise; the class label has nothing to do with the maps."""
    pattern = np.stack([gaussian_filter(rng.normal(size=(size, size)), 1.0) for _ in range(n_img)])
    labels = np.r_[np.ones(n_img // 2, int), np.zeros(n_img - n_img // 2, int)]
    maps = np.concatenate([pattern + 0.05 * rng.normal(size=pattern.shape) for _ in range(n_seeds)])
    ids = np.tile(np.arange(n_img).astype(str), n_seeds)
    return maps, np.tile(labels, n_seeds), ids


def test_null_simulation_image_level_tests_hold_their_level() -> None:
    """Issue 13's simulation: pooling the 5 seed maps of each image as if independent makes most
    repetitions find FWER-significant pixels; one mean map per image keeps the FWER near 5 %."""
    rng = np.random.default_rng(13)
    reps, hits_image, hits_pooled, uncorrected = 40, 0, 0, []
    for r in range(reps):
        maps, labels, ids = _null_sweep(rng)
        means, lab, _, _ = image_means(maps, labels, ids)
        mask, _ = permutation_maxT(means[lab == 1], means[lab == 0], n_perm=199, seed=r)
        hits_image += bool(mask.any())
        _, p = pixelwise_ttest(means[lab == 1], means[lab == 0])
        uncorrected.append(np.mean(p < 0.05))
        pooled, _ = permutation_maxT(maps[labels == 1], maps[labels == 0], n_perm=199, seed=r)
        hits_pooled += bool(pooled.any())
    # Binomial(40, 0.05): P(X >= 6) is about 1.4 %.
    assert hits_image / reps <= 0.125
    assert 0.02 <= np.mean(uncorrected) <= 0.09
    assert hits_pooled / reps >= 0.5  # the old unit fails this simulation


def _rows(rng: np.random.Generator, n_img: int = 60, n_seeds: int = 1):
    y = np.r_[np.ones(n_img // 2, int), np.zeros(n_img // 2, int)]
    prob = np.clip(0.5 + 0.35 * (2 * y - 1) + 0.3 * rng.normal(size=n_img), 0, 1)
    ids = np.array([f"img{i}" for i in range(n_img)])
    return np.tile(y, n_seeds), np.tile(prob, n_seeds), np.tile(ids, n_seeds)


def test_cluster_bootstrap_of_identical_runs_is_as_wide_as_one_run() -> None:
    y1, p1, g1 = _rows(np.random.default_rng(0))
    one = cluster_bootstrap_ci(y1, p1, g1, n_boot=1000, seed=3)
    y5, p5, g5 = _rows(np.random.default_rng(0), n_seeds=5)
    five = cluster_bootstrap_ci(y5, p5, g5, n_boot=1000, seed=3)
    assert one["n_clusters"] == five["n_clusters"] == 60
    for key in ("acc", "sensitivity", "specificity", "f1", "auc", "ppv", "npv"):
        assert five[key] == pytest.approx(one[key], abs=1e-12), key
    # The row bootstrap this replaces is about sqrt(5) narrower on the same 5 copies.
    from lung_cls.evaluation.metrics import bootstrap_ci

    rows = bootstrap_ci(y5, p5, n_boot=1000, seed=3)
    ratio = (one["acc"][1] - one["acc"][0]) / (rows["acc"][1] - rows["acc"][0])
    assert 1.8 <= ratio <= 2.7


def test_cluster_bootstrap_one_row_per_cluster_brackets_the_pooled_value() -> None:
    y, p, g = _rows(np.random.default_rng(1))
    ci = cluster_bootstrap_ci(y, p, g, n_boot=500, seed=0)
    point = binary_metrics(y, p)
    for key in ("acc", "sensitivity", "specificity", "auc"):
        lo, hi = ci[key]
        assert lo <= point[key] <= hi, key
    # The resampled AUC equals sklearn's on a resample drawn by hand (weights = draw counts).
    ci1 = cluster_bootstrap_ci(y, p, g, n_boot=1, seed=5, return_samples=True)
    rng = np.random.default_rng(5)
    uniq = np.unique(g)  # clusters in sorted-id order; strata: ventilation, then perfusion
    label_of = {gi: yi for gi, yi in zip(g, y, strict=True)}
    rows = []
    for cls in (0, 1):
        members = np.array([i for i, u in enumerate(uniq) if label_of[u] == cls])
        for c in members[rng.integers(0, members.size, members.size)]:
            rows.append(int(np.flatnonzero(g == uniq[c])[0]))
    assert ci1["samples"]["auc"][0] == pytest.approx(roc_auc_score(y[rows], p[rows]), abs=1e-12)
    assert ci1["samples"]["acc"][0] == pytest.approx(np.mean((p[rows] >= 0.5) == y[rows]))


def test_cluster_bootstrap_resamples_patients_with_all_their_images() -> None:
    """Patients holding a V/Q pair are one cluster: both images enter or leave together, and the
    stratum 'both classes' keeps the class counts of every resample fixed."""
    y = np.array([0, 1] * 20)
    prob = np.where(y == 1, 0.8, 0.2)
    prob[:4] = 1 - prob[:4]  # two patients both wrong
    patients = np.repeat(np.arange(20).astype(str), 2)
    ci = cluster_bootstrap_ci(y, prob, patients, n_boot=300, seed=0, return_samples=True)
    assert ci["n_clusters"] == 20
    # Each patient is right on both images or wrong on both: accuracy moves in steps of 1/20,
    # and sensitivity equals specificity in every resample.
    acc = ci["samples"]["acc"]
    np.testing.assert_allclose(acc * 20, np.round(acc * 20), atol=1e-9)
    np.testing.assert_allclose(ci["samples"]["sensitivity"], ci["samples"]["specificity"])


@pytest.mark.parametrize("use_cluster", [True, False])
def test_bootstrap_interval_is_95_percent(use_cluster: bool) -> None:
    """The level, without peeking at the implementation: the bootstrap SD of accuracy with 400
    images half right in each class is sqrt(0.25 / 400) = 0.025, so a 95 % percentile interval is
    2 x 1.96 x 0.025 = 0.098 wide (a 90 % one, 0.082)."""
    from lung_cls.evaluation.metrics import bootstrap_ci

    y = np.r_[np.ones(200, int), np.zeros(200, int)]
    prob = np.tile([0.9, 0.1], 200)  # half right, half wrong in each class
    if use_cluster:
        ci = cluster_bootstrap_ci(y, prob, np.arange(400), n_boot=4000, seed=0)
    else:
        ci = bootstrap_ci(y, prob, n_boot=4000, seed=0)
    width = ci["acc"][1] - ci["acc"][0]
    assert 0.091 <= width <= 0.105
    assert ci["acc"][0] < 0.5 < ci["acc"][1]


def test_cluster_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="0/1"):
        cluster_bootstrap_ci([0, 2], [0.1, 0.2], ["a", "b"])
    with pytest.raises(ValueError, match="must match"):
        cluster_bootstrap_ci([0, 1], [0.1, 0.2], ["a"])
    with pytest.raises(ValueError, match="n_boot"):
        cluster_bootstrap_ci([0, 1], [0.1, 0.2], ["a", "b"], n_boot=0)
