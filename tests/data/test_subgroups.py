"""data.subgroup (a per-image category from a manifest column or the phantom's truth) and
data.split.stratify (each class's exact counts spread over that column's values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lung_cls.data.preprocess import build_prepared, load_prepared, save_prepared
from lung_cls.data.sources import DataError, load_studies, source_fingerprint
from lung_cls.data.split import (
    check_disjoint,
    cv_folds,
    grouped_split,
    stratified_counts,
    stratified_split,
)
from lung_cls.errors import ConfigError
from tests.conftest import compose, lungs
from tests.data.test_sources import make_folder


def _manifest(tmp_path: Path, column: str, values: list[str]) -> Path:
    """Two perfusion and two ventilation NPY images (make_folder) with one extra column."""
    make_folder(tmp_path / "imgs")
    paths = ["perfusion/p0", "perfusion/p1", "ventilation/v0", "ventilation/v1"]
    labels = ["perfusion", "perfusion", "ventilation", "ventilation"]
    lines = [f"path,label,patient_id,{column}"]
    for i, (p, lab, v) in enumerate(zip(paths, labels, values, strict=True)):
        lines.append(f"imgs/{p}.npy,{lab},P{i},{v}")
    m = tmp_path / "m.csv"
    m.write_text("\n".join(lines) + "\n")
    return m


def _cfg(manifest: Path, **kw) -> dict:
    return {"source": "manifest", "manifest": str(manifest), "subgroup": "neck", **kw}


# ------------------------------------------------------------------------------ reading the column
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["1", "0", "TRUE", "no"], ["yes", "no", "yes", "no"]),  # yes/no-like: read as yes/no
        (["Y", "n", "t", "F"], ["yes", "no", "yes", "no"]),
        (["trachea", "none", "oropharynx", "1"], ["trachea", "none", "oropharynx", "1"]),
    ],
)
def test_manifest_column_is_read_per_image_and_kept_in_the_prepared_data(
    tmp_path, values, expected
):
    m = _manifest(tmp_path, "Neck", values)  # header case does not matter
    studies, errors = load_studies(_cfg(m))
    assert errors == [] and [s.meta["subgroup"] for s in studies] == expected
    data = build_prepared(_cfg(m), {"size": 32})
    assert data.subgroup_column == "neck" and data.subgroups.tolist() == expected
    save_prepared(data, tmp_path / "c.npz")  # the cache keeps them
    again = load_prepared(tmp_path / "c.npz")
    assert again.subgroup_column == "neck" and again.subgroups.tolist() == expected
    # without data.subgroup the column is just ignored
    assert (
        build_prepared({"source": "manifest", "manifest": str(m)}, {"size": 32}).subgroups is None
    )


def test_the_cache_key_follows_the_subgroup_column(tmp_path):
    m = _manifest(tmp_path, "neck", ["1", "0", "1", "0"])
    plain = {"source": "manifest", "manifest": str(m)}
    assert source_fingerprint(plain) != source_fingerprint(_cfg(m))


@pytest.mark.parametrize("bad", ["", "NA", "n/a", "?"])
def test_a_missing_value_is_one_error_naming_file_row_and_column(tmp_path, bad):
    m = _manifest(tmp_path, "neck", ["1", "0", bad, "0"])
    with pytest.raises(DataError) as info:
        load_studies(_cfg(m))
    assert info.value.path == f"{m}:4"  # the header is line 1: the third image is line 4
    assert "row 4, column 'neck'" in info.value.reason and "v0.npy" in info.value.reason
    assert "\n" not in str(info.value)
    # on_error=skip drops that row like any bad row, and says so
    studies, errors = load_studies(_cfg(m, on_error="skip"))
    assert len(studies) == 3 and len(errors) == 1 and "column 'neck'" in str(errors[0])


def test_a_missing_column_or_a_source_without_columns_is_a_clear_error(tmp_path):
    m = _manifest(tmp_path, "site", ["a", "b", "a", "b"])
    with pytest.raises(DataError, match="no column 'neck' \\(data.subgroup; columns: path"):
        load_studies(_cfg(m))
    with pytest.raises(ConfigError, match="folder source has no per-image columns"):
        load_studies({"source": "folder", "root": str(tmp_path / "imgs"), "subgroup": "neck"})
    with pytest.raises(ConfigError, match="phantom's only subgroup is 'neck'"):
        load_studies({"source": "phantom", "subgroup": "site"})
    with pytest.raises(ConfigError, match="data.split.stratify='neck'.*data.subgroup='site'"):
        load_studies(_cfg(m, subgroup="site", split={"stratify": "neck"}))
    # stratify alone reads its column as the subgroup
    studies, _ = load_studies(
        {"source": "manifest", "manifest": str(m), "split": {"stratify": "site"}}
    )
    assert [s.meta["subgroup"] for s in studies] == ["a", "b", "a", "b"]


# ------------------------------------------------------------------------------ stratified split
def _cohort() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60 perfusion (12 with a ventilation partner: V/Q pairs) and 30 ventilation images;
    ventilation: 20 with neck activity, 10 without; perfusion: 45 'no', 15 'yes'."""
    labels = np.array([1] * 60 + [0] * 30)
    groups = np.array([f"p{i}" for i in range(60)] + [f"p{i}" for i in range(12)] +
                      [f"v{i}" for i in range(18)])  # fmt: skip
    strata = np.array(["no"] * 45 + ["yes"] * 15 + ["yes", "no"] * 10 + ["yes"] * 10)
    return labels, groups, strata


