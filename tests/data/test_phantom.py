"""The built-in V/Q phantom: determinism, cohort facts, ground truth (its CLI: tests/cli)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from lung_cls.data.phantom import (
    FEATURE_KEYS,
    MASK_KEYS,
    cohort_plan,
    default_sim,
    resolve_sim,
    simulate_cohort,
)


@pytest.fixture(scope="module")
def cohort():
    """A small cohort (30 perfusion, 24 ventilation) shared by the read-only checks."""
    return simulate_cohort(None, 30, 24, seed=1)


def _separable(image: np.ndarray) -> bool:
    """The paper's centring criterion: two lung-sized regions at >= 30 after min-max x 255."""
    x = image.astype(np.float32)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6) * 255
    lab, n = ndimage.label(x >= 30)
    if n < 2:
        return False
    sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1]
    return bool(sizes[1] >= 0.25 * sizes[0] and sizes[1] >= 0.005 * x.size)


def test_deterministic_from_seed_and_thread_count():
    a = simulate_cohort(None, 5, 4, seed=3, workers=1)
    b = simulate_cohort(None, 5, 4, seed=3, workers=2)
    assert [c.id for c in a] == [c.id for c in b]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image)
        assert x.params == y.params
        assert all(np.array_equal(x.masks[k], y.masks[k]) for k in MASK_KEYS)
    c = simulate_cohort(None, 5, 4, seed=4)
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c, strict=True))


def test_default_config_is_the_yaml_and_cohort_counts_are_exact():
    sim = default_sim()
    assert sim == resolve_sim(None)
    assert 0.0 <= sim["difficulty"] <= 1.0
    plan = cohort_plan(None, 394, 136, seed=0)
    assert int(plan["v"]["trachea"].sum()) == 111  # the paper: 111 of 136
    assert len(plan["v"]["trachea"]) == 136 and len(plan["q"]["supine"]) == 394
    # oropharynx / esophagus only where the neck shows activity
    assert not (plan["v"]["oropharynx"] & ~plan["v"]["trachea"]).any()
    assert plan["n_paired"] == round(sim["cohort"]["p_paired"] * 136)
    assert plan["n_patients"] == 394 + 136 - plan["n_paired"]
    assert len(set(plan["pids"])) == plan["n_patients"]
    # other seeds: same counts, other images get them
    other = cohort_plan(None, 394, 136, seed=5)
    assert int(other["v"]["trachea"].sum()) == 111
    assert not np.array_equal(other["v"]["trachea"], plan["v"]["trachea"])


def test_cases_follow_the_plan(cohort):
    plan = cohort_plan(None, 30, 24, seed=1)
    vent = [c for c in cohort if c.label == 0]
    perf = [c for c in cohort if c.label == 1]
    assert len(perf) == 30 and len(vent) == 24
    assert sum(c.params["trachea"] for c in vent) == int(plan["v"]["trachea"].sum()) == 20
    assert not any(c.params["trachea"] for c in perf)  # perfusion: residual_aerosol instead
    assert {c.id for c in cohort} == {f"{c.patient_id}_{'Q' if c.label else 'V'}" for c in cohort}


def test_image_dtype_shape_counts_and_json_params(cohort):
    for c in cohort:
        assert c.image.dtype == np.uint16 and c.image.shape == (256, 256)
        assert c.params["counts"] == int(c.image.sum(dtype=np.int64))
        assert c.params["label"] == c.label and c.params["patient_id"] == c.patient_id
        json.dumps(c.params)  # json-able
        assert c.patient_id.startswith("PH") and len(c.patient_id) == 6


def test_masks_present_and_consistent_with_flags(cohort):
    for c in cohort:
        assert tuple(c.masks) == MASK_KEYS
        for k, m in c.masks.items():
            assert m.dtype == bool and m.shape == (256, 256), k
        assert c.masks["lungs"].sum() > 2000 and c.masks["heart"].any()
        assert not (c.masks["lungs"] & c.masks["heart"]).any()
        for k in FEATURE_KEYS:
            if not c.params[k]:
                assert not c.masks[k].any(), (c.id, k)
        if c.params["trachea"]:
            assert c.masks["trachea"].any(), c.id
        if c.params["hotspots"]:
            assert c.masks["hotspots"].any(), c.id
    # the features the tests rely on actually occur in this cohort
    assert any(c.params["trachea"] for c in cohort)
    assert any(c.params["defects"] for c in cohort)


def test_trachea_mask_marks_extra_activity(cohort):
    """Where the truth says 'trachea', the image is brighter than in images without it."""
    with_t = [c for c in cohort if c.label == 0 and c.params["trachea"]]
    for c in with_t:
        m = c.masks["trachea"] & ~c.masks["lungs"]
        ring = ndimage.binary_dilation(m, iterations=6) & ~ndimage.binary_dilation(m, iterations=3)
        ring &= ~c.masks["lungs"]
        assert c.image[m].mean() > c.image[ring].mean(), c.id


