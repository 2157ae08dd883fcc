"""Patient-grouped train/val/test splits with fixed per-class counts, and minority up-sampling.

The paper split its 530 images by random sampling with fixed counts per class (perfusion
354/20/20, ventilation 96/20/20) and then up-sampled ventilation 3.68x in the training set. It
did not say whether one patient's perfusion and ventilation images could land in different
splits; here they never do, because a V/Q pair of one patient shares anatomy, camera and
positioning, and splitting it would leak that patient into the test set.

Everything here is pure NumPy (SciPy's MILP solver only as a rare fallback), deterministic from
a seed, and free of Hydra/Lightning.

Split names are ``"train"``, ``"val"``, ``"test"`` and ``"unused"`` (images the fixed counts do
not ask for). A patient sits entirely in one of the four.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from lung_cls.labels import class_name  # noqa: F401 - also re-exported: split.class_name

logger = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "val", "test")
UNUSED = "unused"
ALL_SPLITS: tuple[str, str, str, str] = (*SPLITS, UNUSED)

# Order in which the splits are filled: the small, evaluation-critical ones first, so that the
# big training split absorbs whatever composition of patients is left.
_FILL_ORDER: tuple[int, int, int] = (1, 2, 0)  # indices into SPLITS: val, test, train

# Search steps before the exact-count search hands over to the integer program (typical
# cohorts need ~100; hard, tightly coupled ones can thrash).
_SEARCH_BUDGET = 1_500
# Largest reachability table (cells) the solver builds; two classes need (n0 + 1) * (n1 + 1).
_MAX_TABLE_CELLS = 4_000_000


# --------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------


def _largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Round non-negative quotas to integers summing to ``total`` (Hamilton's method).

    Ties go to the earlier entry, so the result is deterministic.
    """
    floors = np.floor(quotas).astype(np.int64)
    short = int(total - floors.sum())
    if short > 0:
        remainders = quotas - floors
        # stable sort on -remainder: equal remainders keep index order
        order = np.argsort(-remainders, kind="stable")
        floors[order[:short]] += 1
    return floors


def scale_counts(
    counts: Mapping[int, Sequence[int]], available: Mapping[int, int]
) -> dict[int, tuple[int, int, int]]:
    """Fit the configured (train, val, test) counts per class to the images that exist.

    The paper's counts assume its 530-image cohort. A smaller data set (a quick phantom, a
    site's own archive) should keep the paper's *proportions* rather than fail, so a class with
    fewer images than asked has its three counts scaled down proportionally with
    largest-remainder rounding, using all of that class's images. Every split that was asked
    for at least one image keeps at least one, so validation and test never go empty. A class
    with more images than asked keeps its counts; the extras end up ``"unused"``.

    Args:
        counts: label -> (train, val, test), e.g. the paper's ``{1: (354, 20, 20), 0: (96, 20, 20)}``.
        available: label -> number of images of that class in the data.

    Returns:
        label -> (train, val, test) actually to be used.

    Raises:
        ValueError: a count is negative or malformed, or a class has fewer images than splits.
    """
    out: dict[int, tuple[int, int, int]] = {}
    for label, req in counts.items():
        req_t = tuple(int(c) for c in req)
        name = class_name(label)
        if len(req_t) != 3:
            raise ValueError(
                f"split counts for class '{name}' must be (train, val, test), got {tuple(req)}"
            )
        if min(req_t) < 0:
            raise ValueError(f"split counts for class '{name}' must be >= 0, got {req_t}")
        n = int(available.get(label, 0))
        want = sum(req_t)
        if n >= want:
            if n > want:
                logger.info(
                    "class '%s': %d images, counts ask for %d; %d stay unused",
                    name,
                    n,
                    want,
                    n - want,
                )
            out[int(label)] = req_t  # type: ignore[assignment]
            continue
        n_parts = sum(1 for c in req_t if c > 0)
        if n < n_parts:
            needed = "/".join(s for s, c in zip(SPLITS, req_t, strict=True) if c > 0)
            raise ValueError(
                f"class '{name}' has {n} image{'s' if n != 1 else ''}; "
                f"a {needed} split needs at least {n_parts}"
            )
        req_arr = np.asarray(req_t, dtype=np.float64)
        scaled = _largest_remainder(req_arr * n / want, n)
        # Guarantee >= 1 in every split that was asked for images, taking from the largest.
        for i in range(3):
            if req_t[i] > 0 and scaled[i] == 0:
                donor = int(np.argmax(scaled))
                scaled[donor] -= 1
                scaled[i] += 1
        result = (int(scaled[0]), int(scaled[1]), int(scaled[2]))
        logger.warning(
            "class '%s' has %d images, fewer than the %d asked; counts scaled %s -> %s",
            name,
            n,
            want,
            req_t,
            result,
        )
        out[int(label)] = result
    return out


# --------------------------------------------------------------------------------------------
# Exact-count grouped split
# --------------------------------------------------------------------------------------------


class _BudgetExceeded(Exception):
    """The search ran past its step budget (only pathological inputs get here)."""


def _shift_or(table: np.ndarray, shift: np.ndarray) -> None:
    """table |= table shifted by ``shift`` (one 0/1 item of that size), in place."""
    dst, src = [], []
    for size, s in zip(table.shape, shift, strict=True):
        s = int(s)
        if s >= size:
            return
        dst.append(slice(s, None))
        src.append(slice(0, size - s))
    # NumPy resolves the overlap as if the source were copied first: 0/1 semantics hold
    table[tuple(dst)] |= table[tuple(src)]


