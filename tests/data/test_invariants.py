"""The study's invariants that a silent change would turn into a different result (issue 13).

Each test here kills a named mutation (docs/statistics.md lists them): the split each loader
serves, that no validation or test image or patient reaches a training batch, and that the lung
binarisation uses ``>=`` the configured threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose, tiny_overrides


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory):
    from lung_cls.data.datamodule import LungScanDataModule

    tmp = tmp_path_factory.mktemp("inv")
    cfg = compose(tiny_overrides(tmp / "x"))
    dm = LungScanDataModule(cfg.data, cache_dir=str(tmp / "cache"), seed=0)
    dm.setup("fit")
    return dm


def _served(loader) -> list[int]:
    return [int(i) for _, _, idx in loader for i in idx.tolist()]


def test_validation_loader_serves_exactly_the_validation_split(datamodule) -> None:
    """Checkpoint selection (val/acc) sees validation images only: never the test split."""
    dm = datamodule
    val = _served(dm.val_dataloader())
    assert sorted(val) == dm.split_indices("val").tolist()
    assert not set(val) & set(dm.split_indices("test").tolist())
    assert sorted(_served(dm.test_dataloader())) == dm.split_indices("test").tolist()


def test_no_validation_or_test_image_or_patient_reaches_a_training_batch(datamodule) -> None:
    dm = datamodule
    served = set()
    for epoch in range(3):
        dm._epoch = lambda e=epoch: e  # noqa: SLF001 - the loader asks for the epoch
        served |= set(_served(dm.train_dataloader()))
    train = set(dm.split_indices("train").tolist())
    assert served <= train
    assert len(served) >= 0.9 * len(train)  # the loader really served the training set
    patients = np.asarray(dm.prepared.patient_ids)
    held_out = set(patients[dm.split_indices("val")]) | set(patients[dm.split_indices("test")])
    assert not {patients[i] for i in served} & held_out
    assert set(np.unique(dm.train_indices).tolist()) == train


def test_lung_binarisation_uses_at_least_the_configured_threshold() -> None:
    """Pixels exactly at the threshold are lung (``>=``), and the configured value is used."""
    from lung_cls.data.preprocess import detect_lungs

    img = np.zeros((64, 64), np.float32)
    img[16:48, 10:24] = 30.0  # left lung exactly at the default threshold
    img[16:48, 40:54] = 30.0
    found = detect_lungs(img, {"threshold": 30.0})
    assert found["ok"], found["reason"]
    assert found["binary"].sum() == 2 * 32 * 14
    higher = detect_lungs(img * 2, {"threshold": 60.0})
    assert higher["ok"] and higher["binary"].sum() == 2 * 32 * 14
    assert not detect_lungs(img, {"threshold": 30.5})["ok"]  # just above: nothing left
    assert detect_lungs(img * 0.5, {"threshold": 15.0})["ok"]  # a lower configured threshold
    assert detect_lungs(img * 1.5, {"threshold": 50.0})["binary"].sum() == 0  # 45 < 50


def test_a_near_copy_across_splits_is_leakage(datamodule, caplog) -> None:
    """A training image one grey level brighter in the test split is caught (bytes differ)."""
    import logging

    from lung_cls.errors import DataSetupError

    dm = datamodule
    images = dm.prepared.images.copy()
    i, j = int(dm.split_indices("train")[0]), int(dm.split_indices("test")[0])
    images[j] = np.clip(images[i].astype(int) + 1, 0, 255).astype(np.uint8)
    with pytest.raises(
        DataSetupError, match=r"1 pair\(s\) of near-identical images.*r=(1\.0|0\.99)"
    ):
        dm._check_leakage(images, dm.splits)  # noqa: SLF001
    assert dm.summary["near_duplicate_pairs_across_splits"] == 1
    dm.cfg.leakage = "warn"
    try:
        with caplog.at_level(logging.WARNING, logger="lung_cls.data.datamodule"):
            dm._check_leakage(images, dm.splits)  # noqa: SLF001
    finally:
        dm.cfg.leakage = "error"
    assert any("near-identical" in r.getMessage() for r in caplog.records)
    dm._check_leakage(dm.prepared.images, dm.splits)  # noqa: SLF001 - the real data: clean
    assert dm.summary["near_duplicate_pairs_across_splits"] == 0


def test_cross_validation_folds_test_every_image_once(tmp_path_factory) -> None:
    """data.split.folds=5: over fold=0..4 each image is tested exactly once, validation and
    training come from the other folds, and no patient straddles two splits in any fold."""
    from lung_cls.data.datamodule import LungScanDataModule
    from lung_cls.errors import DataSetupError

    tmp = tmp_path_factory.mktemp("cv")
    tested = []
    for fold in range(5):
        cfg = compose(tiny_overrides(tmp / "x", "data.split.folds=5", f"data.split.fold={fold}"))
        dm = LungScanDataModule(cfg.data, cache_dir=str(tmp / "cache"), seed=0)
        dm.setup("fit")
        test = dm.split_indices("test")
        tested.extend(test.tolist())
        patients = np.asarray(dm.prepared.patient_ids)
        for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
            assert not set(patients[dm.split_indices(a)]) & set(patients[dm.split_indices(b)])
        assert len(dm.split_indices("val")) > 0 and (dm.splits == "unused").sum() == 0
        labels = np.asarray(dm.prepared.labels)
        assert set(labels[test].tolist()) == {0, 1}  # stratified: both classes in every fold
        assert dm.summary["cv"] == {"folds": 5, "fold": fold}
    n = len(dm.prepared.labels)
    assert sorted(tested) == list(range(n))
    bad = compose(tiny_overrides(tmp / "x", "data.split.folds=5", "data.split.fold=5"))
    with pytest.raises(DataSetupError, match=r"data.split.fold must be an integer in 0..4"):
        LungScanDataModule(bad.data, cache_dir=str(tmp / "cache"), seed=0).setup("fit")


def test_nmi_fallback_is_aligned_to_training_images_only(monkeypatch) -> None:
    """The reference of the NMI fallback is the mean of the centred *training* images: a test
    image, however bright, does not enter it; the fallback image is re-aligned from its stored
    unshifted copy, and its truth mask moves with it."""
    import lung_cls.data.preprocess as prep
    from lung_cls.data.datamodule import LungScanDataModule
    from lung_cls.data.preprocess import PreparedData

    cfg = compose(tiny_overrides(Path("/nonexistent")))
    dm = LungScanDataModule(cfg.data, cache_dir=None, seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, size=(5, 32, 32), dtype=np.uint8)
    images[3] = 255  # a test image that would dominate a cohort mean
    moving = np.zeros((32, 32), np.float32)
    moving[10:20, 10:20] = 200.0
    info = [{"method": "centroid", "shift_y": 0.0, "shift_x": 0.0} for _ in range(5)]
    info[4] = {"method": "nmi", "shift_y": 0.0, "shift_x": 0.0}
    mask = np.zeros((5, 32, 32), bool)
    mask[4, 10:20, 10:20] = True
    dm.prepared = PreparedData(
        images=images, labels=np.array([1, 0, 1, 0, 1]), patient_ids=np.array(list("abcde")),
        ids=np.array(list("abcde")), paths=np.array(list("abcde")), info=info,
        masks={"lungs": mask}, nmi_moving={4: moving},
    )  # fmt: skip
    seen = {}

    def fake_search(img, reference, c, rng):
        seen["reference"] = np.array(reference)
        return 2.0, -3.0, 1.5, 1.2

    monkeypatch.setattr(prep, "nmi_search", fake_search)
    splits = np.array(["train", "train", "val", "test", "train"])
    record = dm._align_fallback_to_training(splits)  # noqa: SLF001
    np.testing.assert_allclose(seen["reference"], images[[0, 1]].astype(np.float32).mean(axis=0))
    assert record == {"source": "train", "n_images": 2, "n_aligned": 1}
    assert dm.prepared.info[4]["shift_y"] == 2.0 and dm.prepared.info[4]["shift_x"] == -3.0
    expected = np.zeros((32, 32), np.uint8)
    expected[12:22, 7:17] = 200
    assert np.array_equal(dm.prepared.images[4], expected)
    assert np.array_equal(dm.prepared.masks["lungs"][4], expected > 0)
    dm.cfg.nmi_reference = "cohort"  # the earlier, transductive behaviour on request
    assert dm._align_fallback_to_training(splits)["source"].startswith("cohort")  # noqa: SLF001
