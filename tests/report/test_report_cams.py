"""Pooling CAMs over seeds and the CAM statistics, on tiny maps whose answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lung_cls.report.cams import (
    RAW_CAMS_KEY,
    ModelCams,
    all_cam_statistics,
    body_mask,
    cam_statistics,
    class_mean_cams,
    load_model_cams,
    mean_images,
)
from lung_cls.report.discover import RunRecord
from lung_cls.runs import write_cams


def _record(run_dir: Path, seed: int) -> RunRecord:
    return RunRecord(
        name=run_dir.name,
        path=run_dir,
        model="m",
        seed=seed,
        status="ok",
        cams_path=run_dir / "cams.npz",
    )


def _write(run_dir: Path, cams: np.ndarray, labels, masks=None, images=None) -> RunRecord:
    n = len(labels)
    write_cams(
        run_dir,
        cams=cams,
        labels=np.asarray(labels),
        ids=[f"id{i}" for i in range(n)],
        images=np.zeros(cams.shape, np.uint8) if images is None else images,
        probs=np.full(n, 0.7),
        masks=masks,
    )
    return _record(run_dir, int(run_dir.name[-1]))


def test_load_model_cams_pools_seeds_and_notes_what_it_leaves_out(tmp_path: Path) -> None:
    heart = np.ones((2, 4, 4), bool)
    trachea = np.zeros((2, 4, 4), bool)
    runs = [
        _write(
            tmp_path / "s0", np.full((2, 4, 4), 0.5), [1, 0], {"heart": heart, "trachea": trachea}
        ),
        _write(tmp_path / "s1", np.full((2, 4, 4), 2.0), [0, 1], {"heart": heart}),  # clipped to 1
        _write(tmp_path / "s2", np.zeros((3, 8, 8)), [1, 0, 1]),  # another map size: not used
        _record(tmp_path / "s3", 3),  # cams.npz missing
    ]
    (tmp_path / "s3").mkdir()
    (tmp_path / "s4").mkdir()
    (tmp_path / "s4" / "cams.npz").write_bytes(b"not an npz")
    runs.append(_record(tmp_path / "s4", 4))
    notes: list[str] = []
    mc = load_model_cams(runs, notes)
    assert mc.n_runs == 2
    assert mc.cams.shape == (4, 4, 4) and mc.cams.dtype == np.float32
    assert mc.cams.max() == 1.0  # values clipped into [0, 1]
    assert mc.labels.tolist() == [1, 0, 0, 1]
    assert mc.ids.tolist() == ["id0", "id1", "id0", "id1"]
    assert set(mc.masks) == {"heart"}  # only the masks every run has
    assert mc.masks["heart"].shape == (4, 4, 4)
    assert any("map size (8, 8) differs" in n and "s2" in n for n in notes), notes
    assert any("s3" in n and "not used" in n for n in notes), notes
    assert any("s4" in n and "unreadable" in n for n in notes), notes
    assert any("truth masks differ" in n and "['heart']" in n for n in notes), notes
    assert load_model_cams([_record(tmp_path / "nothing", 0)], []) is None


def _model_cams(labels, ids, images=None, cams=None) -> ModelCams:
    n = len(labels)
    return ModelCams(
        cams=np.zeros((n, 2, 2)) if cams is None else cams,
        labels=np.asarray(labels),
        ids=np.asarray(ids),
        images=images,
        masks={},
        n_runs=1,
    )


def test_mean_images_counts_each_test_image_once() -> None:
    # Two seeds of the same two images; the second seed's copy of "a" differs, which would move
    # the mean if repeated images were counted twice.
    images = np.stack([np.full((2, 2), v, float) for v in (10, 200, 30, 200)])
    mc = _model_cams([1, 0, 1, 0], ["a", "b", "a", "b"], images=images)
    out = mean_images({"no_images": _model_cams([1], ["x"]), "m": mc})
    assert set(out) == {"perfusion", "ventilation"}
    assert out["perfusion"] == pytest.approx(np.full((2, 2), 10.0))
    assert out["ventilation"] == pytest.approx(np.full((2, 2), 200.0))
    assert mean_images({"no_images": _model_cams([1], ["x"])}) == {}


def test_class_mean_cams_and_counts() -> None:
    cams = np.stack([np.full((2, 2), v) for v in (0.2, 0.4, 0.9)])
    means, counts = class_mean_cams({"m": _model_cams([1, 1, 1], ["a", "b", "c"], cams=cams)})
    assert list(means["m"]) == ["perfusion"]  # no ventilation CAMs: no mean
    assert means["m"]["perfusion"] == pytest.approx(np.full((2, 2), 0.5))
    assert counts == {"m": {"perfusion": 3, "ventilation": 0}}


def _two_class_cams() -> ModelCams:
    """3 perfusion and 3 ventilation 2 x 2 CAMs: pixel (0, 0) is high for perfusion only,
    the other pixels are noise of the same level in both classes."""
    perf = np.array([[[0.9, 0.1], [0.2, 0.3]], [[0.8, 0.2], [0.1, 0.3]], [[1.0, 0.1], [0.3, 0.2]]])
    vent = np.array([[[0.1, 0.2], [0.1, 0.3]], [[0.2, 0.1], [0.3, 0.2]], [[0.0, 0.1], [0.2, 0.3]]])
    return _model_cams([1, 1, 1, 0, 0, 0], list("abcdef"), cams=np.concatenate([perf, vent]))


def test_cam_statistics_difference_and_tests_by_hand() -> None:
    mc = _two_class_cams()
    fig, info = cam_statistics(mc, n_perm=0, seed=0, alpha=0.05, equal_var=True)
    # diff = mean ventilation - mean perfusion: (0.1 + 0.2 + 0.0)/3 - (0.9 + 0.8 + 1.0)/3 = -0.8
    assert fig["diff"][0, 0] == pytest.approx(-0.8)
    assert info["diff_min"] == pytest.approx(-0.8)
    perf, vent = mc.cams[:3], mc.cams[3:]
    p = stats.ttest_ind(perf, vent, axis=0).pvalue  # Student's test, the paper's
    assert fig["p_mask"].tolist() == (p < 0.05).tolist()
    assert fig["p_mask"][0, 0] and not fig["p_mask"][0, 1]
    assert info["min_p"] == pytest.approx(p.min())
    assert info["significant_fraction"]["uncorrected"] == pytest.approx(np.mean(p < 0.05))
    assert "fwer_mask" not in fig and "maxT" not in info["significant_fraction"]  # n_perm = 0
    assert (info["n_perfusion"], info["n_ventilation"]) == (3, 3)
    welch = cam_statistics(mc, n_perm=0, seed=0, alpha=0.05, equal_var=False)[1]
    p_welch = stats.ttest_ind(perf, vent, axis=0, equal_var=False).pvalue
    assert welch["min_p"] == pytest.approx(p_welch.min())


def test_cam_statistics_with_permutations_and_too_few_maps() -> None:
    fig, info = cam_statistics(_two_class_cams(), n_perm=19, seed=0, alpha=0.05, equal_var=True)
    assert fig["fwer_mask"].shape == (2, 2)
    assert info["min_p_fwer"] >= 1 / 20  # the observed labelling counts as one of 20
    few = _model_cams([1, 1, 0], ["a", "b", "c"])
    fig, info = cam_statistics(few, n_perm=10, seed=0, alpha=0.05, equal_var=True)
    assert "diff" in fig and "p_mask" not in fig
    assert info["note"] == "fewer than 2 images in a class: no t-test"
    one_class = _model_cams([1, 1], ["a", "b"])
    maps, infos = all_cam_statistics(
        {"ok": _two_class_cams(), "one": one_class}, n_perm=0, seed=0, alpha=0.05, equal_var=True
    )
    assert set(maps) == {"ok"} and set(infos) == {"ok", "one"}  # Fig. 3 needs both classes


def test_cam_statistics_test_one_map_per_image() -> None:
    """Five seeds of the same six images are six samples, not thirty: the tests equal those of
    the per-image mean maps, and report.json says how many maps and images there were."""
    base = _two_class_cams()
    rng = np.random.default_rng(0)
    cams = np.concatenate([base.cams + 0.01 * rng.normal(size=base.cams.shape) for _ in range(5)])
    five = _model_cams(np.tile(base.labels, 5), np.tile(base.ids, 5), cams=cams)
    fig, info = cam_statistics(five, n_perm=0, seed=0, alpha=0.05, equal_var=True)
    means = cams.reshape(5, 6, 2, 2).mean(axis=0)
    p = stats.ttest_ind(means[:3], means[3:], axis=0).pvalue
    assert info["min_p"] == pytest.approx(p.min())
    assert fig["p_mask"].tolist() == (p < 0.05).tolist()
    assert (info["n_maps"], info["n_images"], info["n_perfusion"]) == (30, 6, 3)
    assert info["unit"].startswith("image")
    pooled_p = stats.ttest_ind(cams[five.labels == 1], cams[five.labels == 0], axis=0).pvalue
    assert pooled_p.min() < p.min()  # the pooled maps would overstate the evidence


def test_difference_map_is_ventilation_minus_perfusion_drawn_red_where_perfusion_is_higher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fig. 3's documented meaning, end to end: pixel (0, 0) is hot in the perfusion CAMs only,
    so diff = ventilation - perfusion is negative there and the panel paints it red."""
    import lung_cls.evaluation.figures as figs

    maps, _ = all_cam_statistics(
        {"m": _two_class_cams()}, n_perm=0, seed=0, alpha=0.05, equal_var=True
    )
    assert maps["m"]["diff"][0, 0] < 0
    drawn: dict[str, object] = {}
    monkeypatch.setattr(figs, "_save", lambda fig, path: drawn.__setitem__("fig", fig))

    def colour_at_00(maps) -> np.ndarray:
        figs.fig_cam_statistics(maps, "unused.png")
        image = drawn["fig"].axes[0].images[0]
        return image.to_rgba(image.get_array())[0, 0, :3]

    r, _, b = colour_at_00(maps)
    assert r > b + 0.2  # red: perfusion higher (RdBu runs dark red -> white -> dark blue)
    swapped = _two_class_cams().cams[[3, 4, 5, 0, 1, 2]]
    vent_hot = _model_cams([1, 1, 1, 0, 0, 0], list("abcdef"), cams=swapped)
    maps, _ = all_cam_statistics({"m": vent_hot}, n_perm=0, seed=0, alpha=0.05, equal_var=True)
    r, _, b = colour_at_00(maps)
    assert b > r + 0.2  # blue: ventilation higher


