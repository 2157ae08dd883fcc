"""The image gate (lung_cls.qa.ood) and the radiographer's overlay (lung_cls.qa.overlay): the pure
pieces on plain numbers, then a tiny trained run whose checkpoint carries the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose, tiny_overrides
from organs import write_others
from qa_helpers import read_rows

from lung_cls.qa.ood import (
    REFERENCE_KEY,
    build_reference,
    calibrate,
    fit_space,
    from_stored,
    image_gate,
    space_scores,
    split_of,
    to_json,
    to_storable,
)
from lung_cls.qa.overlay import cam_to_study, side_labels


def test_space_scores_are_about_one_on_the_training_set_and_large_off_it():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(5, 40))
    train = rng.normal(size=(300, 5)) @ basis + 0.1 * rng.normal(size=(300, 40))
    space = fit_space(train)
    inside = space_scores(
        rng.normal(size=(100, 5)) @ basis + 0.1 * rng.normal(size=(100, 40)), space
    )
    outside = space_scores(rng.normal(size=(100, 40)), space)  # off the training subspace
    assert 0.5 < np.median(inside) < 2.0
    assert np.median(outside) > 10 * np.median(inside)


def test_calibration_conformal_quantile_or_max_with_margin():
    v = np.arange(1, 201, dtype=float)  # 200 validation scores
    thr, how = calibrate(v, alpha=0.05)
    assert thr == 191.0 and "conformal" in how  # rank ceil(201 * 0.95) = 191
    thr, how = calibrate(v[:10], alpha=0.01, margin=0.1)
    assert thr == pytest.approx(11.0) and "largest" in how


def test_reference_false_rejection_is_measured_on_validation_and_test():
    rng = np.random.default_rng(1)
    make = lambda n: {"features": rng.normal(size=(n, 8)), "pixels": rng.normal(size=(n, 16))}  # noqa: E731
    ref = build_reference(make(200), make(60), make(60))
    assert ref["val_false_rejection"] == 0.0  # the max-with-margin rule at 60 images
    assert 0.0 <= ref["test_false_rejection"] <= 0.1
    assert set(ref["spaces"]) == {"features", "pixels"}
    # It survives a checkpoint (tensors) and a JSON sidecar (lists) unchanged.
    for stored in (to_storable(ref), to_json(ref)):
        back = from_stored(stored)
        np.testing.assert_allclose(
            back["spaces"]["pixels"]["axes"], ref["spaces"]["pixels"]["axes"], atol=1e-6
        )
        assert back["spaces"]["features"]["threshold"] == pytest.approx(
            float(ref["spaces"]["features"]["threshold"]), rel=1e-6
        )


@pytest.mark.parametrize(
    "prob, seg_ok, ood, expected",
    [
        (0.95, True, 0.5, None),
        (0.95, True, None, None),  # no reference: the segmentation check alone
        (0.95, True, 1.7, ("rejected: not a lung V/Q image (OOD score 1.70 > 1)", "ood")),
        (0.95, False, 0.5, ("review: lungs not found", "segmentation")),
        (0.02, False, 0.5, ("review: lungs not found", "segmentation")),
        (0.5, False, 0.5, ("rejected: not a lung V/Q image (lungs not found, model unsure)",
                           "segmentation")),
        (0.5, False, 3.0, ("rejected: not a lung V/Q image (OOD score 3.00 > 1)", "ood")),
    ],
)  # fmt: skip
def test_image_gate_decision(prob, seg_ok, ood, expected):
    assert image_gate(prob, seg_ok, ood, (0.2, 0.8)) == expected


def test_split_of_by_pixels_or_uid():
    identity = {"train": {"pixel_hashes": {"a"}, "sop_instance_uids": {"1.2"}},
                "val": {"pixel_hashes": {"b"}, "sop_instance_uids": set()}}  # fmt: skip
    assert split_of(identity, "a", None) == "train"
    assert split_of(identity, "zz", "1.2") == "train"
    assert split_of(identity, "b", "9") == "val"
    assert split_of(identity, "zz", "9") is None


def test_cam_goes_back_onto_the_original_study():
    """A CAM peak placed where pre-processing put an original pixel lands back on that pixel,
    through padding (a 40 x 80 study), resizing (to 32) and a shift."""
    info = {"pad": [20, 0], "square": 80, "shift_y": 3.0, "shift_x": -2.0}
    r, c = 10, 50  # original pixel
    s = 32
    y = (r + 20 + 0.5) * s / 80 - 0.5 + 3.0
    x = (c + 0 + 0.5) * s / 80 - 0.5 - 2.0
    yy, xx = np.mgrid[:s, :s]
    cam = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2.0).astype(np.float32)
    back = cam_to_study(cam, info, (40, 80))
    assert back.shape == (40, 80)
    assert np.unravel_index(np.argmax(back), back.shape) == (r, c)


def test_side_labels():
    assert side_labels(["L", "F"], "Anterior projection") == ("R", "L", "ANT")
    assert side_labels(["R", "F"], "Posterior projection") == ("L", "R", "Posterior pr")
    assert side_labels(None, None) == ("R", "L", "ANT")


# ------------------------------------------------------------------------------ a trained run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lung_cls.train import train

    base = tmp_path_factory.mktemp("gate_run")
    cfg = compose(tiny_overrides(base, "seed=0", "cams=false", "trainer.max_epochs=3"))
    train(cfg)
    return base / "run"


@pytest.mark.slow
def test_training_stores_the_reference_and_predict_uses_it(tiny_run, tmp_path):
    from lung_cls.predict import run
    from lung_cls.qa.backends import load_torch_ensemble

    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)[REFERENCE_KEY]
    ref = from_stored(stored)
    assert ref["n_val"] > 0 and 0.0 <= ref["val_false_rejection"] <= 0.05
    assert len(ref["train"]["pixel_hashes"]) == ref["n_train"]  # every training image known
    ens = load_torch_ensemble([ckpt])
    assert ens.has_ood
    truth = write_others(tmp_path / "others")
    from qa_helpers import predict_cfg

    out = tmp_path / "out"
    assert run(predict_cfg(f"ckpt={ckpt}", f"input={tmp_path / 'others'}", f"output={out}")) == 0
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in read_rows(out)}
    assert set(rows) == set(truth)
    for name, t in truth.items():
        kind = rows[name]["status"].split(":", 1)[0]
        assert kind in t["expect"], (name, rows[name]["status"])
        if (
            t["header"] == "lung"
            and kind in ("rejected", "review")
            and rows[name]["gate"] != "header"
        ):
            assert rows[name]["gate"] in ("ood", "segmentation")
            assert rows[name]["ood_score"] != ""
