"""The paper's figures, drawn from plain arrays (matplotlib, Agg backend, no display needed).

Why plain arrays in, a PNG path out: the report builds these from run-dir files on any machine,
and the per-run callback can reuse the small grid helper; neither needs Lightning or a GPU.

Colour conventions follow the paper:

* average CAMs use the perceptually uniform ``viridis`` over [0, 1] (Grad-CAM maps are min-max
  scaled per image), opaque, with the class mean image's outline on top;
* the CAM difference map is ``ventilation mean CAM - perfusion mean CAM`` on the diverging ``RdBu``
  map centred at 0, so **red = perfusion higher, blue = ventilation higher, white = no difference**
  (``RdBu`` runs red -> white -> blue from negative to positive);
* significant pixels of the pixel-wise t-test are outlined and hatched in green (a colour that
  means nothing else there) over the grey mean test image;
* every image panel is an anterior view: the patient's right on the viewer's left (R / L, ANT).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

log = logging.getLogger(__name__)

__all__ = [
    "DIFF_CMAP",
    "fig_average_cams",
    "fig_cam_grid",
    "fig_cam_statistics",
    "fig_roc",
]

#: Diverging map for ``vent - perf``: negative (perfusion higher) red, positive (ventilation) blue.
DIFF_CMAP = "RdBu"
_CLASS_ORDER = ("perfusion", "ventilation")
_MASK_KEYS = (
    ("p_mask", "uncorrected"),
    ("fdr_mask", "BH-FDR"),
    ("fwer_mask", "max-T (FWER)"),
)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write the figure (parents created) and always close it, so long reports do not leak memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _ordered_classes(names: Sequence[str]) -> list[str]:
    """Perfusion first, then ventilation, then anything else (keeps every figure consistent)."""
    known = [c for c in _CLASS_ORDER if c in names]
    return known + sorted(c for c in names if c not in _CLASS_ORDER)


def _off(ax: plt.Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


#: Perceptually uniform sequential map of the CAMs (Fig. 2), and the significance colour of
#: Fig. 3: a green used for nothing else in that figure (not in RdBu, not in the grey base).
CAM_CMAP = "viridis"
SIG_COLOUR = "#00c853"
_CAM_UNIT = "mean Grad-CAM (per-image min-max scaled, 0-1)"


def _orient(ax: plt.Axes, colour: str = "white") -> None:
    """Anterior view markers: the patient's right on the viewer's left (R, L) and 'ANT'."""
    style = dict(transform=ax.transAxes, fontsize=7, color=colour, fontweight="bold")
    ax.text(0.03, 0.5, "R", ha="left", va="center", **style)
    ax.text(0.97, 0.5, "L", ha="right", va="center", **style)
    ax.text(0.03, 0.97, "ANT", ha="left", va="top", **style)


def _contour(ax: plt.Axes, image: np.ndarray | None, colour: str = "white") -> None:
    """The body/lung outline of a mean image (25 % and 60 % of its maximum) over another map."""
    if image is None:
        return
    img = np.asarray(image, dtype=np.float64)
    top = float(np.nanmax(img)) if np.isfinite(img).any() else 0.0
    if top <= 0:
        return
    ax.contour(img, levels=[0.25 * top, 0.6 * top], colors=colour, linewidths=[0.6, 0.9])


def _grid(n_rows: int, n_cols: int, cell: float = 2.3):
    """A figure whose image columns line up in every row, plus one thin colour-bar column."""
    fig = plt.figure(figsize=(cell * n_cols + 1.3, cell * n_rows + 0.7), layout="constrained")
    gs = fig.add_gridspec(n_rows, n_cols + 1, width_ratios=[1.0] * n_cols + [0.06])
    return fig, gs


def _shared_cam_top(mean_cams: Mapping[str, Mapping[str, np.ndarray]]) -> float:
    """One upper end of the CAM colour scale for every panel of Fig. 2: the largest mean-map value,
    rounded up to 0.1. A mean of per-image min-max maps rarely reaches 1 (peaks sit in different
    places), so a 0-1 scale left the neck and the heart in the darkest third of the colours; one
    shared scale keeps the models and classes comparable."""
    tops = [
        float(np.nanmax(cam))
        for per in mean_cams.values()
        for cam in per.values()
        if cam is not None and np.size(cam) and np.isfinite(cam).any()
    ]
    top = max(tops, default=1.0)
    return float(min(1.0, max(0.1, math.ceil(top * 10 - 1e-9) / 10)))


def fig_average_cams(
    mean_images: Mapping[str, np.ndarray],
    mean_cams: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    counts: Mapping[str, Mapping[str, int]] | None = None,
) -> Path:
    """Paper Fig. 2: per-class average test image (top row), then per model its per-class mean CAM.

    The CAMs are drawn opaque on ``viridis`` (from 0 to the largest mean value, rounded up to 0.1,
    the same for every panel; one colour bar per row, with its unit), with
    the outline of that class's mean image on top, so each map is read against the anatomy; the
    image row has its own grey scale bar. Every panel carries the anterior-view markers.

    Args:
        mean_images: ``{class_name: (H, W)}`` average image per class.
        mean_cams: ``{model: {class_name: (H, W)}}`` average Grad-CAM per class (values in [0, 1]).
        counts: optional ``{model: {class_name: n_maps}}`` shown in the titles.
    """
    classes = _ordered_classes(
        sorted({*mean_images} | {c for per in mean_cams.values() for c in per})
    )
    if not classes:
        raise ValueError("fig_average_cams: no classes to draw")
    rows: list[str | None] = [None, *mean_cams]
    cam_top = _shared_cam_top(mean_cams)
    fig, gs = _grid(len(rows), len(classes))
    for r, model in enumerate(rows):
        mappable = None
        for c, cls in enumerate(classes):
            ax = fig.add_subplot(gs[r, c])
            _off(ax)
            base = mean_images.get(cls)
            if model is None:
                if base is not None:
                    mappable = ax.imshow(np.asarray(base, dtype=np.float64), cmap="gray")
                    _orient(ax)
                ax.set_title(f"{cls}: average image", fontsize=9)
                continue
            cam = mean_cams[model].get(cls)
            if cam is None:
                shape = next((np.shape(v) for v in mean_cams[model].values()), (2, 2))
                ax.imshow(np.full(shape, np.nan))  # same box as its neighbours: columns line up
                ax.text(0.5, 0.5, "no CAMs", ha="center", va="center", transform=ax.transAxes)
            else:
                mappable = ax.imshow(cam, cmap=CAM_CMAP, vmin=0.0, vmax=cam_top)
                if base is not None and np.shape(base) == np.shape(cam):
                    _contour(ax, base)
                _orient(ax)
            n = (counts or {}).get(model, {}).get(cls)
            ax.set_title(f"{model}: {cls}" + (f" (n={n})" if n is not None else ""), fontsize=8)
        if mappable is not None:
            cb = fig.colorbar(mappable, cax=fig.add_subplot(gs[r, -1]))
            cb.set_label("mean counts (0-255)" if model is None else _CAM_UNIT, fontsize=6)
            cb.ax.tick_params(labelsize=6)
    fig.suptitle(
        "Fig. 2: average test image and average\nGrad-CAM of the true class "
        "(white: outline\nof the class mean image)",
        fontsize=9,
    )
    return _save(fig, path)


def _pct(mask: np.ndarray | None, tested: np.ndarray | None = None) -> str:
    """'x % of the n tested pixels' (the table's denominator), or of all pixels without a region."""
    if mask is None:
        return "n/a"
    m = np.asarray(mask, dtype=bool)
    if tested is None:
        return f"{100.0 * m.mean():.1f}% of pixels" if m.size else "n/a"
    t = np.asarray(tested, dtype=bool)
    n = int(t.sum())
    return f"{100.0 * m[t].mean():.1f}% of {n} tested pixels" if n else "n/a"


def fig_cam_statistics(
    per_model: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    alpha: float = 0.05,
    mean_image: np.ndarray | None = None,
) -> Path:
    """Paper Fig. 3, extended: difference map and significant pixels, three ways.

    One row per model. Column 1: ``diff = ventilation mean CAM - perfusion mean CAM`` on ``RdBu``
    centred at 0 (red: perfusion higher, blue: ventilation higher), with the outline of the mean
    test image in black and a colour bar in CAM units. Columns 2-4: pixels with p < alpha from
    the pixel-wise two-sample t-test - uncorrected (the paper), Benjamini-Hochberg FDR, and max-T
    permutation (family-wise) - outlined and hatched in :data:`SIG_COLOUR` (a colour used for
    nothing else) over the grey mean image (the mean CAM when no image is given), with the
    fraction of significant pixels under each panel.

    Args:
        per_model: ``{model: {"diff": (H, W), "mean_cam": (H, W), "p_mask": bool (H, W),
            "fdr_mask": ..., "fwer_mask": ...}}``; a missing mask key draws "not computed".
        mean_image: ``(H, W)`` mean test image (both classes) drawn under every panel.
    """
    if not per_model:
        raise ValueError("fig_cam_statistics: no models to draw")
    ncol = 1 + len(_MASK_KEYS)
    fig = plt.figure(figsize=(2.5 * ncol + 1.6, 2.9 * len(per_model) + 0.9), layout="constrained")
    gs = fig.add_gridspec(len(per_model), ncol + 1, width_ratios=[0.06, *([1.0] * ncol)])
    for r, (model, d) in enumerate(per_model.items()):
        diff = np.asarray(d["diff"], dtype=np.float64)
        lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
        lim = lim if lim > 0 else 1e-6
        base = mean_image if mean_image is not None and np.shape(mean_image) == diff.shape else None
        ax = fig.add_subplot(gs[r, 1])
        im = ax.imshow(diff, cmap=DIFF_CMAP, norm=TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim))
        _contour(ax, base, colour="black")
        _orient(ax, colour="black")
        _off(ax)
        ax.set_title(f"{model}: vent - perf", fontsize=8)
        ax.set_xlabel("red: perfusion higher\nblue: ventilation higher", fontsize=7)
        cb = fig.colorbar(im, cax=fig.add_subplot(gs[r, 0]))
        cb.set_label("difference of mean Grad-CAM (0-1 units)", fontsize=7)
        cb.ax.yaxis.set_ticks_position("left")
        cb.ax.yaxis.set_label_position("left")
        cb.ax.tick_params(labelsize=6)
        under = base if base is not None else d.get("mean_cam")
        for c, (key, label) in enumerate(_MASK_KEYS, start=2):
            ax = fig.add_subplot(gs[r, c])
            _off(ax)
            if under is not None:
                arr = np.asarray(under, dtype=np.float64)
                top = float(np.nanmax(arr)) if np.isfinite(arr).any() else 1.0
                ax.imshow(arr, cmap="gray", vmin=0.0, vmax=top if top > 0 else 1.0)
            mask = d.get(key)
            if mask is None:
                ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
            else:
                mask = np.asarray(mask, dtype=bool)
                if mask.any() and not mask.all():
                    m = mask.astype(np.float64)
                    with plt.rc_context({"hatch.linewidth": 0.4}):
                        ax.contourf(m, levels=[0.5, 1.5], colors="none", hatches=["///"])
                    ax.contour(m, levels=[0.5], colors=SIG_COLOUR, linewidths=1.0)
                    for coll in ax.collections:  # the hatch lines in the significance colour
                        coll.set_edgecolor(SIG_COLOUR)
                elif mask.all():
                    ax.patch.set_edgecolor(SIG_COLOUR)
                    ax.add_patch(
                        matplotlib.patches.Rectangle(
                            (0, 0),
                            1,
                            1,
                            transform=ax.transAxes,
                            fill=False,
                            hatch="////",
                            edgecolor=SIG_COLOUR,
                            lw=0,
                        )
                    )
            _orient(ax)
            ax.set_title(f"p < {alpha:g}, {label}", fontsize=8)
            ax.set_xlabel(_pct(mask, d.get("tested")), fontsize=7)
    fig.suptitle(
        "Fig. 3: ventilation - perfusion Grad-CAM difference (left) and pixel-wise t-test\n"
        "(significant pixels outlined and hatched in green over the mean test image)",
        fontsize=9,
    )
    return _save(fig, path)