def test_offset_is_the_lung_centroid_midpoint(cohort):
    n_checked = 0
    for c in cohort:
        lab, n = ndimage.label(c.masks["lungs"])
        if n != 2:  # touching lungs: one region
            continue
        cents = ndimage.center_of_mass(c.masks["lungs"], lab, [1, 2])
        cy = np.mean([p[0] for p in cents]) - 127.5
        cx = np.mean([p[1] for p in cents]) - 127.5
        assert abs(cy - c.params["offset_y"]) < 1.0 and abs(cx - c.params["offset_x"]) < 1.0
        # and it follows the sampled position of the patient in the field
        assert abs(c.params["offset_x"] - c.params["pose_offset_x_mm"] / c.params["pixel_mm"]) < 6
        n_checked += 1
    assert n_checked >= 0.8 * len(cohort)
    offs = np.array([c.params["offset_x"] for c in cohort])
    assert offs.std() > 3.0  # positions really vary: centring has work to do


def test_no_offset_no_rotation_gives_centred_lungs():
    geometry = {"offset_sd_mm": [0.0, 0.0], "rotation_sd_deg": 0.0}
    sim = {"geometry": {**geometry, "redo_jitter_mm": 0.0, "redo_jitter_deg": 0.0}}
    cases = simulate_cohort(sim, 4, 2, seed=2)
    for c in cases:
        assert c.params["rotation_deg"] == 0.0
        # what is left is anatomy: heart, hemidiaphragms, lung sizes
        assert abs(c.params["offset_x"]) < 4 and abs(c.params["offset_y"]) < 12
    assert np.mean([abs(c.params["offset_y"]) for c in cases]) < 5


def test_count_ranges_overlap_between_classes(cohort):
    perf = [c.params["counts"] for c in cohort if c.label == 1]
    vent = [c.params["counts"] for c in cohort if c.label == 0]
    assert max(vent) > min(perf)  # total counts alone do not separate the classes
    assert np.median(perf) > np.median(vent)


def test_pairing_shares_patient_and_anatomy(cohort):
    by_pid: dict[str, dict[int, object]] = {}
    for c in cohort:
        by_pid.setdefault(c.patient_id, {})[c.label] = c
    pairs = [v for v in by_pid.values() if len(v) == 2]
    assert len(pairs) == round(0.9 * 24)
    for pair in pairs:
        q, v = pair[1], pair[0]
        for key in ("scale", "lungs_width_mm", "lungs_height_mm", "gap_mm", "zoom"):
            assert q.params[key] == v.params[key]
        if q.params["same_day"]:  # same pose on the table
            assert q.params["offset_x"] == v.params["offset_x"]
            assert q.params["shine_through"] != v.params["shine_through"]


def test_thresholding_separates_most_lungs_but_not_all():
    cases = simulate_cohort({"geometry": {"p_touching": 0.1}}, 40, 30, seed=0)
    sep = np.array([_separable(c.image) for c in cases])
    assert sep.mean() >= 0.8
    assert not sep.all()  # the NMI fallback gets exercised
    touching = np.array([c.params["touching"] for c in cases])
    assert touching.any() and sep[touching].mean() < sep[~touching].mean()


def test_difficulty_is_checked_and_changes_images():
    with pytest.raises(ValueError, match="difficulty"):
        simulate_cohort({"difficulty": 1.5}, 1, 1, seed=0)
    easy = simulate_cohort({"difficulty": 0.0}, 2, 2, seed=0)
    hard = simulate_cohort({"difficulty": 1.0}, 2, 2, seed=0)
    fw_e = np.mean([c.params["fwhm_mm"] for c in easy])
    fw_h = np.mean([c.params["fwhm_mm"] for c in hard])
    assert fw_h > fw_e
    cnt_e = np.mean([c.params["counts"] for c in easy])
    cnt_h = np.mean([c.params["counts"] for c in hard])
    assert cnt_h < cnt_e


def test_unknown_sim_key_is_an_error():
    with pytest.raises(ValueError, match="sim.geometry.scal: unknown"):
        simulate_cohort({"geometry": {"scal": [1, 1]}}, 1, 1, seed=0)


def test_omegaconf_sim_is_accepted():
    from omegaconf import OmegaConf

    sim = OmegaConf.create({"difficulty": 0.2, "size": 128})
    cases = simulate_cohort(sim, 1, 1, seed=0)
    assert cases[0].image.shape == (128, 128) and cases[0].params["difficulty"] == 0.2


@pytest.mark.slow
def test_full_default_cohort():
    cases = simulate_cohort(None, 394, 136, seed=0)
    vent = [c for c in cases if c.label == 0]
    assert len(cases) == 530 and len(vent) == 136
    assert sum(c.params["trachea"] for c in vent) == 111