def test_cam_statistics_test_only_the_body_and_count_the_tests() -> None:
    """Pixels outside the mask are never tested (nor flagged), and n_tests says how many were."""
    rng = np.random.default_rng(1)
    n, size = 12, 6
    cams = rng.random((n, size, size))
    labels = np.r_[np.ones(6, int), np.zeros(6, int)]
    cams[labels == 1, 0, 0] += 5.0  # a strong effect in the background corner
    cams[labels == 1, 3, 3] += 5.0  # and one on the body
    body = np.zeros((n, size, size), bool)
    body[:, 2:5, 2:5] = True
    mc = ModelCams(cams, labels, np.arange(n).astype(str), None, {"lungs": body}, 1)
    fig, info = cam_statistics(mc, n_perm=49, seed=0, alpha=0.05, equal_var=True)
    assert info["n_tests"] == 9 and info["n_pixels_total"] == 36
    assert info["significant_fraction"]["n_pixels"] == 9
    assert "lungs" in info["mask"]
    for key in ("p_mask", "fdr_mask", "fwer_mask"):
        assert fig[key][3, 3] and not fig[key][0, 0], key
        assert not fig[key][~body[0]].any(), key
    _, all_px = cam_statistics(mc, n_perm=0, seed=0, alpha=0.05, equal_var=True, mask="none")
    assert all_px["n_tests"] == 36
    given = np.zeros((size, size), bool)
    given[0, :] = True
    fig, user = cam_statistics(mc, n_perm=0, seed=0, alpha=0.05, equal_var=True, mask=given)
    assert user["n_tests"] == 6 and fig["p_mask"][0, 0] and not fig["p_mask"][3, 3]
    with pytest.raises(ValueError, match="shape"):
        cam_statistics(mc, 0, 0, 0.05, True, mask=np.ones((2, 2), bool))


