"""Patient-grouped splits, count scaling, up-sampling and leakage checks (lung_cls.data.split)."""

from __future__ import annotations

import numpy as np
import pytest

from lung_cls.data import split as split_mod
from lung_cls.data.split import (
    check_disjoint,
    duplicate_content,
    grouped_split,
    scale_counts,
    split_summary,
    upsample_indices,
)

PAPER_COUNTS = {1: (354, 20, 20), 0: (96, 20, 20)}


def paper_cohort() -> tuple[np.ndarray, np.ndarray]:
    """394 perfusion + 136 ventilation images; 136 patients have both, 258 only perfusion."""
    labels: list[int] = []
    groups: list[str] = []
    for i in range(136):
        labels += [0, 1]
        groups += [f"pair{i:03d}", f"pair{i:03d}"]
    for i in range(258):
        labels.append(1)
        groups.append(f"solo{i:03d}")
    return np.asarray(labels), np.asarray(groups)


def per_class(labels: np.ndarray, splits: np.ndarray, label: int) -> tuple[int, int, int]:
    return tuple(int(((splits == s) & (labels == label)).sum()) for s in ("train", "val", "test"))


def random_cohort(seed: int, n_patients: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Patients with 1-4 images of either class (repeat studies, V/Q pairs)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for i in range(n_patients):
        for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3, 4]))):
            labels.append(int(rng.random() < 0.7))
            groups.append(f"p{i}")
    return np.asarray(labels), np.asarray(groups)


# ---------------------------------------------------------------------------- grouped_split


def test_paper_cohort_exact_counts_and_disjoint_patients():
    labels, groups = paper_cohort()
    splits = grouped_split(labels, groups, PAPER_COUNTS, seed=0)
    assert splits.shape == labels.shape
    for label, want in PAPER_COUNTS.items():
        assert per_class(labels, splits, label) == want
    assert not (splits == "unused").any()
    check_disjoint(splits, groups)
    # both images of every pair share one split
    for pid in np.unique(groups[np.char.startswith(groups, "pair")]):
        assert len(set(splits[groups == pid])) == 1


