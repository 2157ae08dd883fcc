"""The report's figures (paper Figs. 2-4), drawn by :mod:`lung_cls.evaluation.figures`.

What this module adds is where and how they are written: each PNG is drawn into a temporary
folder next to its target and renamed over it, so a reader (a browser on the report folder, a
W&B upload, a second report) never sees half a PNG, and an old figure stays until the new one is
complete. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lung_cls.report.tables import Curve

#: File names of the figures in the report folder (``report.json["figures"]`` keys + ".png").
ROC, AVERAGE_CAMS, CAM_STATISTICS = "fig4_roc", "fig2_average_cams", "fig3_cam_statistics"
RELIABILITY = "fig5_reliability"


def _drawn_atomically(draw: Callable[..., Path], path: Path, *args: Any, **kwargs: Any) -> Path:
    """``draw(*args, path=<temporary file>, **kwargs)``, then the file renamed onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as tmp:
        drawn = draw(*args, path=Path(tmp) / path.name, **kwargs)
        os.replace(drawn, path)
    return path


def draw_roc(
    curves: Mapping[str, Sequence[Curve]], pooled: Mapping[str, Curve], out_dir: Path
) -> Path:
    """Fig. 4: one thin ROC per seed, the thick pooled one, per model."""
    from lung_cls.evaluation.figures import fig_roc

    return _drawn_atomically(fig_roc, out_dir / f"{ROC}.png", curves, pooled=pooled)


def draw_average_cams(
    images: Mapping[str, np.ndarray],
    cams: Mapping[str, Mapping[str, np.ndarray]],
    counts: Mapping[str, Mapping[str, int]],
    out_dir: Path,
) -> Path:
    """Fig. 2: per-class average test image, then per model the per-class average CAM."""
    from lung_cls.evaluation.figures import fig_average_cams

    return _drawn_atomically(
        fig_average_cams, out_dir / f"{AVERAGE_CAMS}.png", images, cams, counts=counts
    )


def draw_cam_statistics(
    per_model: Mapping[str, Mapping[str, Any]],
    out_dir: Path,
    alpha: float,
    mean_images: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Fig. 3: difference map and the pixels significant uncorrected, under FDR and max-T, over
    the mean test image (the classes' mean images averaged, each class weighing the same)."""
    from lung_cls.evaluation.figures import fig_cam_statistics

    shapes = {np.shape(v) for v in (mean_images or {}).values()}
    base = (
        np.mean([np.asarray(v, dtype=np.float64) for v in mean_images.values()], axis=0)
        if mean_images and len(shapes) == 1
        else None
    )
    return _drawn_atomically(
        fig_cam_statistics,
        out_dir / f"{CAM_STATISTICS}.png",
        per_model,
        alpha=alpha,
        mean_image=base,
    )


def draw_reliability(
    points: Mapping[str, Sequence[Mapping[str, float]]], ece: Mapping[str, float], out_dir: Path
) -> Path:
    """Reliability diagram of every model (test predictions pooled over seeds)."""
    from lung_cls.evaluation.figures import fig_reliability

    return _drawn_atomically(fig_reliability, out_dir / f"{RELIABILITY}.png", points, ece=ece)