def test_body_mask_from_the_mean_image_without_truth_masks() -> None:
    images = np.zeros((4, 5, 5), np.uint8)
    images[:, 1:4, 1:4] = 200
    images[:, 0, 0] = 10  # faint background: below 0.1 x 200
    mc = _model_cams([1, 1, 0, 0], list("abcd"), images=images, cams=np.zeros((4, 5, 5)))
    mask, text = body_mask(mc, "auto", 0.1)
    assert mask.sum() == 9 and not mask[0, 0]
    assert "mean test image" in text
    assert body_mask(_model_cams([1, 0], ["a", "b"]), "auto")[0].all()  # nothing to build on


def test_cam_statistics_use_raw_or_minmax_cams_and_say_which() -> None:
    base = _two_class_cams()
    raw = -base.cams  # a raw map that differs from the scaled one
    mc = ModelCams(base.cams, base.labels, base.ids, None, {}, 1, raw=raw)
    fig, info = cam_statistics(mc, 0, 0, 0.05, True, scale="raw")
    assert info["cam_scale"] == "raw" and fig["diff"][0, 0] == pytest.approx(0.8)
    _, info = cam_statistics(mc, 0, 0, 0.05, True, scale="minmax")
    assert info["cam_scale"] == "minmax"
    _, info = cam_statistics(base, 0, 0, 0.05, True, scale="raw")  # no raw maps stored
    assert info["cam_scale"] == "minmax" and "no raw CAMs" in info["note"]


def test_load_model_cams_keeps_raw_maps_when_every_run_has_them(tmp_path: Path) -> None:
    from lung_cls.runs import write_cams

    runs = []
    for seed in (0, 1):
        d = tmp_path / f"run{seed}"
        write_cams(
            d, cams=np.full((2, 3, 3), 0.5), labels=[1, 0], ids=["a", "b"],
            images=np.zeros((2, 3, 3)), probs=[0.9, 0.1],
            extra={RAW_CAMS_KEY: np.full((2, 3, 3), -1.5 - seed, np.float32)},
        )  # fmt: skip
        runs.append(_record(d, seed))
    mc = load_model_cams(runs, [])
    assert mc.raw is not None and mc.raw.shape == (4, 3, 3) and mc.raw.min() == -2.5