def test_split_deterministic_for_seed_and_changes_with_seed():
    labels, groups = paper_cohort()
    a = grouped_split(labels, groups, PAPER_COUNTS, seed=7)
    b = grouped_split(labels, groups, PAPER_COUNTS, seed=7)
    c = grouped_split(labels, groups, PAPER_COUNTS, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 20
    assert per_class(labels, c, 0) == PAPER_COUNTS[0]


def test_extras_are_unused_and_whole_patients():
    labels, groups = random_cohort(1, n_patients=300)
    avail = {c: int((labels == c).sum()) for c in (0, 1)}
    counts = {1: (150, 20, 20), 0: (60, 15, 15)}
    assert all(avail[c] > sum(counts[c]) for c in counts)
    splits = grouped_split(labels, groups, counts, seed=3)
    for label, want in counts.items():
        assert per_class(labels, splits, label) == want
    assert (splits == "unused").sum() == len(labels) - sum(map(sum, counts.values()))
    check_disjoint(splits, groups)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_image_patients_scaled_counts_exact(seed):
    labels, groups = random_cohort(seed + 10, n_patients=120)
    avail = {c: int((labels == c).sum()) for c in (0, 1)}
    counts = scale_counts(PAPER_COUNTS, avail)
    splits = grouped_split(labels, groups, counts, seed=seed)
    for label, want in counts.items():
        assert per_class(labels, splits, label) == want
    check_disjoint(splits, groups)


def test_integer_program_fallback_gives_exact_counts(monkeypatch):
    # a one-step budget forces the MILP path that settles tightly coupled cohorts
    monkeypatch.setattr(split_mod, "_SEARCH_BUDGET", 1)
    labels, groups = random_cohort(5, n_patients=120)
    avail = {c: int((labels == c).sum()) for c in (0, 1)}
    counts = scale_counts(PAPER_COUNTS, avail)
    a = grouped_split(labels, groups, counts, seed=4)
    b = grouped_split(labels, groups, counts, seed=4)
    np.testing.assert_array_equal(a, b)
    for label, want in counts.items():
        assert per_class(labels, a, label) == want
    check_disjoint(a, groups)


def test_impossible_split_names_split_and_class():
    # every ventilation patient holds two ventilation images: an odd val count cannot be met
    labels = np.asarray([0, 0] * 20 + [1] * 30)
    groups = np.asarray([f"v{i // 2}" for i in range(40)] + [f"q{i}" for i in range(30)])
    with pytest.raises(ValueError, match=r"split 'val'.*class 'ventilation'.*\[2\]"):
        grouped_split(labels, groups, {0: (18, 1, 1), 1: (10, 10, 10)}, seed=0)


def test_impossible_coupled_split_explains_pairs():
    # only V/Q pairs: val cannot hold 10 ventilation but 5 perfusion images
    labels = np.asarray([0, 1] * 30)
    groups = np.repeat([f"c{i}" for i in range(30)], 2)
    with pytest.raises(ValueError, match=r"'val'.*coupled"):
        grouped_split(labels, groups, {0: (10, 10, 10), 1: (20, 5, 5)}, seed=0)


def test_counts_larger_than_data_point_to_scale_counts():
    labels, groups = paper_cohort()
    with pytest.raises(ValueError, match="scale_counts"):
        grouped_split(labels, groups, {1: (354, 20, 20), 0: (120, 20, 20)}, seed=0)


def test_label_without_counts_is_an_error():
    with pytest.raises(ValueError, match="no counts"):
        grouped_split([0, 1, 2], ["a", "b", "c"], {0: (1, 0, 0), 1: (1, 0, 0)}, seed=0)


# ---------------------------------------------------------------------------- scale_counts


def test_scale_counts_keeps_counts_when_enough_images():
    assert scale_counts(PAPER_COUNTS, {1: 394, 0: 136}) == PAPER_COUNTS
    assert scale_counts(PAPER_COUNTS, {1: 500, 0: 200}) == PAPER_COUNTS


def test_scale_counts_proportional_for_small_cohort():
    got = scale_counts(PAPER_COUNTS, {1: 40, 0: 14})
    # 40 * (354, 20, 20) / 394 = (35.94, 2.03, 2.03); 14 * (96, 20, 20) / 136 = (9.88, 2.06, 2.06)
    assert got == {1: (36, 2, 2), 0: (10, 2, 2)}
    assert sum(got[1]) == 40 and sum(got[0]) == 14


def test_scale_counts_minimum_and_error():
    assert scale_counts(PAPER_COUNTS, {1: 3, 0: 3}) == {1: (1, 1, 1), 0: (1, 1, 1)}
    with pytest.raises(
        ValueError,
        match="class 'ventilation' has 2 images; a train/val/test split needs at least 3",
    ):
        scale_counts(PAPER_COUNTS, {1: 394, 0: 2})


# ---------------------------------------------------------------------------- upsample


def test_upsample_paper_factor_and_balance():
    labels = np.asarray([1] * 354 + [0] * 96)
    indices = np.arange(450)
    out, factor = upsample_indices(indices, labels, seed=0)
    assert factor == pytest.approx(3.6875)
    assert len(out) == 708
    assert (labels[out] == 0).sum() == 354 and (labels[out] == 1).sum() == 354
    reps = np.bincount(out, minlength=450)
    assert (reps[labels == 1] == 1).all()
    vent_reps = reps[labels == 0]
    assert set(np.unique(vent_reps)) == {3, 4}
    assert (vent_reps == 4).sum() == 354 - 3 * 96  # 66 drawn without replacement
    assert not np.array_equal(out[:354], np.sort(out[:354]))  # shuffled
    again, _ = upsample_indices(indices, labels, seed=0)
    np.testing.assert_array_equal(out, again)


def test_upsample_uses_dataset_labels_by_index():
    labels = np.asarray([0, 1, 1, 1, 0, 1])
    out, factor = upsample_indices([1, 2, 3, 4], labels, seed=1)
    assert factor == 3.0
    assert sorted(out.tolist()) == [1, 2, 3, 4, 4, 4]


# ---------------------------------------------------------------------------- checks


def test_check_disjoint_names_overlapping_patients():
    groups = np.asarray(["a", "a", "b", "c", "c"])
    check_disjoint(np.asarray(["train", "train", "val", "test", "test"]), groups)
    with pytest.raises(ValueError, match=r"1 patient.*c \(test/unused\)"):
        check_disjoint(np.asarray(["train", "train", "val", "test", "unused"]), groups)


def test_split_summary_counts_images_and_patients():
    labels, groups = paper_cohort()
    splits = grouped_split(labels, groups, PAPER_COUNTS, seed=0)
    summary = split_summary(labels, splits, groups)
    assert summary["train"]["perfusion"] == 354 and summary["train"]["ventilation"] == 96
    assert summary["val"] == {"ventilation": 20, "perfusion": 20, "images": 40, "patients": 20}
    assert summary["unused"]["images"] == 0
    assert sum(s["patients"] for s in summary.values()) == len(np.unique(groups))


def test_duplicate_content_finds_cross_split_copies():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    images[3] = images[0]  # leaked copy: train vs test
    images[5] = images[1]  # same split: not leakage
    images[4] = images[2]  # one copy unused: ignored
    splits = np.asarray(["train", "train", "val", "test", "unused", "train"])
    assert duplicate_content(images, splits) == [(0, 3)]
    assert (2, 4) in duplicate_content(images, splits, ignore=())


def test_near_duplicates_catch_what_bytes_miss():
    """A copy one grey level brighter, or with a little noise, is the same image; two different
    noisy images of one smooth pattern are not (correlation below 0.999)."""
    from lung_cls.data.split import near_duplicates

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    base = 120 + 100 * np.exp(-((yy - 16) ** 2 + (xx - 12) ** 2) / 60.0)
    images = np.stack([np.clip(base + rng.normal(0, 12, base.shape), 0, 250) for _ in range(5)])
    images[1] = images[0] + 1  # shifted by one grey level: not byte-identical
    images[3] = images[2] + rng.normal(0, 0.5, base.shape)  # re-encoded with a little noise
    images = images.astype(np.uint8)
    splits = np.asarray(["train", "test", "train", "val", "test"])
    assert duplicate_content(images, splits) == []
    pairs = near_duplicates(images, splits)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (2, 3)]
    assert all(r >= 0.999 for *_, r in pairs)
    # the independent noisy images of one pattern correlate, but stay below the threshold
    full = np.corrcoef(images.reshape(5, -1).astype(float))
    assert 0.5 < full[0, 4] < 0.999
    assert near_duplicates(images, np.asarray(["train"] * 5)) == []  # one split: no leakage
    assert near_duplicates(images, splits, threshold=0.4)  # a loose threshold flags more
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(images, splits, threshold=0.0)


