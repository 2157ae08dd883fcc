"""Statistical tests for the CAM maps and for comparing models, as pure NumPy/SciPy functions.

Two families of questions:

* **Where do the two classes' CAMs differ?** The paper runs an uncorrected pixel-wise t-test
  (p < 0.05 on ~50 000 pixels, so ~2 500 false positives are expected under the null). Here the
  same test (:func:`pixelwise_ttest`) comes with Benjamini-Hochberg FDR control
  (:func:`fdr_bh`) and family-wise error control by the max-|t| permutation method
  (:func:`permutation_maxT`), which respects the strong spatial correlation of CAM pixels.
  Note: pytorch-grad-cam min-max scales each CAM to [0, 1] per image, so these tests compare
  *relative* spatial patterns of attention, not absolute activation strength.
* **What is the unit?** The seeds of a sweep share one split, so every test image is scored and
  mapped once per seed. Those maps are not independent samples: :func:`image_means` averages
  each image's maps over the seeds that tested it, and the pixel-wise tests (and the max-T
  permutations, which then shuffle whole images) run on one map per image.
  :func:`cluster_bootstrap_ci` gives pooled-prediction CIs that resample images (or patients,
  when a patient holds several test images) with all their seed rows, stratified by class.
* **Is model A better than model B on the same test images?** DeLong's test for two correlated
  AUCs (:func:`delong_test`), McNemar's test for paired correct/wrong decisions
  (:func:`mcnemar_test`), and Holm's step-down adjustment (:func:`holm`) for the family of
  pairwise comparisons.

Perfusion = label 1 = positive class throughout.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy import stats as sps

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers
def _groups(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError("groups must be arrays with the sample axis first, e.g. (N, H, W)")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"groups differ in map shape: {x.shape[1:]} vs {y.shape[1:]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(
            f"each group needs at least 2 maps for a variance, got {x.shape[0]} and {y.shape[0]}"
        )
    for name, arr in (("a", x), ("b", y)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"group {name} contains nan or inf")
    return x, y


def _t_from_moments(
    diff: np.ndarray,
    var_a: np.ndarray,
    var_b: np.ndarray,
    na: int,
    nb: int,
    equal_var: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """t statistic and degrees of freedom from group mean difference and sample variances.

    Where the standard error is zero (both groups constant) t is 0 if the means are equal and
    +-inf otherwise - the limits scipy reaches too, except that scipy gives nan for 0/0.
    """
    if equal_var:
        df = np.full(diff.shape, float(na + nb - 2))
        pooled = ((na - 1) * var_a + (nb - 1) * var_b) / (na + nb - 2)
        se2 = pooled * (1.0 / na + 1.0 / nb)
    else:
        va, vb = var_a / na, var_b / nb
        se2 = va + vb
        with np.errstate(divide="ignore", invalid="ignore"):
            df = se2**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
        df = np.where(se2 > 0, df, 1.0)  # unused where se2 == 0 (p set directly)
    se2 = np.maximum(se2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se2 > 0, diff / np.sqrt(se2), np.sign(diff) * np.inf)
    t = np.where((se2 == 0) & (diff == 0), 0.0, t)
    return t, df


def _two_sided_p(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    p = 2.0 * sps.t.sf(np.abs(t), df)
    return np.clip(p, 0.0, 1.0)


# --------------------------------------------------------------------------- pixel-wise tests
def pixelwise_ttest(a: Any, b: Any, equal_var: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample t-test at every pixel of two stacks of maps, ``a`` (Na, H, W) vs ``b`` (Nb, H, W).

    Same numbers as ``scipy.stats.ttest_ind(a, b, axis=0, equal_var=...)``, computed for all
    pixels at once. One deliberate difference: a pixel that is constant in both groups (e.g. a
    corner that every CAM leaves at 0) gives ``t = 0, p = 1`` instead of scipy's nan, so
    "no evidence of a difference" stays a number that maps and FDR can use; if the two constants
    differ, t is +-inf and p = 0 (as in scipy). Constancy is tested exactly (max == min), not
    through a rounded variance. Positive t: ``a`` higher. Any trailing shape works.
    """
    x, y = _groups(a, b)
    na, nb = x.shape[0], y.shape[0]
    ma, mb = x.mean(axis=0), y.mean(axis=0)
    va, vb = x.var(axis=0, ddof=1), y.var(axis=0, ddof=1)
    const_a = x.max(axis=0) == x.min(axis=0)
    const_b = y.max(axis=0) == y.min(axis=0)
    # Exact zeros where a group is constant, so rounding cannot fake a tiny variance.
    va = np.where(const_a, 0.0, va)
    vb = np.where(const_b, 0.0, vb)
    both = const_a & const_b
    diff = np.where(both, x[0] - y[0], ma - mb)
    t, df = _t_from_moments(diff, va, vb, na, nb, equal_var)
    p = _two_sided_p(t, df)
    return t, p