def _share(labels, strata, splits, split, c, v) -> int:
    return int(((splits == split) & (labels == c) & (strata == v)).sum())


def test_stratified_split_gives_each_subgroup_its_share_and_keeps_the_counts():
    labels, groups, strata = _cohort()
    counts = {1: (40, 8, 8), 0: (14, 6, 6)}  # 4 perfusion images stay unused
    # ventilation: 20/30 yes -> 4 of 6 in val and in test; perfusion: 15/60 yes -> 2 of 8
    want = {
        (0, "yes"): (14 * 20 // 30, 4, 4),
        (0, "no"): (14 - 14 * 20 // 30, 2, 2),
        (1, "no"): (30, 6, 6),
        (1, "yes"): (10, 2, 2),
    }
    assert stratified_counts(labels, strata, counts) == want
    plain_off = 0
    for seed in range(8):
        sp = stratified_split(labels, groups, strata, counts, seed, "neck")
        for (c, v), (n_train, n_val, n_test) in want.items():
            assert _share(labels, strata, sp, "val", c, v) == n_val
            assert _share(labels, strata, sp, "test", c, v) == n_test
            assert _share(labels, strata, sp, "train", c, v) == n_train
        for c, req in counts.items():
            assert (
                tuple(int(((sp == s) & (labels == c)).sum()) for s in ("train", "val", "test"))
                == req
            )
        check_disjoint(sp, groups)
        plain = grouped_split(labels, groups, counts, seed)
        plain_off += any(_share(labels, strata, plain, s, 0, "yes") != 4 for s in ("val", "test"))
    assert plain_off > 0  # unstratified, the neck share in val/test drifts with the seed


def test_an_impossible_stratified_request_names_the_column_and_the_class():
    # perfusion: a, b 'yes' alone; c, d 'no', each with a ventilation partner. Validation asks
    # for 2 perfusion and no ventilation: by class alone a + b do; stratified it needs one 'no',
    # which cannot come without its ventilation partner.
    labels = np.array([1, 1, 1, 1, 0, 0])
    groups = np.array(["a", "b", "c", "d", "c", "d"])
    strata = np.array(["yes", "yes", "no", "no", "no", "no"])
    counts = {1: (0, 2, 0), 0: (0, 0, 0)}
    assert sorted(groups[grouped_split(labels, groups, counts, 0) == "val"]) == ["a", "b"]
    with pytest.raises(ValueError) as info:
        stratified_split(labels, groups, strata, counts, 0, "neck")
    msg = str(info.value)
    assert msg.startswith("stratified by 'neck': ") and "\n" not in msg, msg
    assert "1 perfusion with neck=no" in msg and "whole patients" in msg, msg


def test_stratified_cv_folds_balance_each_subgroup():
    labels, groups, strata = _cohort()
    fold_of = cv_folds(labels, groups, 3, 0, strata=strata)
    for c, v, n in ((0, "yes", 20), (0, "no", 10), (1, "yes", 15)):
        per_fold = [int(((fold_of == f) & (labels == c) & (strata == v)).sum()) for f in range(3)]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 2, (c, v, per_fold)
    check_disjoint(fold_of.astype(str), groups)
    assert np.array_equal(cv_folds(labels, groups, 3, 0), cv_folds(labels, groups, 3, 0, None))


# ------------------------------------------------------------------------------ through the datamodule
@pytest.fixture
def manifest_cohort(tmp_path) -> Path:
    """16 perfusion and 12 ventilation PNG-free NPY images at 64 px, one patient each, and a
    'site' column: ventilation 8 A + 4 B, perfusion 12 A + 4 B."""
    rng = np.random.default_rng(0)
    lines = ["path,label,patient_id,site"]
    for i in range(28):
        label = "perfusion" if i < 16 else "ventilation"
        site = "B" if i in (0, 1, 2, 3, 16, 17, 18, 19) else "A"
        img = lungs(64, off=(rng.uniform(-3, 3), rng.uniform(-3, 3)), rng=rng)
        np.save(tmp_path / f"im{i}.npy", img)
        lines.append(f"im{i}.npy,{label},P{i},{site}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def _dm(tmp_path: Path, manifest: Path, *extra: str):
    from lung_cls.data.datamodule import LungScanDataModule

    cfg = compose(["data=manifest", f"data.manifest={manifest}", "data.preprocess.size=32",
                   "data.split.perfusion=[8,4,4]", "data.split.ventilation=[4,4,4]",
                   "data.leakage=warn", *extra])  # fmt: skip
    dm = LungScanDataModule(cfg.data, cache_dir=str(tmp_path / "cache"), seed=0)
    dm.setup("fit")
    return dm


def test_datamodule_stratifies_by_the_manifest_column(tmp_path, manifest_cohort):
    dm = _dm(tmp_path, manifest_cohort, "data.subgroup=site", "data.split.stratify=site")
    info = dm.summary["subgroup"]
    assert info["column"] == "site" and info["stratify"] is True
    # ventilation 8 A / 4 B over val 4 -> 3 A + 1 B (2.67/1.33); perfusion 12/4 over 4 -> 3 + 1
    for split in ("val", "test"):
        assert info["by_split"][split] == {
            "ventilation": {"A": 3, "B": 1},
            "perfusion": {"A": 3, "B": 1},
        }
    assert dm.subgroups.tolist() == list(np.asarray(dm.prepared.subgroups))

    cv = _dm(tmp_path, manifest_cohort, "data.split.stratify=site", "data.split.folds=3")
    test = cv.summary["subgroup"]["by_split"]["test"]
    assert test["ventilation"]["B"] in (1, 2) and test["perfusion"]["B"] in (1, 2)


def test_unstratified_the_same_cohort_drifts(tmp_path, manifest_cohort):
    """The fixture above is one where stratifying matters: by class alone (same seed) validation
    draws 2 A + 2 B ventilation and 4 A + 0 B perfusion images."""
    dm = _dm(tmp_path, manifest_cohort, "data.subgroup=site")
    info = dm.summary["subgroup"]
    assert info["stratify"] is False
    assert info["by_split"]["val"] != {
        "ventilation": {"A": 3, "B": 1},
        "perfusion": {"A": 3, "B": 1},
    }


def test_phantom_neck_truth_is_the_subgroup_and_stratifies(tmp_path):
    from lung_cls.data.datamodule import LungScanDataModule
    from tests.conftest import tiny_overrides

    cfg = compose(tiny_overrides(tmp_path, "data.split.stratify=neck"))
    dm = LungScanDataModule(cfg.data, cache_dir=str(tmp_path / "cache"), seed=0)
    dm.setup("fit")
    data = dm.prepared
    neck = np.asarray(data.masks["trachea"]).reshape(len(data.labels), -1).any(axis=1)
    assert data.subgroup_column == "neck"
    assert data.subgroups.tolist() == np.where(neck, "yes", "no").tolist()
    labels = np.asarray(data.labels)
    assert set(data.subgroups[labels == 1]) == {"no"}  # perfusion shows no trachea
    counts = dm.summary["counts"]
    wanted = {1: tuple(counts["perfusion"]), 0: tuple(counts["ventilation"])}
    want = stratified_counts(labels, data.subgroups, wanted)
    assert want[(0, "yes")][1] > 0 and want[(0, "no")][1] > 0  # both in validation
    by_split = dm.summary["subgroup"]["by_split"]
    for (c, v), (_, n_val, n_test) in want.items():
        name = "perfusion" if c == 1 else "ventilation"
        assert (by_split["val"][name][v], by_split["test"][name][v]) == (n_val, n_test)
