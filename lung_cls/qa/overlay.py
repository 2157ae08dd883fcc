"""The overlay a radiographer reads: the original study, the model's CAM on it, and who it is.

One PNG per study: left the study as acquired (its own matrix, not the 64 px model input),
right the same with the Grad-CAM of the predicted class mapped back onto it (pre-processing's
pad, resize and shift undone) with a colour bar; above them patient id, accession, study date,
series, declared and predicted class and the status in its colour; R / L at the image edges (from
PatientOrientation, else the anterior convention: the patient's right on the image left) and the
view (ANT) in the corner. Matplotlib's Agg canvas only (no pyplot state); written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STATUS_COLOURS = {
    "ok": "#1a7f37",
    "review": "#b58100",
    "mismatch": "#c62828",
    "rejected": "#1f4e9c",
    "error": "#7b1fa2",
}
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


def cam_to_study(cam: np.ndarray, info: Mapping[str, Any], shape: Sequence[int]) -> np.ndarray:
    """A CAM on the pre-processed (S, S) image -> the same map on the original (H, W) study.

    Pre-processing padded the study to a square of side L (top/left offsets ``pad``), resized it
    to S and shifted it by (``shift_y``, ``shift_x``); an original pixel (r, c) therefore sits at
    ((r + top + 0.5) S / L - 0.5 + shift_y, ...) of the CAM, sampled bilinearly (0 outside).
    """
    from scipy.ndimage import map_coordinates

    h, w = int(shape[0]), int(shape[1])
    s = cam.shape[0]
    side = float(info.get("square") or max(h, w))
    top, left = (info.get("pad") or (0, 0))[:2]
    rr = (np.arange(h) + float(top) + 0.5) * s / side - 0.5 + float(info.get("shift_y", 0.0))
    cc = (np.arange(w) + float(left) + 0.5) * s / side - 0.5 + float(info.get("shift_x", 0.0))
    yy, xx = np.meshgrid(rr, cc, indexing="ij")
    return map_coordinates(np.asarray(cam, np.float32), [yy, xx], order=1, cval=0.0)


def side_labels(orientation: Sequence[str] | None, view: str | None) -> tuple[str, str, str]:
    """(left edge, right edge, view marker): PatientOrientation's first value is the direction of
    the image's rows (towards the right edge); without it an anterior view shows the patient's
    right on the image left."""
    from lung_cls.data.sources import _is_anterior

    marker = "ANT" if (view is None or _is_anterior(view)) else str(view)[:12]
    if orientation:
        right = str(orientation[0]).strip().upper()[:1]
        if right in _OPPOSITE:
            return _OPPOSITE[right], right, marker
    return "R", "L", marker


def header_lines(row: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    """The text above the images: who, which study, what the model says, the verdict."""

    def v(x: Any) -> str:
        return str(x) if x not in (None, "") else "-"

    date = v(meta.get("study_date"))
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    prob = row.get("prob_perfusion")
    p = f"P(perfusion) {float(prob):.3f}" if prob is not None else ""
    sd = row.get("prob_sd")
    if sd:
        p += f" ± {float(sd):.3f}"
    return [
        f"{row.get('_rel') or row.get('file')}",
        f"patient {v(row.get('patient_id'))}   accession {v(meta.get('accession'))}   "
        f"study date {date}   series {v(meta.get('series_number'))} "
        f"{v(row.get('series_description'))}",
        f"declared {v(row.get('declared'))}   predicted {v(row.get('predicted'))}   {p}",
        f"{str(row.get('status')).upper()}",
    ]


def render_study_overlay(
    raw: np.ndarray,
    cam: np.ndarray,
    info: Mapping[str, Any],
    row: Mapping[str, Any],
    meta: Mapping[str, Any],
    path: str | Path,
    *,
    cam_class: str,
) -> Path:
    """Write the PNG (see the module docstring) and return its path."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from lung_cls.qa.decide import status_kind

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.asarray(raw, np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    on_study = np.clip(cam_to_study(np.asarray(cam, np.float32), info, img.shape), 0, 1)
    heat = colormaps["jet"](on_study)
    heat[..., 3] = 0.55 * on_study
    colour = STATUS_COLOURS.get(status_kind(row.get("status")), "black")
    left_lab, right_lab, marker = side_labels(meta.get("patient_orientation"), row.get("view"))

    fig = Figure(figsize=(7.2, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, title in zip(axes, ("study", f"Grad-CAM of {cam_class}"), strict=True):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
        style = dict(color="yellow", fontsize=10, fontweight="bold", transform=ax.transAxes)
        ax.text(0.02, 0.5, left_lab, ha="left", va="center", **style)
        ax.text(0.98, 0.5, right_lab, ha="right", va="center", **style)
        ax.text(0.02, 0.97, marker, ha="left", va="top", **style)
    axes[1].imshow(heat, interpolation="bilinear")
    bar = fig.colorbar(
        ScalarMappable(norm=Normalize(0, 1), cmap="jet"), ax=axes[1], fraction=0.046, pad=0.02
    )
    bar.set_label("CAM (relative)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    lines = header_lines(row, meta)
    fig.text(0.5, 0.985, "\n".join(lines[:3]), ha="center", va="top", fontsize=7.5)
    fig.text(0.5, 0.855, lines[3], ha="center", va="top", fontsize=9, color=colour,
             fontweight="bold")  # fmt: skip
    fig.subplots_adjust(left=0.02, right=0.93, bottom=0.02, top=0.8, wspace=0.05)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