def fdr_bh(p: Any, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg false-discovery-rate control over all values of ``p`` (any shape).

    q-value of the i-th smallest of m p-values: ``min over j >= i of p_(j) * m / j``, capped at 1
    (``scipy.stats.false_discovery_control(method="bh")``); a test is rejected when its
    q <= alpha. That is the same set as the classic step-up rule (largest i with
    p_(i) <= i * alpha / m). Valid under independence and under the positive dependence typical of
    smooth maps. Returns ``(reject_mask, q_values)`` shaped like ``p``.
    """
    arr = np.asarray(p, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("fdr_bh got no p-values")
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise ValueError("fdr_bh: p-values must be finite and lie in [0, 1]")
    q = np.asarray(sps.false_discovery_control(arr.ravel(), method="bh"), dtype=np.float64)
    q = q.reshape(arr.shape)
    return q <= alpha, q


def _perm_t_chunk(
    xc: np.ndarray,
    xc2: np.ndarray,
    tot: np.ndarray,
    tot2: np.ndarray,
    member: np.ndarray,
    na: int,
    nb: int,
    equal_var: bool,
    const: np.ndarray,
) -> np.ndarray:
    """|t| for each permutation (rows of ``member``, 1 = group a) at every pixel (columns).

    Group sums come from one matrix product each; data are centred per pixel beforehand so the
    sum-of-squares formula does not lose precision.
    """
    sa = member @ xc
    qa = member @ xc2
    sb = tot - sa
    qb = tot2 - qa
    ssa = np.maximum(qa - sa**2 / na, 0.0)
    ssb = np.maximum(qb - sb**2 / nb, 0.0)
    diff = sa / na - sb / nb
    t, _ = _t_from_moments(diff, ssa / (na - 1), ssb / (nb - 1), na, nb, equal_var)
    t = np.abs(t)
    t[:, const] = 0.0
    return t


def permutation_maxT(
    a: Any,
    b: Any,
    n_perm: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    equal_var: bool = True,
    max_chunk_elems: int = 4_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels where the groups differ with the family-wise error rate held at ``alpha``.

    Westfall-Young max-|t|: the class labels are shuffled over the pooled maps ``n_perm``
    times; each shuffle's largest |t| over all pixels forms the null distribution of the map
    maximum, and a pixel's FWER-adjusted p is the share of shuffles whose maximum reaches its
    observed |t| (the observed labelling counts as one shuffle, so p >= 1/(n_perm + 1)). Unlike
    Bonferroni this adapts to the strong spatial correlation of CAMs, and unlike FDR it bounds
    the chance of even one false pixel.

    Exchangeability: the test assumes maps are exchangeable between classes under the null;
    grad-cam's per-image min-max scaling applies equally to both classes, so it holds, but the
    test is about relative attention patterns (see module docstring).

    Vectorised: pixels are columns of an (N, P) matrix and shuffles come in chunks of at most
    ``max_chunk_elems / P`` rows, bounding memory to a few arrays of ``max_chunk_elems`` floats.
    Pixels constant over all maps get t = 0 in every shuffle (p = 1).

    Returns ``(mask, p_fwer)`` shaped like one map; ``mask = p_fwer <= alpha``.
    """
    x, y = _groups(a, b)
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    shape = x.shape[1:]
    na, nb = x.shape[0], y.shape[0]
    data = np.concatenate([x.reshape(na, -1), y.reshape(nb, -1)], axis=0)
    n, npix = data.shape
    const = data.max(axis=0) == data.min(axis=0)
    xc = data - data.mean(axis=0)
    xc2 = xc**2
    tot, tot2 = xc.sum(axis=0), xc2.sum(axis=0)

    observed = np.zeros((1, n))
    observed[0, :na] = 1.0
    t_obs = _perm_t_chunk(xc, xc2, tot, tot2, observed, na, nb, equal_var, const)[0]

    rng = np.random.default_rng(seed)
    base = np.r_[np.ones(na), np.zeros(nb)]
    chunk = max(1, min(n_perm, max_chunk_elems // max(npix, 1)))
    max_null = np.empty(n_perm)
    done = 0
    while done < n_perm:
        k = min(chunk, n_perm - done)
        member = rng.permuted(np.broadcast_to(base, (k, n)), axis=1)
        max_null[done : done + k] = _perm_t_chunk(
            xc, xc2, tot, tot2, member, na, nb, equal_var, const
        ).max(axis=1)
        done += k
    # p = (1 + #{shuffles with max >= |t_obs|}) / (n_perm + 1), via a sorted null.
    # A relative tolerance keeps the observed labelling's own duplicates in the count.
    max_sorted = np.sort(max_null)
    tol = 1e-12 * np.maximum(np.abs(t_obs), 1.0)
    n_ge = n_perm - np.searchsorted(max_sorted, t_obs - tol, side="left")
    p_fwer = (1.0 + n_ge) / (n_perm + 1.0)
    p_fwer[const] = 1.0
    p_fwer = p_fwer.reshape(shape)
    return p_fwer <= alpha, p_fwer


def significant_fractions(
    p: Any, alpha: float = 0.05, p_fwer: Any | None = None
) -> dict[str, float]:
    """Share of pixels called significant under each correction, for the report's table.

    Keys: ``n_pixels``, ``uncorrected`` (p < alpha, the paper's rule), ``bonferroni``
    (p < alpha / m), ``fdr`` (Benjamini-Hochberg q <= alpha), and ``maxT`` (p_fwer <= alpha)
    when ``p_fwer`` from :func:`permutation_maxT` is given. Under no true difference the
    uncorrected share is about alpha by construction, which is why it alone means little.
    """
    arr = np.asarray(p, dtype=np.float64)
    m = arr.size
    if m == 0:
        raise ValueError("significant_fractions got no p-values")
    reject_fdr, _ = fdr_bh(arr, alpha)
    out = {
        "n_pixels": float(m),
        "uncorrected": float(np.mean(arr < alpha)),
        "bonferroni": float(np.mean(arr < alpha / m)),
        "fdr": float(np.mean(reject_fdr)),
    }
    if p_fwer is not None:
        pf = np.asarray(p_fwer, dtype=np.float64)
        if pf.size != m:
            raise ValueError(f"p_fwer has {pf.size} values but p has {m}")
        out["maxT"] = float(np.mean(pf <= alpha))
    return out


# --------------------------------------------------------------------------- the unit: images
def image_means(
    maps: Any, labels: Any, ids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One map per image: the mean of its maps over the seeds (rows) that share its id.

    ``maps`` (N, ...) with ``labels`` (N,) and ``ids`` (N,) per map. Returns ``(means, labels,
    unique_ids, n_maps)``, sorted by id; ``n_maps`` says how many rows each image pooled. An id
    whose rows carry different labels is a ``ValueError`` naming it (two images under one id).
    """
    x = np.asarray(maps, dtype=np.float64)
    lab = np.asarray(labels)
    key = np.asarray(ids).astype(str)
    if not (x.shape[0] == lab.shape[0] == key.shape[0]):
        raise ValueError(
            f"maps, labels and ids differ in length: {x.shape[0]}, {lab.shape[0]}, {key.shape[0]}"
        )
    if x.shape[0] == 0:
        raise ValueError("image_means got no maps")
    uniq, inv = np.unique(key, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    n_maps = np.bincount(inv, minlength=uniq.size)
    starts = np.r_[0, np.cumsum(n_maps)[:-1]]
    sums = np.add.reduceat(x[order], starts, axis=0)
    means = sums / n_maps.reshape((-1,) + (1,) * (x.ndim - 1))
    lab_sorted = lab[order]
    first = lab_sorted[starts]
    bad = np.flatnonzero(
        np.minimum.reduceat(lab_sorted, starts) != np.maximum.reduceat(lab_sorted, starts)
    )
    if bad.size:
        raise ValueError(
            f"image id {str(uniq[bad[0]])!r} carries different labels in different runs"
        )
    return means, first, uniq, n_maps


def _cluster_strata(
    y: np.ndarray, clusters: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Clusters as (unique ids, row -> cluster index, strata = arrays of cluster indices).

    A cluster's stratum is the set of classes among its rows (perfusion only, ventilation only,
    or both for a patient with a V/Q pair), so resampling within strata keeps the class mix.
    """
    uniq, inv = np.unique(clusters, return_inverse=True)
    has = np.zeros((uniq.size, 2), dtype=bool)
    has[inv, y] = True
    code = has[:, 0] * 1 + has[:, 1] * 2
    strata = [np.flatnonzero(code == c) for c in (1, 2, 3) if (code == c).any()]
    return uniq, inv, strata


def cluster_bootstrap_ci(
    y_true: Any,
    prob: Any,
    clusters: Any,
    *,
    pred: Any | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    threshold: float = 0.5,
    stratified: bool = True,
    return_samples: bool = False,
) -> dict[str, Any]:
    """Percentile bootstrap CIs of pooled metrics that resample clusters, not rows.

    ``clusters`` names the unit of each row: the image id (rows of the same image from several
    seeds are one cluster) or the patient id (when patients hold several test images). Each
    resample draws clusters with replacement - within each class stratum when ``stratified``
    (see :func:`_cluster_strata`) - and scores all rows of the drawn clusters, each as often as
    its cluster was drawn. The point estimate (all rows once) is unchanged; only the interval
    now reflects how many independent units there are: 5 identical copies of one run give the
    interval of one run, not one sqrt(5) narrower.

    Metrics: ``acc, sensitivity, specificity, f1, ppv, npv, auc`` (Mann-Whitney AUC over rows,
    ties 1/2), with ``pred`` the given predictions or ``prob >= threshold``. Returns
    ``{metric: [lo, hi]}`` at level ``1 - alpha``, ``n_clusters``, and with ``return_samples``
    the resampled values under ``samples``. Undefined resamples (nan) are left out.
    """
    y = np.asarray(y_true)
    s = np.asarray(prob, dtype=np.float64)
    g = np.asarray(clusters).astype(str)
    if y.ndim != 1 or not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_true must be a 1-D array of 0/1 labels")
    y = y.astype(np.int64)
    if s.shape != y.shape or g.shape != y.shape:
        raise ValueError(f"prob {s.shape} and clusters {g.shape} must match y_true {y.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("prob contains nan or inf")
    yhat = (s >= threshold) if pred is None else (np.asarray(pred) == 1)
    if yhat.shape != y.shape:
        raise ValueError(f"pred has shape {yhat.shape}, labels {y.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    uniq, inv, strata = _cluster_strata(y, g)
    if not stratified:
        strata = [np.arange(uniq.size)]
    rng = np.random.default_rng(seed)
    # counts[b, c]: how often cluster c is drawn in resample b.
    counts = np.zeros((n_boot, uniq.size))
    for members in strata:
        draws = members[rng.integers(0, members.size, size=(n_boot, members.size))]
        flat = (draws + uniq.size * np.arange(n_boot)[:, None]).ravel()
        counts += np.bincount(flat, minlength=n_boot * uniq.size).reshape(n_boot, uniq.size)
    w = counts[:, inv]  # (B, rows): weight of each row
    pos = y == 1
    tp = w @ (pos & yhat).astype(float)
    fn = w @ (pos & ~yhat).astype(float)
    fp = w @ (~pos & yhat).astype(float)
    tn = w @ (~pos & ~yhat).astype(float)
    sp, sn = s[pos], s[~pos]
    # Pairwise comparison of every positive row with every negative row (ties 1/2).
    cmp = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
    wp, wn = w[:, pos], w[:, ~pos]
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = {
            "acc": (tp + tn) / (tp + tn + fp + fn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "auc": np.sum((wp @ cmp) * wn, axis=1) / (wp.sum(axis=1) * wn.sum(axis=1)),
        }
    q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    out: dict[str, Any] = {}
    for key, vals in samples.items():
        ok = np.isfinite(vals)
        out[key] = [float(v) for v in np.percentile(vals[ok], q)] if ok.any() else [math.nan] * 2
    out["n_clusters"] = int(uniq.size)
    if return_samples:
        out["samples"] = samples
    return out


# --------------------------------------------------------------------------- ROC comparisons
def _split_scores(y_true: Any, scores: list[Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    y = np.asarray(y_true)
    if y.ndim != 1 or not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_true must be a 1-D array of 0/1 labels")
    out = []
    for i, s in enumerate(scores):
        arr = np.asarray(s, dtype=np.float64)
        if arr.shape != y.shape:
            raise ValueError(f"scores {i} have shape {arr.shape}, labels {y.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"scores {i} contain nan or inf")
        out.append(arr)
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    if n1 < 2 or n0 < 2:
        raise ValueError(
            f"DeLong needs at least 2 images of each class, got {n1} perfusion and {n0} ventilation"
        )
    return y.astype(bool), out


def _placements(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components via midranks (Sun & Xu 2014), O(n log n).

    v10[i] = share of negatives scored below positive i (ties 1/2);
    v01[j] = share of positives scored above negative j (ties 1/2).
    """
    m, n = pos.size, neg.size
    r_all = sps.rankdata(np.r_[pos, neg], method="average")
    r_pos = sps.rankdata(pos, method="average")
    r_neg = sps.rankdata(neg, method="average")
    v10 = (r_all[:m] - r_pos) / n
    v01 = 1.0 - (r_all[m:] - r_neg) / m
    return float(v10.mean()), v10, v01


def _z_p(diff: float, se: float) -> tuple[float, float]:
    if se > 0:
        z = diff / se
        return z, float(2.0 * sps.norm.sf(abs(z)))
    if diff == 0:
        return 0.0, 1.0
    return math.copysign(math.inf, diff), 0.0


def delong_test(y_true: Any, prob_a: Any, prob_b: Any) -> dict[str, Any]:
    """DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUCs on the same images.

    Both models score the same test images, so their AUC errors are correlated; treating them as
    independent would overstate the variance of the difference. The covariance comes from the
    placement values (structural components) of each positive and negative image.

    Returns keys: ``auc_a, auc_b, diff`` (a - b), ``se`` (of the difference), ``z``, ``p``
    (two-sided, normal approximation), ``ci95`` ([lo, hi] of the difference), ``n_pos, n_neg``.
    Identical predictions give diff = 0, se = 0, z = 0, p = 1.
    """
    y, (sa, sb) = _split_scores(y_true, [prob_a, prob_b])
    auc_a, v10a, v01a = _placements(sa[y], sa[~y])
    auc_b, v10b, v01b = _placements(sb[y], sb[~y])
    m, n = int(y.sum()), int((~y).sum())
    s10 = np.cov(np.vstack([v10a, v10b]), ddof=1)
    s01 = np.cov(np.vstack([v01a, v01b]), ddof=1)
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    se = math.sqrt(max(var, 0.0))
    diff = auc_a - auc_b
    z, p = _z_p(diff, se)
    half = sps.norm.ppf(0.975) * se
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "diff": diff,
        "se": se,
        "z": z,
        "p": p,
        "ci95": [diff - half, diff + half],
        "n_pos": m,
        "n_neg": n,
    }


def delong_ci(y_true: Any, prob: Any, alpha: float = 0.05) -> dict[str, Any]:
    """AUC with a normal-approximation confidence interval from DeLong's variance.

    Clipped to [0, 1]. Caveat: with perfect separation (AUC = 1) the variance estimate is 0 and
    the interval collapses to [1, 1]; the bootstrap interval has the same blind spot, so report
    the number of test images next to it. Returns keys ``auc, se, ci`` ([lo, hi]), ``alpha``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    y, (s,) = _split_scores(y_true, [prob])
    auc, v10, v01 = _placements(s[y], s[~y])
    m, n = v10.size, v01.size
    var = v10.var(ddof=1) / m + v01.var(ddof=1) / n
    se = math.sqrt(max(var, 0.0))
    half = sps.norm.ppf(1.0 - alpha / 2.0) * se
    return {
        "auc": auc,
        "se": se,
        "ci": [max(0.0, auc - half), min(1.0, auc + half)],
        "alpha": alpha,
    }


# --------------------------------------------------------------------------- paired decisions
def mcnemar_test(
    y_true: Any, pred_a: Any, pred_b: Any, exact: bool | None = None
) -> dict[str, Any]:
    """McNemar's test: do two models make different numbers of errors on the same images?

    Only discordant images count: ``b`` = A right and B wrong, ``c`` = A wrong and B right.
    ``exact=None`` picks the exact binomial test (two-sided, p = min(1, 2 P[X <= min(b, c)]),
    X ~ Bin(b + c, 1/2)) when b + c < 25, else the chi-square test with continuity correction,
    ``(|b - c| - 1)^2 / (b + c)`` on 1 df. With b + c = 0 the models never disagree: p = 1.

    Returns keys ``b, c, statistic`` (min(b, c) for exact, chi-square otherwise), ``p``,
    ``method`` ("exact binomial" or "chi-square (continuity corrected)").
    """
    y = np.asarray(y_true)
    pa = np.asarray(pred_a)
    pb = np.asarray(pred_b)
    if not (y.shape == pa.shape == pb.shape) or y.ndim != 1:
        raise ValueError(
            f"labels and predictions must be 1-D and equal in length: {y.shape}, {pa.shape}, {pb.shape}"
        )
    for name, arr in (("y_true", y), ("pred_a", pa), ("pred_b", pb)):
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{name} must hold only 0/1")
    ok_a = pa == y
    ok_b = pb == y
    b = int(np.sum(ok_a & ~ok_b))
    c = int(np.sum(~ok_a & ok_b))
    nd = b + c
    if exact is None:
        exact = nd < 25
    if exact:
        stat = float(min(b, c))
        p = 1.0 if nd == 0 else float(min(1.0, 2.0 * sps.binom.cdf(min(b, c), nd, 0.5)))
        method = "exact binomial"
    else:
        # As R's mcnemar.test and statsmodels: no clamp when b == c (statistic 1 / (b + c)).
        stat = 0.0 if nd == 0 else (abs(b - c) - 1.0) ** 2 / nd
        p = float(sps.chi2.sf(stat, 1)) if nd else 1.0
        method = "chi-square (continuity corrected)"
    return {"b": b, "c": c, "statistic": stat, "p": p, "method": method}


def holm(pvalues: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given) for a family of comparisons.

    Controls the family-wise error rate like Bonferroni but is uniformly more powerful: the
    i-th smallest p is multiplied by (m - i + 1), and adjusted values are made monotone.
    Reject comparison k at level alpha when ``holm(p)[k] <= alpha``.
    """
    arr = np.asarray(pvalues, dtype=np.float64)
    flat = arr.ravel()
    if flat.size == 0:
        return arr.copy()
    if not np.all(np.isfinite(flat)) or flat.min() < 0 or flat.max() > 1:
        raise ValueError("holm: p-values must be finite and lie in [0, 1]")
    m = flat.size
    order = np.argsort(flat, kind="stable")
    adj_sorted = np.maximum.accumulate(flat[order] * (m - np.arange(m)))
    adj = np.empty(m)
    adj[order] = np.minimum(adj_sorted, 1.0)
    return adj.reshape(arr.shape)
