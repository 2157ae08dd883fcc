"""Do the ventilation CAMs find the neck? The paper's main finding, measured on phantom truth.

Per model: on the neck-positive ventilation test images (pooled over seeds), the CAM energy inside
the trachea/oropharynx/oesophagus masks grown by half a CAM cell, over the grown masks' area share
(chance: what a flat CAM scores), and the share of images whose CAM maximum lies inside them
(chance: the same area share). The CAM grid comes from ``cams.npz["cam_grid"]``; maps coarser than
the paper's 7 x 7 get a warning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from lung_cls.evaluation import groundtruth as gt
from lung_cls.report.discover import RunRecord
from lung_cls.report.fmt import finite, fmt
from lung_cls.runs import read_cams


def cam_grid(runs: Sequence[RunRecord]) -> tuple[int, int] | None:
    """The CAM feature-map size a model's runs recorded (the first readable one), or None."""
    for r in runs:
        if r.status != "ok" or r.cams_path is None:
            continue
        try:
            grid = read_cams(r.cams_path).get("cam_grid")
        except (OSError, ValueError):
            continue
        if grid is not None and np.asarray(grid).shape == (2,):
            return int(grid[0]), int(grid[1])
    return None


def neck_table(
    model_cams: Mapping[str, Any], grids: Mapping[str, tuple[int, int] | None]
) -> tuple[pd.DataFrame, dict[str, Any], list[str]]:
    """``(table, details, warnings)``; an empty table when no model has a trachea mask."""
    rows, details, warnings = [], {}, []
    for model, mc in model_cams.items():
        grid = grids.get(model)
        warn = gt.coarse_cam_warning(grid, model)
        if warn:
            warnings.append(warn)
        if "trachea" not in mc.masks:
            continue
        size = int(mc.cams.shape[-1])
        tol = gt.cell_tolerance_px(size, min(grid) if grid else None)
        s = gt.neck_scores(mc.cams, mc.labels, mc.masks, tolerance_px=tol)
        details[model] = {**s, "cam_grid": list(grid) if grid else None, "image_px": size}
        rows.append(
            {
                "model": model,
                "cam_grid": f"{grid[0]} x {grid[1]}" if grid else "?",
                "n_images": s["n"],
                "dilation_px": tol,
                "energy_share": s["energy_share"],
                "chance_share": s["chance_share"],
                "energy_ratio": s["energy_ratio"],
                "hit_rate": s["hit_rate"],
                "hit_chance": s["hit_chance"],
                "passes": s["passes"],
            }
        )
    return pd.DataFrame(rows), details, warnings


def neck_display(table: pd.DataFrame) -> pd.DataFrame:
    """Percentages, the ratio with two decimals, and the verdict against the bars in words."""
    shown = pd.DataFrame(
        {
            "model": table["model"],
            "CAM grid": table["cam_grid"],
            "images": table["n_images"],
            "masks grown by (px)": table["dilation_px"].map(lambda v: fmt(v, 1)),
            "CAM energy inside": table["energy_share"].map(_pct),
            "chance (area share)": table["chance_share"].map(_pct),
            f"ratio (bar >= {gt.NECK_ENERGY_RATIO_MIN:g})": table["energy_ratio"].map(
                lambda v: fmt(v, 2)
            ),
            f"CAM max inside (bar >= {gt.NECK_HIT_RATE_MIN:.0%})": table["hit_rate"].map(_pct),
            "chance": table["hit_chance"].map(_pct),
            "meets both bars": table["passes"].map(
                lambda v: "-" if v is None else ("yes" if v else "no")
            ),
        }
    )
    return shown


def _pct(v: Any) -> str:
    return fmt(100 * v) + "%" if finite(v) else "-"
