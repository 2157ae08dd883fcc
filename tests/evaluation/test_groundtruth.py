"""lung_cls.evaluation.groundtruth on CAMs built so that the right answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lung_cls.evaluation.groundtruth import (
    cam_energy_fraction,
    chance_level,
    masks_from_npz,
    pointing_game,
    score_cams,
)

H = W = 16


def _box(y0: int, y1: int, x0: int, x1: int, n: int = 1) -> np.ndarray:
    m = np.zeros((n, H, W), bool)
    m[:, y0:y1, x0:x1] = True
    return m


def test_cam_inside_mask_scores_one() -> None:
    mask = _box(2, 6, 3, 9)
    cam = np.where(mask, 0.7, 0.0)
    cam[0, 4, 5] = 1.0
    assert cam_energy_fraction(cam, mask)[0] == pytest.approx(1.0)
    assert pointing_game(cam, mask).tolist() == [1.0]


def test_uniform_cam_scores_area_fraction() -> None:
    mask = _box(0, 4, 0, 8)  # 32 of 256 pixels
    cam = np.full((1, H, W), 0.3)
    assert chance_level(mask)[0] == pytest.approx(32 / 256)
    assert cam_energy_fraction(cam, mask)[0] == pytest.approx(32 / 256)
    # flat CAM: every pixel is a peak, so the pointing score is the chance level too
    assert pointing_game(cam, mask)[0] == pytest.approx(32 / 256)


def test_cam_outside_mask_misses_and_tolerance_rescues() -> None:
    mask = _box(2, 5, 2, 5)
    cam = np.zeros((1, H, W))
    cam[0, 7, 3] = 1.0  # 3 rows below the mask's last row (4)
    cam[0, 6, 3] = 0.2
    assert cam_energy_fraction(cam, mask)[0] == 0.0
    assert pointing_game(cam, mask).tolist() == [0.0]
    assert pointing_game(cam, mask, tolerance_px=2).tolist() == [0.0]
    assert pointing_game(cam, mask, tolerance_px=3).tolist() == [1.0]
    assert chance_level(mask, tolerance_px=3)[0] > chance_level(mask)[0]


def test_tied_peaks_count_fractionally() -> None:
    mask = _box(0, 8, 0, 16)
    cam = np.zeros((1, H, W))
    cam[0, 1, 1] = 1.0  # inside
    cam[0, 12, 1] = 1.0  # outside
    assert pointing_game(cam, mask)[0] == pytest.approx(0.5)


def test_empty_mask_and_zero_cam_are_nan() -> None:
    masks = np.concatenate([_box(0, 0, 0, 0), _box(1, 3, 1, 3)])
    cams = np.stack([np.ones((H, W)), np.zeros((H, W))])
    e = cam_energy_fraction(cams, masks)
    assert math.isnan(e[0]) and math.isnan(e[1])
    g = pointing_game(cams, masks)
    assert math.isnan(g[0]) and not math.isnan(g[1])
    assert math.isnan(chance_level(masks)[0])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        cam_energy_fraction(-np.ones((1, H, W)), _box(0, 2, 0, 2))
    with pytest.raises(ValueError, match="does not match"):
        cam_energy_fraction(np.ones((1, H, W)), np.ones((1, H, W + 1), bool))
    with pytest.raises(ValueError, match="boolean"):
        pointing_game(np.ones((1, H, W)), np.full((1, H, W), 2))


def test_score_cams_per_class() -> None:
    n = 4
    labels = np.array([0, 0, 1, 1])
    trachea = _box(0, 4, 7, 9, n)
    trachea[1] = False  # second ventilation image: no neck activity drawn
    heart = _box(10, 14, 9, 13, n)
    lungs = _box(5, 15, 2, 14, n)
    cams = np.zeros((n, H, W), np.float16)
    cams[0][trachea[0]] = 1.0  # looks only at the trachea
    cams[1] = 0.5
    cams[2][heart[2]] = 1.0  # perfusion CAMs on the heart (inside the lungs box)
    cams[3] = 1.0  # a flat map
    fmap = {0: ["trachea", "hotspots"], 1: ["heart", "lungs"]}
    out = score_cams(cams, labels, {"trachea": trachea, "heart": heart, "lungs": lungs}, fmap)

    vent = out["ventilation"]
    assert vent["label"] == 0 and vent["targets"] == ["trachea"] and vent["missing"] == ["hotspots"]
    assert vent["n_images"] == 2 and vent["n_with_target"] == 1
    assert vent["energy_share"] == pytest.approx(1.0)
    assert vent["chance_share"] == pytest.approx(8 / 256)
    assert vent["pointing_hit_rate"] == 1.0

    perf = out["perfusion"]
    union_area = lungs[0].mean()  # heart box lies inside the lungs box
    assert perf["n_with_target"] == 2
    assert perf["chance_share"] == pytest.approx(union_area)
    assert perf["energy_share"] == pytest.approx((1.0 + union_area) / 2)
    assert perf["pointing_hit_rate"] == pytest.approx((1.0 + union_area) / 2)
    heart_only = perf["per_feature"]["heart"]
    assert heart_only["energy_share"] == pytest.approx((1.0 + 16 / 256) / 2)
    assert heart_only["chance_share"] == pytest.approx(16 / 256)


def test_score_cams_defaults_and_missing_everything() -> None:
    cams = np.ones((2, H, W))
    out = score_cams(cams, [0, 1], {"trachea": _box(0, 2, 0, 2, 2)})
    assert set(out) == {"ventilation", "perfusion"}
    assert out["ventilation"]["targets"] == ["trachea"]
    assert out["perfusion"]["targets"] == [] and math.isnan(out["perfusion"]["energy_share"])
    with pytest.raises(ValueError, match="labels"):
        score_cams(cams, [0, 1, 1], {})


def test_masks_from_npz() -> None:
    arrays = {"cams": np.zeros((1, 2, 2)), "mask_heart": np.array([[[1, 0], [0, 0]]], np.uint8)}
    out = masks_from_npz(arrays)
    assert list(out) == ["heart"] and out["heart"].dtype == bool and out["heart"].sum() == 1