class _Search:
    """Depth-first search over how many patients of each *composition* go to a split.

    Patients with the same per-class image counts (e.g. one perfusion + one ventilation image)
    are interchangeable as far as the counts go, so the problem shrinks from "which patients"
    to "how many patients of each composition" - a handful of integers per split. Which
    individual patients fill those numbers is then decided by the seeded permutation.

    For two classes the set of reachable count vectors is small (at most 395 x 137 for the
    paper), so a bounded-knapsack table per composition suffix tells exactly which partial
    choices can still be completed; the search then never backtracks within one split. Larger
    problems fall back to bound and gcd pruning. A step budget keeps pathological inputs from
    running long.
    """

    def __init__(self, vectors: np.ndarray, budget: int | None = None) -> None:
        self.vectors = vectors  # (T, K) int64, one row per composition, no all-zero rows
        self.steps = 0
        self.budget = _SEARCH_BUDGET if budget is None else budget

    def _tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.budget:
            raise _BudgetExceeded

    def reach_tables(self, caps: np.ndarray, target: np.ndarray) -> list[np.ndarray] | None:
        """tables[t][r]: r is a sum of compositions t.. within caps (None if too large)."""
        shape = tuple(int(v) + 1 for v in target)
        if math.prod(shape) > _MAX_TABLE_CELLS:
            return None
        n_types = len(self.vectors)
        table = np.zeros(shape, dtype=bool)
        table[(0,) * len(shape)] = True
        tables = [table] * (n_types + 1)
        for t in range(n_types - 1, -1, -1):
            self._tick()
            table = table.copy()
            v = self.vectors[t]
            pos = v > 0
            cap = int(min(caps[t], (target[pos] // v[pos]).min()))
            chunk = 1  # binary splitting: items of 1, 2, 4, ... patients cover 0..cap exactly
            while cap > 0:
                m = min(chunk, cap)
                _shift_or(table, m * v)
                cap -= m
                chunk *= 2
            tables[t] = table
        return tables

    def feasible(self, caps: np.ndarray, target: np.ndarray) -> bool:
        """Whether whole patients within ``caps`` can add up to exactly ``target``."""
        tables = self.reach_tables(caps, target)
        if tables is not None:
            return bool(tables[0][tuple(int(v) for v in target)])
        pref = np.zeros(len(self.vectors), dtype=np.int64)
        return next(self.fill(target, caps, pref), None) is not None

    def fill(self, target: np.ndarray, caps: np.ndarray, pref: np.ndarray) -> Iterator[np.ndarray]:
        """Yield every x (T,) with 0 <= x <= caps and x @ vectors == target, near ``pref`` first."""
        target = target.astype(np.int64)
        tables = self.reach_tables(caps, target)
        if tables is not None and not tables[0][tuple(int(v) for v in target)]:
            return
        n_types = len(self.vectors)
        # fallback pruning: what compositions t.. can still supply, and the gcd of their sizes
        supply = caps[:, None] * self.vectors
        suffix = np.zeros((n_types + 1, self.vectors.shape[1]), dtype=np.int64)
        suffix[:n_types] = np.cumsum(supply[::-1], axis=0)[::-1]
        gcd = np.zeros_like(suffix)
        for t in range(n_types - 1, -1, -1):
            gcd[t] = np.gcd(gcd[t + 1], np.where(caps[t] > 0, self.vectors[t], 0))
        x = np.zeros(n_types, dtype=np.int64)
        yield from self._fill(0, target.copy(), caps, pref, tables, suffix, gcd, x)

    def _fill(
        self,
        t: int,
        rem: np.ndarray,
        caps: np.ndarray,
        pref: np.ndarray,
        tables: list[np.ndarray] | None,
        suffix: np.ndarray,
        gcd: np.ndarray,
        x: np.ndarray,
    ) -> Iterator[np.ndarray]:
        self._tick()
        if t == len(self.vectors):
            if not rem.any():
                yield x.copy()
            return
        if tables is None:
            if (suffix[t] < rem).any():
                return
            g = gcd[t]
            if (rem[g > 0] % g[g > 0]).any():
                return
        v = self.vectors[t]
        pos = v > 0
        hi = int(min(caps[t], (rem[pos] // v[pos]).min()))
        # the compositions after t must cover what this one leaves
        need = rem - suffix[t + 1]
        if (need[~pos] > 0).any():
            return
        lo_k = -(-need[pos] // v[pos])  # ceil division
        lo = max(0, int(lo_k.max())) if lo_k.size else 0
        if lo > hi:
            return
        p = min(max(int(pref[t]), lo), hi)
        # p, p+1, p-1, p+2, p-2, ... within [lo, hi]
        for d in range(0, max(hi - p, p - lo) + 1):
            for val in (p + d, p - d) if d else (p,):
                if not lo <= val <= hi:
                    continue
                nxt = rem - val * v
                if tables is not None and not tables[t + 1][tuple(int(a) for a in nxt)]:
                    continue
                x[t] = val
                yield from self._fill(t + 1, nxt, caps, pref, tables, suffix, gcd, x)
        x[t] = 0


def _greedy_preference(
    perm_types: np.ndarray, consumed: np.ndarray, vectors: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """How many patients of each composition plain random sampling would put in a split.

    Walks the patients in seeded random order (skipping those already placed) and takes each
    one that still fits. The exact solver starts its search here, so the split's mix of paired
    and single-image patients looks like a random draw and changes with the seed.
    """
    taken = np.zeros(len(vectors), dtype=np.int64)
    seen = np.zeros(len(vectors), dtype=np.int64)
    rem = target.astype(np.int64).copy()
    for t in perm_types:
        seen[t] += 1
        if seen[t] <= consumed[t]:
            continue
        v = vectors[t]
        if (v <= rem).all():
            taken[t] += 1
            rem -= v
            if not rem.any():
                break
    return taken


def _solve(
    search: _Search,
    targets: list[np.ndarray],
    caps: np.ndarray,
    perm_types: np.ndarray,
) -> list[np.ndarray] | None:
    """Fill the splits one after another; a choice is kept only if the later splits, taken
    together, can still be met, and the search backtracks if they cannot be met one by one."""

    def rec(i: int, caps_left: np.ndarray) -> list[np.ndarray] | None:
        if i == len(targets):
            return []
        later = np.sum(targets[i + 1 :], axis=0) if i + 1 < len(targets) else None
        consumed = caps - caps_left
        pref = _greedy_preference(perm_types, consumed, search.vectors, targets[i])
        for x in search.fill(targets[i], caps_left, pref):
            left = caps_left - x
            if later is not None and not search.feasible(left, later):
                continue
            rest = rec(i + 1, left)
            if rest is not None:
                return [x, *rest]
        return None

    return rec(0, caps.copy())


def _milp_solve(
    vectors: np.ndarray,
    caps: np.ndarray,
    targets: list[np.ndarray],
    prefs: list[np.ndarray],
) -> list[np.ndarray] | None:
    """Exact fallback: the whole assignment as one small integer program (SciPy's HiGHS).

    Variables are x[t, b], the number of patients of composition t in split b; the objective
    is the L1 distance to ``prefs`` (what random sampling would have drawn), so the answer
    stays close to a random draw. Returns None if the program is infeasible; raises
    _BudgetExceeded if HiGHS gives up without an answer.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # slow import: only when needed

    n_types, n_classes = vectors.shape
    n_bins = len(targets)
    nx = n_types * n_bins  # x[t, b] at t * n_bins + b, then d[t, b] at nx + the same

    def xi(t: int, b: int) -> int:
        return t * n_bins + b

    rows, lo, hi = [], [], []
    for b, target in enumerate(targets):
        for k in range(n_classes):
            row = np.zeros(2 * nx)
            for t in range(n_types):
                row[xi(t, b)] = vectors[t, k]
            rows.append(row)
            lo.append(target[k])
            hi.append(target[k])
    for t in range(n_types):
        row = np.zeros(2 * nx)
        row[[xi(t, b) for b in range(n_bins)]] = 1
        rows.append(row)
        lo.append(0)
        hi.append(caps[t])
    for t in range(n_types):
        for b in range(n_bins):
            p = float(prefs[b][t])
            for sign in (1.0, -1.0):  # d >= x - p and d >= p - x
                row = np.zeros(2 * nx)
                row[nx + xi(t, b)] = 1.0
                row[xi(t, b)] = -sign
                rows.append(row)
                lo.append(-sign * p)
                hi.append(np.inf)
    cost = np.concatenate([np.zeros(nx), np.ones(nx)])
    upper = np.concatenate([np.repeat(caps, n_bins).astype(float), np.full(nx, np.inf)])
    res = milp(
        cost,
        constraints=LinearConstraint(np.asarray(rows), np.asarray(lo), np.asarray(hi)),
        integrality=np.concatenate([np.ones(nx), np.zeros(nx)]),
        bounds=Bounds(np.zeros(2 * nx), upper),
        options={"time_limit": 10.0},
    )
    if res.x is None:
        if res.status == 2:  # infeasible
            return None
        raise _BudgetExceeded
    x = np.rint(res.x[:nx]).astype(np.int64).reshape(n_types, n_bins)
    out = [x[:, b].copy() for b in range(n_bins)]
    for b, target in enumerate(targets):  # guard against solver tolerance surprises
        if not np.array_equal(out[b] @ vectors, target) or (x.sum(1) > caps).any():
            raise _BudgetExceeded
    return out


def _sequential_preferences(
    perm_types: np.ndarray, caps: np.ndarray, vectors: np.ndarray, targets: list[np.ndarray]
) -> list[np.ndarray]:
    """Greedy random-sampling preferences for each split in fill order (for the fallback)."""
    consumed = np.zeros_like(caps)
    prefs = []
    for target in targets:
        pref = _greedy_preference(perm_types, consumed, vectors, target)
        prefs.append(pref)
        consumed = consumed + pref
    return prefs


# The message helpers below take ``names``: the display name of each class (column) of the
# composition vectors - "perfusion", or "ventilation with neck=yes" for a stratified split.


def _fmt_counts(vec: np.ndarray, names: Sequence[str]) -> str:
    return " + ".join(f"{int(n)} {c}" for c, n in zip(names, vec, strict=True))


def _fmt_compositions(vectors: np.ndarray, caps: np.ndarray, names: Sequence[str]) -> str:
    head = "(" + ", ".join(names) + ")"
    body = ", ".join(
        f"{tuple(int(a) for a in v)} x {int(n)}" for v, n in zip(vectors, caps, strict=True)
    )
    return f"patients by images {head}: {body}"


def _feasible(vectors: np.ndarray, caps: np.ndarray, target: np.ndarray) -> bool | None:
    """Exact feasibility of one target from fresh state; None if the budget ran out."""
    try:
        return _Search(vectors).feasible(caps, target)
    except _BudgetExceeded:
        return None


def _class_hint(
    vectors: np.ndarray, caps: np.ndarray, target: np.ndarray, names: Sequence[str]
) -> str:
    """Name the class whose own count cannot be met from whole patients, if there is one."""
    for k, c in enumerate(names):
        if target[k] == 0:
            continue
        vk = vectors[:, k]
        keep = vk > 0
        if _feasible(vk[keep, None], caps[keep], target[k : k + 1]) is False:
            sizes = sorted({int(s) for s in vk[keep]})
            return (
                f"; class '{c}' cannot reach exactly {int(target[k])} from whole "
                f"patients (they hold {sizes} {c} images each, "
                f"{int((vk * caps).sum())} in all)"
            )
    return (
        "; the classes are coupled: patients that hold images of one class also hold"
        " images of another (V/Q pairs, repeat studies)"
    )


def _explain_failure(
    vectors: np.ndarray,
    caps: np.ndarray,
    targets: list[np.ndarray],
    names: list[str],
    class_names: Sequence[str],
    perm_types: np.ndarray,
) -> str:
    """Say which split (and, where it can be pinned down, which class) cannot be filled."""
    comp = _fmt_compositions(vectors, caps, class_names)
    advice = (
        f". {comp}. Too many multi-image patients for these counts; lower the counts "
        "(scale_counts() uses every image of a class that is short), or check the patient ids."
    )
    total = np.sum(targets, axis=0)
    if _feasible(vectors, caps, total) is False:
        return (
            f"grouped_split cannot select exactly {_fmt_counts(total, class_names)} images "
            "(train + val + test together) from whole patients: no set of patients adds up "
            "to it" + _class_hint(vectors, caps, total, class_names) + advice
        )
    for name, target in zip(names, targets, strict=True):
        if _feasible(vectors, caps, target) is False:
            return (
                f"grouped_split cannot give split '{name}' exactly "
                f"{_fmt_counts(target, class_names)} images from whole patients: no set of "
                "patients adds up to it" + _class_hint(vectors, caps, target, class_names) + advice
            )
    for i in range(1, len(targets)):
        prefix = targets[: i + 1]
        prefs = _sequential_preferences(perm_types, caps, vectors, prefix)
        try:
            ok = _milp_solve(vectors, caps, prefix, prefs) is not None
        except _BudgetExceeded:
            break
        if not ok:
            before = ", ".join(f"'{n}'" for n in names[:i])
            return (
                f"grouped_split cannot give split '{names[i]}' exactly "
                f"{_fmt_counts(targets[i], class_names)} images once {before} "
                f"{'is' if i == 1 else 'are'} filled, although each split can be filled on "
                "its own; the classes are coupled: patients that hold images of one class "
                "also hold images of another (V/Q pairs, repeat studies)" + advice
            )
    return (
        "grouped_split could not find an exact assignment of whole patients to the splits "
        "(the integer program gave up)" + advice
    )


def _as_groups(groups: Sequence | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(groups)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"groups must be 1-D with one patient id per image ({n}), got {arr.shape}")
    if arr.dtype == object:
        arr = arr.astype(str)
    return arr


def grouped_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | np.ndarray,
    counts: Mapping[int, Sequence[int]],
    seed: int,
    names: Mapping[int, str] | None = None,
) -> np.ndarray:
    """Assign each image to train/val/test/unused with exact per-class counts, by patient.

    Why an exact solver instead of shuffling patients: the paper's counts are exact
    (20 + 20 per class in val and test), and a cohort where every ventilation image has a
    perfusion partner from the same patient makes naive shuffling fail - once val holds 20
    perfusion images from single-study patients, no ventilation image can join it without its
    perfusion partner.

    Algorithm:
      1. Each patient is reduced to its *composition*: the number of images per class
         (e.g. ``(1, 1)`` for a V/Q pair, ``(0, 1)`` for a lone perfusion study).
      2. For val, then test, then train, a depth-first search chooses how many patients of
         each composition the split takes so that the class counts match exactly
         (knapsack reachability tables make each split's search dead-end free; a choice is
         kept only if the later splits together can still be met). The search starts from
         what seeded random sampling of patients would give, so the mix varies with the seed
         like a random draw.
      3. If that search runs past its step budget (tightly coupled classes, e.g. every image
         of a short class must be used and sits with images of the other class), the whole
         assignment is solved exactly as a small integer program (SciPy's HiGHS), minimising
         the distance to the same random-sampling preference. Only an infeasible program is
         an error, so whenever exact counts are possible they are met.
      4. Within each composition, patients in seeded random order go to val, then test, then
         train; the rest are ``"unused"``.
    The result depends only on (labels, groups, counts, seed). About 10 ms for the paper's
    530 images on a slow CPU.

    Args:
        labels: integer class label per image.
        groups: patient id per image (any hashable, typically str).
        counts: label -> (train, val, test), e.g. from :func:`scale_counts`. Every label present
            in ``labels`` must have an entry.
        seed: split seed.
        names: display names of the labels in error messages (default: the class names);
            :func:`stratified_split` passes "ventilation with neck=yes" and the like.

    Returns:
        str array (N,) of "train" / "val" / "test" / "unused".

    Raises:
        ValueError: counts ask for more images than exist, a label has no counts, or no
            assignment of whole patients meets the counts (the message names the split and,
            where possible, the class).
    """
    labels_arr = np.asarray(labels)
    if labels_arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels_arr.shape}")
    n = len(labels_arr)
    groups_arr = _as_groups(groups, n)
    classes = sorted(int(c) for c in counts)
    targets_by_split = _targets(labels_arr, counts, classes, names)
    class_names = [(names or {}).get(c, class_name(c)) for c in classes]
    splits = np.full(n, UNUSED, dtype="<U6")
    if n == 0:
        return splits

    g_idx, vectors, caps, type_of_group = _compositions(groups_arr, labels_arr, classes)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(type_of_group))
    perm_types = type_of_group[perm]
    fill_targets = [targets_by_split[i] for i in _FILL_ORDER]
    fill_names = [SPLITS[i] for i in _FILL_ORDER]
    solution = _solve_counts(vectors, caps, fill_targets, fill_names, class_names, perm_types)

    # patients in seeded order within each composition: val, then test, then train, then unused
    group_split = np.full(len(type_of_group), UNUSED, dtype="<U6")
    for t in range(len(vectors)):
        members = perm[perm_types == t]
        start = 0
        for name, x in zip(fill_names, solution, strict=True):
            group_split[members[start : start + int(x[t])]] = name
            start += int(x[t])
    splits[:] = group_split[g_idx]
    return splits


def _targets(
    labels_arr: np.ndarray,
    counts: Mapping[int, Sequence[int]],
    classes: list[int],
    names: Mapping[int, str] | None = None,
) -> np.ndarray:
    """The requested counts as a (split, class) table, checked against the images there are."""
    present = sorted(int(c) for c in np.unique(labels_arr)) if len(labels_arr) else []
    missing = [c for c in present if c not in counts]
    name = (lambda c: names.get(c, class_name(c))) if names else class_name
    if missing:
        raise ValueError(
            "grouped_split has no counts for "
            + ", ".join(f"class '{name(c)}' (label {c})" for c in missing)
        )
    targets_by_split = np.zeros((3, len(classes)), dtype=np.int64)
    for k, c in enumerate(classes):
        req = tuple(int(v) for v in counts[c])
        if len(req) != 3 or min(req) < 0:
            raise ValueError(
                f"counts for class '{name(c)}' must be 3 numbers >= 0 (train, val, test), got {req}"
            )
        have = int((labels_arr == c).sum())
        if sum(req) > have:
            raise ValueError(
                f"counts ask for {sum(req)} {name(c)} images {req}, but there are only "
                f"{have}; scale them with scale_counts() first"
            )
        targets_by_split[:, k] = req
    return targets_by_split


def _compositions(
    groups_arr: np.ndarray, labels_arr: np.ndarray, classes: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patients reduced to their compositions (images per class).

    Returns ``(group of each image, composition vectors, patients per composition, composition
    of each patient)``; compositions are ordered bigger first: the most constrained, so the
    search fails fast on them.
    """
    uniq, g_idx = np.unique(groups_arr, return_inverse=True)
    k_idx = np.searchsorted(np.asarray(classes), labels_arr.astype(np.int64))
    comp = np.zeros((len(uniq), len(classes)), dtype=np.int64)
    np.add.at(comp, (g_idx, k_idx), 1)
    vectors, type_of_group, caps = np.unique(comp, axis=0, return_inverse=True, return_counts=True)
    type_of_group = type_of_group.reshape(-1)
    order = np.lexsort((*(-vectors[:, k] for k in reversed(range(len(classes)))), -vectors.sum(1)))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return g_idx, vectors[order], caps[order], rank[type_of_group]


def _solve_counts(
    vectors: np.ndarray,
    caps: np.ndarray,
    fill_targets: list[np.ndarray],
    fill_names: list[str],
    class_names: list[str],
    perm_types: np.ndarray,
) -> list[np.ndarray]:
    """Patients per composition for each split (in fill order): the search, else the MILP."""
    search = _Search(vectors)
    total = np.sum(fill_targets, axis=0)
    solution = None
    try:
        if search.feasible(caps, total):
            solution = _solve(search, fill_targets, caps, perm_types)
        else:
            raise ValueError(
                _explain_failure(vectors, caps, fill_targets, fill_names, class_names, perm_types)
            )
    except _BudgetExceeded:
        pass
    if solution is not None:
        logger.debug("grouped_split solved in %d search steps", search.steps)
        return solution
    # the search can thrash when the classes are tightly coupled; settle it exactly
    logger.debug("grouped_split: search gave up after %d steps; solving as MILP", search.steps)
    prefs = _sequential_preferences(perm_types, caps, vectors, fill_targets)
    try:
        solution = _milp_solve(vectors, caps, fill_targets, prefs)
    except _BudgetExceeded:
        solution = None
    if solution is None:
        raise ValueError(
            _explain_failure(vectors, caps, fill_targets, fill_names, class_names, perm_types)
        )
    return solution


# --------------------------------------------------------------------------------------------
# Stratified split (data.split.stratify)
# --------------------------------------------------------------------------------------------


def stratum_name(label: int, value: str, column: str) -> str:
    """How messages name one stratum: ``ventilation with neck=yes``."""
    return f"{class_name(label)} with {column}={value}"


def _controlled_round(
    num: np.ndarray, den: int, row_tot: np.ndarray, col_tot: np.ndarray, row_order: Sequence[int]
) -> np.ndarray:
    """Round the table ``num / den`` to integers with the given row and column sums, every cell
    to the floor or the ceiling of its quota.

    The quotas' own row and column sums must be ``row_tot`` and ``col_tot``; then such a
    rounding always exists (the fractional parts are a fractional flow; an integral one of the
    same value exists). Rows in ``row_order`` take their extra units first, each by largest
    remainder (ties: the earlier column), so the first rows get exactly what largest-remainder
    rounding of that row alone would give wherever the columns allow; augmenting paths settle
    the rest.
    """
    base = num // den
    rem = num % den
    short_r = row_tot - base.sum(axis=1)
    short_c = col_tot - base.sum(axis=0)
    extra = np.zeros(base.shape, dtype=bool)
    for s in row_order:
        for g in np.argsort(-rem[s], kind="stable"):
            if short_r[s] == 0:
                break
            if rem[s, g] > 0 and short_c[g] > 0:
                extra[s, g] = True
                short_r[s] -= 1
                short_c[g] -= 1
    n_cols = base.shape[1]
    while (short_r > 0).any():
        s0 = int(np.flatnonzero(short_r > 0)[0])
        via_row: dict[int, int] = {}  # column -> the row it was reached from (edge to add)
        via_col: dict[int, int] = {s0: -1}  # row -> the column it was reached from (edge to drop)
        queue, end = [s0], None
        while queue and end is None:
            s = queue.pop(0)
            for g in range(n_cols):
                if g in via_row or rem[s, g] == 0 or extra[s, g]:
                    continue
                via_row[g] = s
                if short_c[g] > 0:
                    end = g
                    break
                for s2 in np.flatnonzero(extra[:, g]):
                    if int(s2) not in via_col:
                        via_col[int(s2)] = g
                        queue.append(int(s2))
        if end is None:  # cannot happen when the margins match the quotas
            raise RuntimeError("controlled rounding found no augmenting path")
        g = end
        while True:
            s = via_row[g]
            extra[s, g] = True
            if s == s0:
                break
            g_prev = via_col[s]
            extra[s, g_prev] = False
            g = g_prev
        short_r[s0] -= 1
        short_c[end] -= 1
    return base + extra


def stratified_counts(
    labels: Sequence[int] | np.ndarray,
    strata: Sequence[str] | np.ndarray,
    counts: Mapping[int, Sequence[int]],
) -> dict[tuple[int, str], tuple[int, int, int]]:
    """Spread each class's (train, val, test) counts over its strata in proportion to their
    share of that class.

    For class c with ``a_g`` images in stratum g (``A`` in all) and counts ``n_s`` (``N`` in
    all): the images used per stratum, ``T_g``, are ``N * a_g / A`` by largest remainder (all
    of them when ``N == A``), and the (split, stratum) table is the controlled rounding of
    ``n_s * T_g / N``: every cell the floor or the ceiling of its quota, val and test rounded
    first by largest remainder, and both margins exact - the class totals per split stay what
    was asked and no stratum gives more images than it has.

    Returns ``(label, stratum) -> (train, val, test)`` for every stratum that the class's images
    hold (zeros included).
    """
    labels_arr = np.asarray(labels).astype(np.int64)
    strata_arr = np.asarray(strata).astype(str)
    if strata_arr.shape != labels_arr.shape:
        raise ValueError(
            f"stratified_counts: {strata_arr.shape[0]} strata for {labels_arr.shape[0]} labels"
        )
    out: dict[tuple[int, str], tuple[int, int, int]] = {}
    order = list(_FILL_ORDER)  # val, test, train
    for c in sorted(int(k) for k in counts):
        req = np.asarray([int(v) for v in counts[c]], dtype=np.int64)
        values = sorted(set(strata_arr[labels_arr == c].tolist()))
        if not values:
            continue
        have = np.asarray([int(((labels_arr == c) & (strata_arr == v)).sum()) for v in values])
        n_all, a_all = int(req.sum()), int(have.sum())
        if len(req) != 3 or req.min() < 0 or n_all > a_all:
            raise ValueError(
                f"counts for class '{class_name(c)}' must be 3 numbers >= 0 adding up to at most "
                f"its {a_all} images, got {tuple(int(v) for v in req)}"
            )
        if n_all == a_all:
            used = have.copy()
        else:  # largest remainder of N * a_g / A, in integers (ties: the earlier stratum)
            used = (n_all * have) // a_all
            rest = (n_all * have) % a_all
            used[np.argsort(-rest, kind="stable")[: n_all - int(used.sum())]] += 1
        if n_all == 0:
            table = np.zeros((3, len(values)), dtype=np.int64)
        else:
            table = _controlled_round(np.outer(req, used), n_all, req, used, order)
        for g, v in enumerate(values):
            out[(c, v)] = (int(table[0, g]), int(table[1, g]), int(table[2, g]))
    return out


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | np.ndarray,
    strata: Sequence[str] | np.ndarray,
    counts: Mapping[int, Sequence[int]],
    seed: int,
    column: str = "subgroup",
) -> np.ndarray:
    """:func:`grouped_split` with each class's counts spread over the ``strata`` (the values of
    ``column``, one per image) by :func:`stratified_counts`: exact class totals per split, each
    stratum its proportional share, patients still in one split only.

    Each (class, stratum) pair becomes a class of its own for the exact-count solver, so an
    impossible request fails like an unstratified one, naming the split and the stratum
    (``ventilation with neck=yes``) after ``stratified by 'neck'``.
    """
    labels_arr = np.asarray(labels).astype(np.int64)
    strata_arr = np.asarray(strata).astype(str)
    if strata_arr.shape != labels_arr.shape:
        raise ValueError(f"stratified by '{column}': {strata_arr.shape[0]} values for "
                         f"{labels_arr.shape[0]} images")  # fmt: skip
    try:
        per_stratum = stratified_counts(labels_arr, strata_arr, counts)
    except ValueError as err:
        raise ValueError(f"stratified by '{column}': {err}") from None
    keys = sorted(per_stratum)
    code = {k: i for i, k in enumerate(keys)}
    composite = np.asarray(
        [code.get((int(c), v), -1) for c, v in zip(labels_arr, strata_arr, strict=True)],
        dtype=np.int64,
    )
    if (composite < 0).any():
        bad = sorted({class_name(int(c)) for c in labels_arr[composite < 0]})
        raise ValueError(f"stratified by '{column}': no counts for class(es) {bad}")
    names = {code[k]: stratum_name(k[0], k[1], column) for k in keys}
    try:
        return grouped_split(
            composite, groups, {code[k]: per_stratum[k] for k in keys}, seed, names=names
        )
    except ValueError as err:
        raise ValueError(f"stratified by '{column}': {err}") from None


# --------------------------------------------------------------------------------------------
# Balancing
# --------------------------------------------------------------------------------------------


def upsample_indices(
    indices: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, seed: int
) -> tuple[np.ndarray, float]:
    """Repeat minority-class training images until every class matches the majority's count.

    The paper balanced its training set by random up-sampling of ventilation (96 -> 354,
    a factor of 3.6875). Drawing with replacement would leave some images unseen and others
    over-weighted by chance, so here each image of a class with n images and majority count m
    appears floor(m / n) times, and m mod n of them, drawn without replacement, once more:
    the class lands exactly on m and every image's weight is floor or ceil of m / n.

    Args:
        indices: dataset indices of the training images.
        labels: label array of the *whole* dataset; ``labels[indices]`` are the training labels.
        seed: seed for the extra draws and the final shuffle.

    Returns:
        (shuffled index array of length n_classes * m, factor), where factor is the majority
        count over the smallest class count (1.0 if already balanced or empty).
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    labels_arr = np.asarray(labels)
    if idx.size == 0:
        return idx.copy(), 1.0
    if idx.min() < 0 or idx.max() >= len(labels_arr):
        raise ValueError(
            f"upsample_indices: indices out of range for {len(labels_arr)} labels "
            "(labels must be the whole dataset's label array)"
        )
    lab = labels_arr[idx]
    classes, n_per = np.unique(lab, return_counts=True)
    m = int(n_per.max())
    rng = np.random.default_rng(seed)
    parts = []
    for c, n_c in zip(classes, n_per, strict=True):
        members = idx[lab == c]
        q, r = divmod(m, int(n_c))
        parts.append(np.tile(members, q))
        if r:
            parts.append(rng.choice(members, size=r, replace=False))
    out = np.concatenate(parts)
    rng.shuffle(out)
    factor = m / int(n_per.min())
    return out, float(factor)


# --------------------------------------------------------------------------------------------
# Checks and summaries
# --------------------------------------------------------------------------------------------


def check_disjoint(splits: Sequence[str] | np.ndarray, groups: Sequence | np.ndarray) -> None:
    """Raise if any patient has images in more than one split (unused counts as a split).

    A guard for splits that come from elsewhere (a manifest column, an older run): one patient
    in train and test inflates test accuracy without anyone noticing.
    """
    splits_arr = np.asarray(splits).astype(str)
    groups_arr = _as_groups(groups, len(splits_arr))
    pairs = np.unique(np.stack([groups_arr.astype(str), splits_arr], axis=1), axis=0)
    ids, n_splits = np.unique(pairs[:, 0], return_counts=True)
    bad = ids[n_splits > 1]
    if bad.size:
        details = []
        for pid in bad[:10]:
            where = sorted(pairs[pairs[:, 0] == pid, 1])
            details.append(f"{pid} ({'/'.join(where)})")
        more = f" and {bad.size - 10} more" if bad.size > 10 else ""
        raise ValueError(
            f"{bad.size} patient(s) appear in more than one split: " + ", ".join(details) + more
        )


def split_summary(
    labels: Sequence[int] | np.ndarray,
    splits: Sequence[str] | np.ndarray,
    groups: Sequence | np.ndarray,
) -> dict[str, dict[str, int]]:
    """Images per class, images and patients per split - JSON-ready, for metrics.json.

    Returns ``{"train": {"perfusion": 354, "ventilation": 96, "images": 450, "patients": 380},
    "val": {...}, "test": {...}, "unused": {...}}``; every split and every class present in
    ``labels`` appears, with zeros where empty, so runs compare key by key.
    """
    labels_arr = np.asarray(labels)
    splits_arr = np.asarray(splits).astype(str)
    groups_arr = _as_groups(groups, len(labels_arr)).astype(str)
    if len(splits_arr) != len(labels_arr):
        raise ValueError(f"split_summary: {len(splits_arr)} splits for {len(labels_arr)} labels")
    classes = sorted(int(c) for c in np.unique(labels_arr))
    out: dict[str, dict[str, int]] = {}
    for s in ALL_SPLITS:
        sel = splits_arr == s
        entry = {class_name(c): int((labels_arr[sel] == c).sum()) for c in classes}
        entry["images"] = int(sel.sum())
        entry["patients"] = int(np.unique(groups_arr[sel]).size)
        out[s] = entry
    return out


def _images_and_splits(
    images: np.ndarray, splits: Sequence[str] | np.ndarray, caller: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W), splits (N,) as str)``, or a ValueError naming ``caller``."""
    imgs = np.asarray(images)
    splits_arr = np.asarray(splits).astype(str)
    if imgs.ndim < 2 or len(imgs) != len(splits_arr):
        raise ValueError(
            f"{caller}: need images (N, H, W) and N splits, got {imgs.shape} and {len(splits_arr)}"
        )
    return imgs, splits_arr


def duplicate_content(
    images: np.ndarray,
    splits: Sequence[str] | np.ndarray,
    ignore: Sequence[str] = (UNUSED,),
) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of pixel-identical images that sit in different splits.

    Patient ids can be wrong (anonymisation, a study exported twice under new ids); identical
    pixels are the surest sign of such leakage. Images are hashed with BLAKE2b and equal hashes
    are confirmed with a full comparison. Images in ``ignore`` splits (default: unused) are
    skipped, since they are never trained or scored.
    """
    imgs, splits_arr = _images_and_splits(images, splits, "duplicate_content")
    buckets: dict[bytes, list[int]] = {}
    for i in range(len(imgs)):
        if splits_arr[i] in ignore:
            continue
        digest = hashlib.blake2b(np.ascontiguousarray(imgs[i]).tobytes(), digest_size=16).digest()
        buckets.setdefault(digest, []).append(i)
    pairs: list[tuple[int, int]] = []
    for members in buckets.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                if splits_arr[i] != splits_arr[j] and np.array_equal(imgs[i], imgs[j]):
                    pairs.append((i, j))
    pairs.sort()
    return pairs


def _unit_rows(imgs: np.ndarray, max_side: int) -> np.ndarray:
    """Images as rows of zero-mean unit-norm vectors, block-averaged to at most ``max_side`` px
    (constant images give zero rows: they correlate with nothing)."""
    n, h, w = imgs.shape[0], imgs.shape[1], imgs.shape[2] if imgs.ndim > 2 else 1
    x = imgs.reshape(n, h, w).astype(np.float64)
    f = max(1, min(h, w) // max(1, int(max_side)))
    if f > 1:
        hh, ww = (h // f) * f, (w // f) * f
        x = x[:, :hh, :ww].reshape(n, hh // f, f, ww // f, f).mean(axis=(2, 4))
    x = x.reshape(n, -1)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def near_duplicates(
    images: np.ndarray,
    splits: Sequence[str] | np.ndarray,
    threshold: float = 0.999,
    ignore: Sequence[str] = (UNUSED,),
    max_side: int = 64,
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, r), i < j, of images in different splits that are near-identical: Pearson
    correlation ``r >= threshold`` of their pixels, both on copies block-averaged to at most
    ``max_side`` px (fast screen, one matrix product) and at full resolution (confirmation).

    Catches what byte equality misses - a copy shifted by a grey level, re-scaled, re-encoded
    with a little noise (r about 1 - 1e-4) - while different patients of the same class stay
    below: on the built-in phantom the largest correlation between two patients' pre-processed
    images is 0.994 at 64 px and 0.993 at 96 px (docs/statistics.md), hence the default 0.999.
    Images in ``ignore`` splits (default: unused) are skipped.
    """
    imgs, splits_arr = _images_and_splits(images, splits, "near_duplicates")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near_duplicates: threshold must lie in (0, 1], got {threshold}")
    keep = np.flatnonzero(~np.isin(splits_arr, list(ignore)))
    if keep.size < 2:
        return []
    small = _unit_rows(imgs[keep], max_side)
    corr = small @ small.T
    cand_a, cand_b = np.nonzero(np.triu(corr >= threshold - 1e-9, k=1))
    pairs: list[tuple[int, int, float]] = []
    for a, b in zip(cand_a.tolist(), cand_b.tolist(), strict=True):
        i, j = int(keep[a]), int(keep[b])
        if splits_arr[i] == splits_arr[j]:
            continue
        full = _unit_rows(imgs[[i, j]], max(imgs.shape[1:]))
        r = float(full[0] @ full[1])
        if r >= threshold:
            pairs.append((i, j, r))
    pairs.sort()
    return pairs


def cv_folds(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | np.ndarray,
    k: int,
    seed: int,
    strata: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """K patient-grouped, class-stratified test folds: the fold (0..k-1) of every image.

    Every image lies in exactly one fold and all images of a patient in the same one, so the k
    test folds together test every image once. Patients are dealt in seeded random order (those
    with the most images first), each to the fold that holds the fewest images of the patient's
    classes so far (ties: fewest images, then the lowest fold), which keeps each class's count
    per fold within about one patient of the others. With ``strata`` (one value per image,
    ``data.split.stratify``) the same dealing balances each (class, stratum) pair instead, so
    every stratum's share of a class is about the same in every fold.

    Raises ``ValueError`` when ``k < 2`` or a class has fewer patients than folds (a fold would
    test no image of it); a stratum with fewer patients than folds is allowed (some folds then
    hold none of it).
    """
    labels_arr = np.asarray(labels)
    groups_arr = _as_groups(groups, len(labels_arr)).astype(str)
    if isinstance(k, bool) or int(k) != k or k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k!r}")
    k = int(k)
    classes = sorted(int(c) for c in np.unique(labels_arr))
    patients, inv = np.unique(groups_arr, return_inverse=True)
    vec = np.zeros((patients.size, len(classes)), dtype=np.int64)
    for ci, c in enumerate(classes):
        np.add.at(vec[:, ci], inv[labels_arr == c], 1)
    for ci, c in enumerate(classes):
        n_pat = int((vec[:, ci] > 0).sum())
        if n_pat < k:
            raise ValueError(
                f"{k} folds but only {n_pat} patient(s) with {class_name(c)} images: every fold "
                "needs at least one (use fewer folds)"
            )
    if strata is not None:
        strata_arr = np.asarray(strata).astype(str)
        if strata_arr.shape != labels_arr.shape:
            raise ValueError(f"cv_folds: {strata_arr.size} strata for {labels_arr.size} labels")
        pairs = sorted({(int(c), v) for c, v in zip(labels_arr, strata_arr, strict=True)})
        vec = np.zeros((patients.size, len(pairs)), dtype=np.int64)
        for pi, (c, v) in enumerate(pairs):
            np.add.at(vec[:, pi], inv[(labels_arr == c) & (strata_arr == v)], 1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(patients.size)
    order = order[np.argsort(-vec[order].sum(axis=1), kind="stable")]
    counts = np.zeros((k, vec.shape[1]), dtype=np.int64)
    fold_of = np.empty(patients.size, dtype=np.int64)
    for p in order:
        has = vec[p] > 0
        load = counts[:, has].sum(axis=1)
        best = np.lexsort((np.arange(k), counts.sum(axis=1), load))[0]
        fold_of[p] = best
        counts[best] += vec[p]
    return fold_of[inv]