def fig_roc(
    curves: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float], float]]],
    path: str | Path,
    pooled: Mapping[str, tuple[Sequence[float], Sequence[float], float]] | None = None,
) -> Path:
    """Paper Fig. 4: test ROC per model. Thin lines: one per seed; thick line: pooled over seeds.

    Args:
        curves: ``{model: [(fpr, tpr, auc), ...]}``, one entry per seed (run).
        pooled: optional ``{model: (fpr, tpr, auc)}`` of the test predictions pooled over seeds.
    The legend gives AUC mean +- SD over seeds (SD "-" for a single seed) and the pooled AUC.
    """
    models = list(dict.fromkeys([*curves, *(pooled or {})]))
    if not models:
        raise ValueError("fig_roc: no curves to draw")
    fig, ax = plt.subplots(figsize=(5.6, 5.2), layout="constrained")
    colours = plt.get_cmap("tab10")
    for i, model in enumerate(models):
        colour = colours(i % 10)
        runs = list(curves.get(model, []))
        aucs = np.array([a for *_, a in runs], dtype=np.float64)
        for fpr, tpr, _ in runs:
            ax.plot(fpr, tpr, color=colour, lw=0.8, alpha=0.35)
        label = model
        finite = aucs[np.isfinite(aucs)]
        if finite.size:
            sd = f"{finite.std(ddof=1):.3f}" if finite.size > 1 else "-"
            label += f": AUC {finite.mean():.3f} ± {sd} (n={finite.size})"
        pooled_curve = (pooled or {}).get(model)
        if pooled_curve is not None:
            fpr, tpr, auc = pooled_curve
            label += f", pooled {auc:.3f}" if auc is not None and math.isfinite(auc) else ""
            ax.plot(fpr, tpr, color=colour, lw=2.2, label=label)
        else:
            ax.plot([], [], color=colour, lw=2.2, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("Test ROC (perfusion positive); thin: seeds, thick: pooled", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_aspect("equal")
    return _save(fig, path)


def fig_cam_grid(
    images: np.ndarray,
    cams: np.ndarray,
    path: str | Path,
    titles: Sequence[str] | None = None,
    max_images: int = 16,
    ncols: int = 8,
) -> Path:
    """A small per-run overview: images with their Grad-CAM overlaid (first ``max_images``).

    Args:
        images: ``(N, H, W)`` grey images (any range).
        cams: ``(N, H, W)`` maps in [0, 1].
        titles: optional per-image captions (e.g. "perf 0.97").
    """
    images = np.asarray(images)
    cams = np.asarray(cams, dtype=np.float32)
    if images.shape != cams.shape or images.ndim != 3:
        raise ValueError(
            f"fig_cam_grid: images {images.shape} and cams {cams.shape} must be (N, H, W)"
        )
    n = min(len(images), max_images)
    if n == 0:
        raise ValueError("fig_cam_grid: no images")
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(1.6 * ncols, 1.7 * nrows), squeeze=False, layout="constrained"
    )
    for k, ax in enumerate(axes.ravel()):
        _off(ax)
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(images[k].astype(np.float64), cmap="gray")
        ax.imshow(cams[k], cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45)
        if titles is not None and k < len(titles):
            ax.set_title(str(titles[k]), fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- QA overlays
# One PNG per checked study (`python -m lung_cls.predict overlays=true`): where the model looked.
__all__ += ["overlay_title", "render_overlay"]

_STATUS_COLOUR = {"ok": "#1a7f37", "review": "#b58100", "mismatch": "#c62828"}


def overlay_title(
    name: str,
    predicted: str,
    prob: float,
    sd: float,
    declared: str,
    status: str,
    *,
    cam_class: str,
    n_models: int,
) -> str:
    """The three title lines of a QA overlay: the study, the model's answer, the verdict."""
    spread = f" ± {sd:.2f} (SD, {n_models} models)" if n_models > 1 else ""
    return (
        f"{name}\n"
        f"predicted: {predicted}  P(perfusion) = {prob:.3f}{spread}\n"
        f"declared: {declared}  ->  {str(status).upper()}   (CAM of {cam_class})"
    )


def render_overlay(
    image: np.ndarray, cam: np.ndarray, title: str, path: str | Path, status: str = "ok"
) -> Path:
    """Grey image | the same with the CAM blended on top (jet, alpha by CAM strength) -> PNG.

    Uses the Agg canvas directly (no pyplot state), so it is safe in any process; written under a
    temporary name and renamed, so a reader never sees half a PNG.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = np.asarray(image, dtype=np.float32) / 255.0
    heat = colormaps["jet"](np.clip(cam, 0.0, 1.0))
    heat[..., 3] = 0.6 * np.clip(cam, 0.0, 1.0)  # weak CAM stays see-through
    fig = Figure(figsize=(5.6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    axes[0].imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("pre-processed", fontsize=8)
    axes[1].imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[1].imshow(heat, interpolation="bilinear")
    axes[1].set_title("Grad-CAM", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8, color=_STATUS_COLOUR.get(status, "black"))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.76, wspace=0.04)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- calibration
__all__ += ["fig_reliability"]


def fig_reliability(
    points: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    ece: Mapping[str, float] | None = None,
) -> Path:
    """Reliability diagram: per model, the share of perfusion studies against the mean predicted
    P(perfusion) in each probability bin; the diagonal is perfect calibration.

    Bins are drawn as points only, their area proportional to the rows in the bin, and each
    labelled with that count: with a 40-image test set most middle bins hold one or two rows,
    and a line through them would draw a zig-zag from 0 to 1 that looks like a finding."""
    if not points:
        raise ValueError("fig_reliability: no models to draw")
    fig, ax = plt.subplots(figsize=(5.0, 4.8), layout="constrained")
    colours = plt.get_cmap("tab10")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    for i, (model, bins) in enumerate(points.items()):
        x = [b["mean_p"] for b in bins]
        y = [b["frac_pos"] for b in bins]
        n = np.array([b["n"] for b in bins], dtype=np.float64)
        label = model
        if ece and finite_number(ece.get(model)):
            label += f" (ECE {ece[model]:.3f})"
        ax.scatter(
            x, y, s=12 + 110 * n / max(n.max(), 1), color=colours(i % 10), alpha=0.75,
            edgecolors="white", linewidths=0.5, zorder=3, label=label,
        )  # fmt: skip
        for xi, yi, ni in zip(x, y, n, strict=True):
            ax.annotate(
                f"{int(ni)}", (xi, yi), xytext=(4, -9 if i % 2 else 4), textcoords="offset points",
                fontsize=6, color=colours(i % 10),
            )  # fmt: skip
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted P(perfusion) in the bin")
    ax.set_ylabel("share of perfusion studies in the bin")
    ax.set_title(
        "Reliability diagram (test, pooled over seeds)\npoint area and label: rows in the bin",
        fontsize=9,
    )
    ax.legend(loc="center right", fontsize=7)  # the empty region: few bins sit mid-right
    return _save(fig, path)


def finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(float(v))
