"""Figs. 2 and 3 as a physicist would publish them: anatomy under every map, a uniform map for
CAMs and a diverging one centred on 0 for differences, significance in its own colour, colour bars
with units, R/L and ANT markers, and no text drawn over other text."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import TwoSlopeNorm, to_rgba

from lung_cls.evaluation import figures as F

SIZE = 32


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[plt.Figure]:
    """The figures the drawing functions would save, kept open for inspection."""
    kept: list[plt.Figure] = []

    def keep(fig, path):
        fig.canvas.draw()
        kept.append(fig)
        return path

    monkeypatch.setattr(F, "_save", keep)
    yield kept
    for fig in kept:
        plt.close(fig)


def _image() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return 200.0 * (((xx - 10) ** 2 + (yy - 16) ** 2 < 30) | ((xx - 22) ** 2 + (yy - 16) ** 2 < 30))


def _image_axes(fig: plt.Figure) -> list[plt.Axes]:
    return [ax for ax in fig.axes if ax.get_title()]


def _texts_do_not_overlap(fig: plt.Figure) -> None:
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        for t in (ax.title, ax.xaxis.label, ax.yaxis.label):
            if t.get_text():
                boxes.append((t.get_text(), t.get_window_extent(renderer)))
    if fig._suptitle is not None:
        boxes.append(("suptitle", fig._suptitle.get_window_extent(renderer)))
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        assert not ba.overlaps(bb), f"{a!r} overlaps {b!r}"


def test_fig2_cams_on_viridis_with_outline_markers_and_units(captured, tmp_path) -> None:
    img = _image()
    cam = np.random.default_rng(0).uniform(0, 1, (SIZE, SIZE))
    F.fig_average_cams(
        {"perfusion": img, "ventilation": img},
        {"resnet18": {"perfusion": cam, "ventilation": cam}, "vgg16": {"perfusion": cam}},
        tmp_path / "f.png",
        counts={"resnet18": {"perfusion": 3, "ventilation": 3}},
    )
    fig = captured[0]
    panels = _image_axes(fig)
    cam_panels = [ax for ax in panels if "average image" not in ax.get_title()]
    assert len(cam_panels) == 4  # vgg16's missing ventilation CAMs still get a panel
    for ax in cam_panels:
        if not any(t.get_text() == "no CAMs" for t in ax.texts):
            assert ax.images[0].get_cmap().name == F.CAM_CMAP
            assert ax.images[0].get_alpha() in (None, 1.0)  # opaque: the colour bar is true
            assert ax.collections, "the class mean image's outline is drawn over the CAM"
    for ax in panels:
        texts = {t.get_text() for t in ax.texts}
        assert {"R", "L", "ANT"} <= texts or texts == {"no CAMs"}
    labels = [ax.get_ylabel() for ax in fig.axes if not ax.get_title() and ax.get_ylabel()]
    assert any("0-255" in s for s in labels) and any("Grad-CAM" in s for s in labels)
    # the image columns line up: every panel of one column has the same x extent
    lefts = {round(ax.get_position().x0, 3) for ax in panels}
    assert len(lefts) == 2
    _texts_do_not_overlap(fig)


def test_fig3_diverging_difference_and_significance_in_its_own_colour(captured, tmp_path) -> None:
    rng = np.random.default_rng(1)
    diff = rng.normal(0, 0.2, (SIZE, SIZE))
    sig = np.zeros((SIZE, SIZE), bool)
    sig[4:12, 12:20] = True
    maps = {
        m: {
            "diff": diff,
            "mean_cam": rng.uniform(0, 1, (SIZE, SIZE)),
            "p_mask": sig,
            "fdr_mask": sig,
        }
        for m in ("resnet18", "seresnext26d")
    }
    F.fig_cam_statistics(maps, tmp_path / "f.png", alpha=0.05, mean_image=_image())
    fig = captured[0]
    diff_axes = [ax for ax in fig.axes if "vent - perf" in ax.get_title()]
    assert len(diff_axes) == 2
    for ax in diff_axes:
        norm = ax.images[0].norm
        assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0.0
        assert ax.images[0].get_cmap().name == F.DIFF_CMAP
        assert ax.collections, "the mean image's outline is drawn under the difference"
    sig_axes = [ax for ax in fig.axes if ax.get_title().startswith("p < 0.05")]
    assert len(sig_axes) == 6
    green = to_rgba(F.SIG_COLOUR)
    for ax in sig_axes:
        assert ax.images[0].get_cmap().name == "gray"  # the anatomy underneath
        assert {"R", "L", "ANT"} <= {t.get_text() for t in ax.texts}
        if "max-T" in ax.get_title():
            assert any(t.get_text() == "not computed" for t in ax.texts)
            continue
        colours = [tuple(c) for coll in ax.collections for c in coll.get_edgecolor()]
        assert green in colours
    # the significance colour is used nowhere in the difference map's colours
    rdbu = plt.get_cmap(F.DIFF_CMAP)(np.linspace(0, 1, 256))
    assert np.min(np.abs(rdbu - np.array(green)).sum(axis=1)) > 0.3
    cbar_labels = [ax.get_ylabel() for ax in fig.axes if "difference" in ax.get_ylabel()]
    assert len(cbar_labels) == 2 and all("units" in s for s in cbar_labels)
    _texts_do_not_overlap(fig)


def test_fig2_cam_colour_scale_is_shared_and_ends_at_the_largest_mean_value() -> None:
    maps = {"a": {"perfusion": np.full((4, 4), 0.2), "ventilation": np.full((4, 4), 0.43)},
            "b": {"perfusion": np.full((4, 4), 0.31)}}  # fmt: skip
    assert F._shared_cam_top(maps) == pytest.approx(0.5)
    assert F._shared_cam_top({"a": {"perfusion": np.full((2, 2), 0.5)}}) == pytest.approx(0.5)
    assert F._shared_cam_top({"a": {"perfusion": np.ones((2, 2))}}) == 1.0
    assert F._shared_cam_top({"a": {"perfusion": np.full((2, 2), 0.01)}}) == pytest.approx(0.1)
    assert F._shared_cam_top({}) == 1.0
