"""Bit-packed truth masks: exact round trip, shared empties, and the phantom path that uses them."""

from __future__ import annotations

import numpy as np
import pytest

from lung_cls.data.masks import PackedMasks
from lung_cls.data.preprocess import build_prepared, transform_masks


def _masks(rng, shape=(20, 37)):
    return {
        "a": rng.random(shape) > 0.5,
        "b": np.zeros(shape, bool),
        "c": rng.random(shape) > 0.9,
        "d": np.zeros(shape, bool),
    }


def test_pack_round_trip_is_exact_for_widths_not_a_multiple_of_8():
    rng = np.random.default_rng(0)
    masks = _masks(rng)
    pm = PackedMasks.pack(masks)
    assert list(pm) == list(masks) and len(pm) == 4
    for name, m in masks.items():
        got = pm[name]
        assert got.dtype == bool and got.shape == m.shape
        np.testing.assert_array_equal(got, m)
    assert pm.get("missing") is None and "a" in pm


def test_empty_masks_share_one_packed_array_and_cost_an_eighth():
    rng = np.random.default_rng(1)
    pm = PackedMasks.pack(_masks(rng, (256, 256)))
    other = PackedMasks.pack({"x": np.zeros((256, 256), bool)})
    assert pm.packed("b") is pm.packed("d") is other.packed("x")
    # two non-empty masks (8 KiB each packed) + one shared empty, against 4 x 64 KiB as bool
    assert pm.nbytes == 3 * 256 * 32
    assert not pm.packed("b").flags.writeable


def test_keep_unpacked_controls_whether_reads_are_held():
    m = {"a": np.eye(9, dtype=bool)}
    fresh = PackedMasks.pack(m)  # default for per-case masks: nothing held after a read
    assert fresh["a"] is not fresh["a"] and fresh.nbytes == 9 * 2
    held = PackedMasks.pack(m, keep_unpacked=True)
    assert held["a"] is held["a"] and held.nbytes == 9 * 2 + 81


def test_masks_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="'b': shape"):
        PackedMasks.pack({"a": np.zeros((4, 4), bool), "b": np.zeros((4, 5), bool)})


def test_phantom_source_masks_are_packed_and_equal_the_simulator_s():
    from lung_cls.data.phantom import simulate_cohort
    from lung_cls.data.sources import load_studies

    small_cohort = simulate_cohort(None, 2, 2, 3)

    studies, _ = load_studies(
        {"source": "phantom", "n_perfusion": 2, "n_ventilation": 2, "phantom_seed": 3}
    )
    for s, c in zip(studies, small_cohort, strict=True):
        assert isinstance(s.truth["masks"], PackedMasks)
        assert list(s.truth["masks"]) == list(c.masks)
        for name, m in c.masks.items():
            np.testing.assert_array_equal(s.truth["masks"][name], m)
        assert s.pixels.dtype == np.uint16  # the simulated counts themselves, no float copy
        np.testing.assert_array_equal(s.pixels, c.image)
    # what the source holds against the simulator's bool masks (each distinct array once)
    held = {
        id(a): a.nbytes for s in studies for a in map(s.truth["masks"].packed, s.truth["masks"])
    }
    as_bool = {id(m): m.nbytes for c in small_cohort for m in c.masks.values()}
    assert 7 * sum(held.values()) < sum(as_bool.values())


def test_prepared_masks_are_chunk_independent():
    """More studies than one chunk (64): the moved, packed masks equal moving the whole stack."""
    from lung_cls.data.phantom import simulate_cohort

    cfg = {"source": "phantom", "n_perfusion": 50, "n_ventilation": 20, "phantom_seed": 5,
           "preprocess": {"size": 40}}  # fmt: skip
    data = build_prepared(cfg, cfg["preprocess"])
    cases = simulate_cohort(None, 50, 20, 5)
    for name in ("lungs", "trachea", "shine_through"):
        whole = transform_masks(np.stack([c.masks[name] for c in cases]), data.info, 40)
        assert whole.any()
        np.testing.assert_array_equal(data.masks[name], whole)