def test_cv_folds_group_patients_stratify_classes_and_cover_every_image_once():
    from lung_cls.data.split import cv_folds

    rng = np.random.default_rng(3)
    # 30 V/Q pairs, 40 lone perfusion patients, 6 lone ventilation patients
    groups = [f"vq{i}" for i in range(30) for _ in (0, 1)]
    labels = [c for _ in range(30) for c in (1, 0)]
    groups += [f"p{i}" for i in range(40)] + [f"v{i}" for i in range(6)]
    labels += [1] * 40 + [0] * 6
    order = rng.permutation(len(labels))
    groups, labels = np.asarray(groups)[order], np.asarray(labels)[order]
    fold = cv_folds(labels, groups, 5, seed=0)
    assert set(fold.tolist()) == set(range(5))
    for g in np.unique(groups):  # a patient's images share one fold
        assert len(set(fold[groups == g].tolist())) == 1
    for c, n in ((1, 70), (0, 36)):
        per_fold = np.bincount(fold[labels == c], minlength=5)
        assert per_fold.sum() == n and per_fold.max() - per_fold.min() <= 2, (c, per_fold)
    assert np.array_equal(fold, cv_folds(labels, groups, 5, seed=0))  # seeded
    assert not np.array_equal(fold, cv_folds(labels, groups, 5, seed=1))
    with pytest.raises(ValueError, match="at least 2 folds"):
        cv_folds(labels, groups, 1, seed=0)
    with pytest.raises(ValueError, match="only 36 patient"):
        cv_folds(labels, groups, 40, seed=0)
