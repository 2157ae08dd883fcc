"""The paper's figures, drawn from plain arrays (matplotlib, Agg backend, no display needed).

Why plain arrays in, a PNG path out: the report builds these from run-dir files on any machine,
and the per-run callback can reuse the small grid helper; neither needs Lightning or a GPU.

Colour conventions follow the paper:

* average CAMs use ``jet`` over [0, 1] (Grad-CAM maps are min-max scaled per image);
* the CAM difference map is ``ventilation mean CAM - perfusion mean CAM`` on the diverging ``RdBu``
  map centred at 0, so **red = perfusion higher, blue = ventilation higher, white = no difference**
  (``RdBu`` runs red -> white -> blue from negative to positive);
* significant pixels of the pixel-wise t-test are drawn in colour over the grey mean CAM.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, TwoSlopeNorm  # noqa: E402

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


def fig_average_cams(
    mean_images: Mapping[str, np.ndarray],
    mean_cams: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    counts: Mapping[str, Mapping[str, int]] | None = None,
) -> Path:
    """Paper Fig. 2: per-class average test image (top row), then per model its per-class mean CAM.

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
    fig, axes = plt.subplots(
        len(rows),
        len(classes),
        figsize=(2.6 * len(classes) + 1.0, 2.6 * len(rows)),
        squeeze=False,
        layout="constrained",
    )
    cam_im = None
    for r, model in enumerate(rows):
        for c, cls in enumerate(classes):
            ax = axes[r][c]
            _off(ax)
            if model is None:
                img = mean_images.get(cls)
                if img is not None:
                    ax.imshow(np.asarray(img, dtype=np.float64), cmap="gray")
                ax.set_title(f"{cls}: average image", fontsize=9)
            else:
                cam = mean_cams[model].get(cls)
                if cam is not None:
                    base = mean_images.get(cls)
                    if base is not None and np.shape(base) == np.shape(cam):
                        ax.imshow(np.asarray(base, dtype=np.float64), cmap="gray")
                        cam_im = ax.imshow(cam, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.5)
                    else:
                        cam_im = ax.imshow(cam, cmap="jet", vmin=0.0, vmax=1.0)
                else:
                    ax.text(0.5, 0.5, "no CAMs", ha="center", va="center", transform=ax.transAxes)
                n = (counts or {}).get(model, {}).get(cls)
                suffix = f" (n={n})" if n is not None else ""
                ax.set_title(f"{model}\n{cls}{suffix}", fontsize=8)
    if cam_im is not None:
        fig.colorbar(cam_im, ax=axes[1:, :].ravel().tolist(), shrink=0.6, label="mean Grad-CAM")
    fig.suptitle("Average test image and average Grad-CAM per class", fontsize=11)
    return _save(fig, path)


def _pct(mask: np.ndarray | None) -> str:
    if mask is None:
        return "n/a"
    m = np.asarray(mask, dtype=bool)
    return f"{100.0 * m.mean():.1f}% of pixels" if m.size else "n/a"


def fig_cam_statistics(
    per_model: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    alpha: float = 0.05,
) -> Path:
    """Paper Fig. 3, extended: difference map and significant pixels, three ways.

    One row per model. Column 1: ``diff = ventilation mean CAM - perfusion mean CAM`` on ``RdBu``
    centred at 0 (red: perfusion higher, blue: ventilation higher). Columns 2-4: pixels with
    p < alpha from the pixel-wise two-sample t-test - uncorrected (the paper), Benjamini-Hochberg
    FDR, and max-T permutation (family-wise) - in red over the grey mean CAM, with the fraction of
    significant pixels under each panel.

    Args:
        per_model: ``{model: {"diff": (H, W), "mean_cam": (H, W), "p_mask": bool (H, W),
            "fdr_mask": ..., "fwer_mask": ...}}``; a missing mask key draws "not computed".
    """
    if not per_model:
        raise ValueError("fig_cam_statistics: no models to draw")
    ncol = 1 + len(_MASK_KEYS)
    fig, axes = plt.subplots(
        len(per_model),
        ncol,
        figsize=(2.9 * ncol + 0.8, 3.2 * len(per_model) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    sig_cmap = ListedColormap([(0, 0, 0, 0), (1.0, 0.1, 0.1, 0.85)])
    for r, (model, d) in enumerate(per_model.items()):
        diff = np.asarray(d["diff"], dtype=np.float64)
        lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
        lim = lim if lim > 0 else 1e-6
        ax = axes[r][0]
        im = ax.imshow(diff, cmap=DIFF_CMAP, norm=TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim))
        _off(ax)
        ax.set_title(f"{model}\nvent - perf mean CAM", fontsize=9)
        ax.set_xlabel("red: perfusion higher\nblue: ventilation higher", fontsize=8)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=7)
        base = d.get("mean_cam")
        for c, (key, label) in enumerate(_MASK_KEYS, start=1):
            ax = axes[r][c]
            _off(ax)
            if base is not None:
                base_arr = np.asarray(base, dtype=np.float64)
                top = float(np.nanmax(base_arr)) if np.isfinite(base_arr).any() else 1.0
                ax.imshow(base_arr, cmap="gray", vmin=0.0, vmax=top if top > 0 else 1.0)
            mask = d.get(key)
            if mask is None:
                ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
            else:
                mask = np.asarray(mask, dtype=bool)
                ax.imshow(
                    mask.astype(np.float64), cmap=sig_cmap, vmin=0, vmax=1, interpolation="nearest"
                )
            ax.set_title(f"p < {alpha:g}, {label}", fontsize=9)
            ax.set_xlabel(_pct(mask), fontsize=8)
    fig.suptitle(
        "Ventilation - perfusion Grad-CAM: difference (red: perfusion higher, blue: ventilation\n"
        "higher) and pixel-wise t-test (significant pixels in red over the grey mean CAM)",
        fontsize=10,
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
