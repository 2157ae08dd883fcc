"""The paper's pre-processing: geometry, centring, the NMI fallback, masks and the cache
(the preprocess command: tests/cli/test_preprocess_cli.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import scipy.ndimage as ndi
from conftest import CONF, lungs

import lung_cls.data.preprocess as P
import lung_cls.data.sources as S
from lung_cls.data.preprocess import (
    PREP_DEFAULTS,
    detect_lungs,
    nmi,
    nmi_search,
    prep_config,
    prepare_dataset,
    preprocess_set,
    transform_mask,
    transform_masks,
    translate,
)

SCALE = 224 / 256


def shifts(infos):
    return np.array([[i["shift_y"], i["shift_x"]] for i in infos])


# ------------------------------------------------------------------------------------------ pure parts
def test_prep_config_defaults_and_typos():
    c = prep_config(None)
    assert c["size"] == 224 and c["threshold"] == 30
    assert prep_config({"size": 128})["size"] == 128
    with pytest.raises(ValueError, match="unknown pre-processing option 'treshold'"):
        prep_config({"treshold": 20})


def test_translate_integer_exact_and_subpixel():
    img = np.arange(36, dtype=np.float32).reshape(6, 6) + 1
    out = translate(img, 2, -1)
    np.testing.assert_array_equal(out[2:, :5], img[:4, 1:])
    assert (out[:2] == 0).all() and (out[:, 5] == 0).all()  # zero fill
    half = translate(img, 0.0, 0.5)
    np.testing.assert_allclose(half[:, 1:], (img[:, 1:] + img[:, :-1]) / 2)
    np.testing.assert_array_equal(translate(img, 0.4, 0.6, subpixel=False), translate(img, 0, 1))


def test_nmi_values():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64)).astype(np.float32)
    b = rng.integers(0, 256, (64, 64)).astype(np.float32)
    assert nmi(a, a) == pytest.approx(2.0)
    assert nmi(a, 255 - a) == pytest.approx(2.0)  # a relabeling of the bins
    assert 1.0 <= nmi(a, b) < 1.1
    with pytest.raises(ValueError):
        nmi(a, b[:10])


def test_minmax_rejects_constant():
    with pytest.raises(ValueError, match="constant"):
        P.minmax_255(np.ones((2, 8, 8), np.float32))


def test_output_type_and_range():
    imgs = [lungs(rng=np.random.default_rng(i)) for i in range(3)]
    out, infos = preprocess_set(imgs)
    assert out.dtype == np.uint8 and out.shape == (3, 224, 224)
    assert out.max() >= 250 and out.min() == 0
    assert all(i["method"] == "centroid" and i["size"] == 224 for i in infos)
    json.dumps(infos)  # records are json-able


# ------------------------------------------------------------------------------------------ centring
def test_centroid_recovers_known_offsets():
    rng = np.random.default_rng(1)
    offs = rng.uniform(-25, 25, size=(12, 2))
    out, infos = preprocess_set([lungs(off=o, rng=rng) for o in offs])
    assert all(i["method"] == "centroid" for i in infos)
    np.testing.assert_allclose(shifts(infos), -offs * SCALE, atol=0.5)
    # after centring, the lung midpoint found again is on the centre
    for img in out:
        det = detect_lungs(img.astype(np.float32))
        np.testing.assert_allclose(det["midpoint"], [111.5, 111.5], atol=0.6)


def test_integer_mode_and_other_sizes():
    off = (10.3, -7.6)
    out, infos = preprocess_set([lungs(off=off)], {"subpixel": False, "size": 128})
    sy, sx = shifts(infos)[0]
    assert sy == round(sy) and sx == round(sx)
    assert abs(sy + off[0] * 128 / 256) <= 1.0 and abs(sx + off[1] * 128 / 256) <= 1.0
    assert out.shape == (1, 128, 128)


def test_non_square_is_padded_then_resized():
    img = lungs(off=(0, 0), shape=(256, 320))
    out, infos = preprocess_set([img, lungs()])
    info = infos[0]
    assert info["pad"] == [32, 0] and info["square"] == 320 and info["orig_shape"] == [256, 320]
    assert out.shape == (2, 224, 224)
    # lungs were centred in the original, so only a tiny shift is needed after square padding
    assert np.abs(shifts(infos)[0]).max() < 1.0
    mask = img > 300
    moved = transform_mask(mask, info, 224)
    assert moved.shape == (224, 224) and moved.dtype == bool
    assert abs(moved.sum() - mask.sum() * (224 / 320) ** 2) / moved.sum() < 0.05


def test_implausible_regions_fall_back():
    img = lungs()
    norm = P.minmax_255(P.resize_batch(img[None], 224))[0]
    assert detect_lungs(norm)["ok"]
    bridged = P.minmax_255(P.resize_batch(lungs(bridge=True)[None], 224))[0]
    det = detect_lungs(bridged)
    assert not det["ok"] and "not separable" in det["reason"]
    far = P.minmax_255(P.resize_batch(lungs(off=(0, 50))[None], 224))[0]
    det = detect_lungs(far, {"max_midpoint_offset_frac": 0.1})
    assert not det["ok"] and "from the centre" in det["reason"]


def test_nmi_fallback_recovers_shift_of_touching_lungs():
    rng = np.random.default_rng(2)
    centred = [lungs(off=o, rng=rng) for o in rng.uniform(-15, 15, size=(12, 2))]
    offs = np.array([[12.0, -20.0], [-18.0, 9.0], [5.0, 16.0]])
    touching = [lungs(off=o, rng=rng, bridge=True) for o in offs]
    out, infos = preprocess_set(centred + touching)
    fb = infos[12:]
    assert [i["method"] for i in fb] == ["nmi"] * 3
    assert all(i["reason"] for i in fb)
    np.testing.assert_allclose(shifts(fb), -offs * SCALE, atol=1.5)
    assert all(i["nmi"] >= i["nmi_unshifted"] for i in fb)


def test_nmi_search_is_seeded_and_reference_is_used():
    ref = P.minmax_255(P.resize_batch(lungs(noise=False)[None], 224))[0]
    moving = P.minmax_255(P.resize_batch(lungs(off=(8, -12), bridge=True)[None], 224))[0]
    a = nmi_search(moving, ref, None, np.random.default_rng(0))
    b = nmi_search(moving, ref, None, np.random.default_rng(0))
    assert a == b
    assert abs(a[0] + 8 * SCALE) < 1.5 and abs(a[1] - 12 * SCALE) < 1.5
    # a single image that cannot be centred by centroids: the given reference, else "none"
    _, infos = preprocess_set([lungs(off=(8, -12), bridge=True)], reference=ref)
    assert infos[0]["method"] == "nmi"
    assert abs(infos[0]["shift_x"] - 12 * SCALE) < 1.5
    _, infos = preprocess_set([lungs(off=(8, -12), bridge=True)])
    assert infos[0]["method"] == "none" and infos[0]["shift_x"] == 0.0


def test_transform_mask_follows_the_image():
    rng = np.random.default_rng(4)
    offs = rng.uniform(-20, 20, size=(4, 2))
    imgs = [lungs(off=o, rng=rng) for o in offs]
    _, infos = preprocess_set(imgs)
    masks = np.stack([lungs(off=o, noise=False) > 400 for o in offs])
    moved = transform_masks(masks, infos, 224)
    for m in moved:  # the midpoint of the two moved lung masks' centroids is on the centre
        labels, n = ndi.label(m)
        assert n == 2
        mid = np.mean(ndi.center_of_mass(m, labels, [1, 2]), axis=0)
        np.testing.assert_allclose(mid, [111.5, 111.5], atol=1.0)
    np.testing.assert_array_equal(transform_mask(masks[1], infos[1], 224), moved[1])
    empty = transform_masks(np.zeros((2, 256, 256), bool), infos[:2], 224)
    assert empty.shape == (2, 224, 224) and not empty.any()


def test_speed_small_set():
    imgs = [lungs(rng=np.random.default_rng(i)) for i in range(40)]
    t = time.perf_counter()
    preprocess_set(imgs)
    assert time.perf_counter() - t < 5.0  # ~0.15 s here; generous for a loaded CI machine


# ------------------------------------------------------------------------------------------ phantom
@pytest.fixture(scope="module")
def cohort():
    phantom = pytest.importorskip("lung_cls.data.phantom")
    return phantom.simulate_cohort(None, 10, 6, 5)


def test_phantom_lung_masks_give_the_known_offsets(cohort):
    """The centring geometry agrees with the phantom's truth: on its lung masks (exact lungs) the
    recovered shift is minus the known lung-midpoint offset, scaled 256 -> 224, within 1 px."""
    imgs = [c.masks["lungs"].astype(np.float32) * 1000 for c in cohort]
    _, infos = preprocess_set(imgs)
    ok = [i for i, info in enumerate(infos) if info["method"] == "centroid"]
    assert len(ok) >= len(cohort) - 2  # only touching lungs may fall back
    off = np.array([[c.params["offset_y"], c.params["offset_x"]] for c in cohort])
    np.testing.assert_allclose(shifts(infos)[ok], -off[ok] * SCALE, atol=1.0)


def test_phantom_images_known_translations(cohort):
    """Moving a phantom image by a known amount changes the recovered shift by exactly that."""
    base = [c.image.astype(np.float32) for c in cohort[:6]]
    moves = [(9, -14), (-12, 7), (5, 11), (-7, -9), (13, 3), (-4, 15)]
    moved = [translate(b, dy, dx, subpixel=False) for b, (dy, dx) in zip(base, moves, strict=True)]
    _, i0 = preprocess_set(base)
    _, i1 = preprocess_set(moved)
    both = [k for k in range(6) if i0[k]["method"] == i1[k]["method"] == "centroid"]
    assert len(both) >= 4
    diff = shifts(i1)[both] - shifts(i0)[both]
    np.testing.assert_allclose(diff, -np.array(moves)[both] * SCALE, atol=1.0)


def test_phantom_images_centring_bias_is_bounded(cohort):
    """On the Poisson images the paper's threshold centroid is biased vertically against the
    anatomical lung midpoint (gravity gradient, heart impression) but stays within a few px."""
    _, infos = preprocess_set([c.image.astype(np.float32) for c in cohort])
    ok = [i for i, info in enumerate(infos) if info["method"] == "centroid"]
    off = np.array([[c.params["offset_y"], c.params["offset_x"]] for c in cohort])
    err = shifts(infos)[ok] + off[ok] * SCALE
    assert np.median(np.abs(err[:, 1])) < 1.0
    assert np.median(np.abs(err[:, 0])) < 8.0


def test_phantom_nmi_fallback_on_touching_lungs(cohort):
    """Centred phantom set + copies whose lungs are bridged (touching) and moved by known amounts:
    the NMI fallback finds the known move (against what NMI finds for the original), and lands
    within a few px of where the centroid method put the original."""
    base = [c.image.astype(np.float32) for c in cohort]
    out0, i0 = preprocess_set(base)
    picks = [k for k in range(len(base)) if i0[k]["method"] == "centroid"][:3]
    moves = [(10, -12), (-9, 8), (6, 14)]
    extra = []
    for k, (dy, dx) in zip(picks, moves, strict=True):
        img = base[k].copy()
        m = cohort[k].masks["lungs"]
        ys, xs = np.nonzero(m)
        cy, cx = int(ys.mean()), int(xs.mean())
        band = img[cy - 15 : cy + 15, cx - 30 : cx + 30]  # the bridge: lung-level activity
        np.maximum(band, 0.6 * img.max(), out=band)
        extra.append(translate(img, dy, dx, subpixel=False))
    _, infos = preprocess_set(base + extra)
    fb = infos[len(base) :]
    assert [i["method"] for i in fb] == ["nmi"] * 3
    mean = out0[[k for k in range(len(base)) if i0[k]["method"] == "centroid"]].mean(axis=0)
    norm, _, _ = P.normalise_set([base[k] for k in picks])
    own = np.array([nmi_search(n, mean, None, np.random.default_rng(0))[:2] for n in norm])
    np.testing.assert_allclose(shifts(fb), own - np.array(moves) * SCALE, atol=1.5)
    centroid = shifts([i0[k] for k in picks]) - np.array(moves) * SCALE
    np.testing.assert_allclose(shifts(fb), centroid, atol=4.0)


# ------------------------------------------------------------------------------------------ cache
def folder(tmp_path, n=3):
    rng = np.random.default_rng(0)
    for cls in ("perfusion", "ventilation"):
        (tmp_path / cls).mkdir(parents=True)
        for i in range(n):
            np.save(tmp_path / cls / f"{cls}{i}.npy", lungs(off=rng.uniform(-10, 10, 2), rng=rng))
    return {"source": "folder", "root": str(tmp_path), "preprocess": {"size": 64}}


def test_cache_roundtrip_and_reuse(tmp_path, monkeypatch):
    data_cfg = folder(tmp_path / "data")
    cache = tmp_path / "cache"
    first = prepare_dataset(data_cfg, cache)
    assert first.images.shape == (6, 64, 64) and first.images.dtype == np.uint8
    assert sorted(first.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(list(cache.glob("prepared_*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(P, "preprocess_set", boom)
    monkeypatch.setattr(S, "load_studies", boom)
    second = prepare_dataset(data_cfg, cache)
    for name in ("images", "labels", "patient_ids", "ids", "paths"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    assert second.info == first.info and second.skipped == first.skipped
    assert second.cache_file == first.cache_file
    # a different pre-processing config or a changed file is a different cache entry
    with pytest.raises(AssertionError, match="recomputed"):
        prepare_dataset({**data_cfg, "preprocess": {"size": 32}}, cache)
    np.save(tmp_path / "data" / "perfusion" / "perfusion0.npy", lungs(off=(3, 3)))
    with pytest.raises(AssertionError, match="recomputed"):
        prepare_dataset(data_cfg, cache)


def test_cache_corrupt_file_is_rebuilt(tmp_path):
    data_cfg = folder(tmp_path / "data", n=2)
    first = prepare_dataset(data_cfg, tmp_path / "cache")
    with open(first.cache_file, "wb") as fh:
        fh.write(b"not a zip")
    again = prepare_dataset(data_cfg, tmp_path / "cache")
    np.testing.assert_array_equal(again.images, first.images)


def test_prepared_skip_lists_bad_files(tmp_path):
    data_cfg = folder(tmp_path / "data", n=2)
    np.save(tmp_path / "data" / "perfusion" / "flat.npy", np.ones((64, 64)))
    with pytest.raises(S.DataError, match="constant image"):
        prepare_dataset(data_cfg, None)
    data = prepare_dataset({**data_cfg, "on_error": "skip"}, tmp_path / "cache")
    assert len(data.images) == 4
    assert len(data.skipped) == 1 and "flat.npy: constant image" in data.skipped[0]


def test_phantom_prepared_masks_cached(tmp_path):
    pytest.importorskip("lung_cls.data.phantom")
    cfg = {"source": "phantom", "n_perfusion": 3, "n_ventilation": 2, "phantom_seed": 1,
           "preprocess": {"size": 64}}  # fmt: skip
    first = prepare_dataset(cfg, tmp_path)
    second = prepare_dataset(cfg, tmp_path)
    assert set(first.masks) == set(second.masks) and "lungs" in first.masks
    for name in first.masks:
        assert second.masks[name].dtype == bool and second.masks[name].shape == (5, 64, 64)
        np.testing.assert_array_equal(second.masks[name], first.masks[name])
    assert first.masks["lungs"].any(axis=(1, 2)).all()
    assert list(first.labels) == [1, 1, 1, 0, 0]
    assert all(p.startswith("phantom://") for p in first.paths)


def _conf_prep():
    return CONF / "prep" / "paper.yaml"


def test_paper_yaml_equals_code_defaults():
    import yaml

    with open(_conf_prep()) as fh:
        cfg = yaml.safe_load(fh)
    assert prep_config(cfg) == {**PREP_DEFAULTS, **cfg}
    assert set(cfg) == set(PREP_DEFAULTS)
    assert cfg["size"] == 224 and cfg["threshold"] == 30
