"""Do the CAMs look where the discriminative features were drawn? Scored against phantom truth.

The paper could only eyeball average CAMs ("neck activity is the main cue"). The built-in
phantom knows where it drew each feature (trachea, hot spots, heart, lungs, ...), so we can
measure it: the share of CAM energy inside a feature's mask (vs the share a uniform CAM would
get - the mask's area fraction), and the pointing game (does the CAM's peak land on the
feature?). Pure NumPy/SciPy; CAMs are grad-cam's non-negative maps, masks are bool and already
in the CAM's geometry (``PreparedData.masks`` / ``mask_<name>`` arrays in ``cams.npz``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from lung_cls.labels import CLASS_NAMES, class_name  # noqa: F401 - CLASS_NAMES re-exported
from lung_cls.runs import masks_of

log = logging.getLogger(__name__)

#: Which truth masks hold the evidence for each class. Names absent from the data are skipped
#: (and reported under "missing"), so the map can list every feature the phantom may draw.
DEFAULT_FEATURE_MAP: dict[int, list[str]] = {
    0: ["trachea", "oropharynx", "esophagus", "stomach", "hotspots"],
    1: ["heart", "lungs"],
}


def _check_cams(cams: Any) -> np.ndarray:
    c = np.asarray(cams, dtype=np.float64)
    if c.ndim != 3:
        raise ValueError(f"cams must have shape (N, H, W), got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("cams contain nan or inf")
    if c.size and c.min() < 0:
        raise ValueError(
            f"cams must be non-negative (grad-cam maps are), found min {c.min():.3g}: "
            "an energy share of a signed map is meaningless"
        )
    return c


def _check_masks(masks: Any, shape: tuple[int, ...], name: str = "masks") -> np.ndarray:
    m = np.asarray(masks)
    if m.shape != shape:
        raise ValueError(f"{name} shape {m.shape} does not match the CAMs' shape {shape}")
    if m.dtype != bool:
        if not np.all(np.isin(m, (0, 1))):
            raise ValueError(f"{name} must be boolean (or 0/1), dtype {m.dtype}")
        m = m.astype(bool)
    return m


def _dilate(mask: np.ndarray, tolerance_px: float) -> np.ndarray:
    """Mask grown by a Euclidean distance of ``tolerance_px`` pixels (a disc, not a square)."""
    if tolerance_px <= 0 or not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask) <= tolerance_px


def cam_energy_fraction(cams: Any, masks: Any) -> np.ndarray:
    """Share of each CAM's total value (its "energy") that falls inside the mask, shape (N,).

    Compare with :func:`chance_level`: a CAM spread evenly over the image scores exactly the
    mask's area fraction. ``nan`` where the mask is empty (the feature is not in that image) or
    the CAM is all zero (there is no energy to share).
    """
    c = _check_cams(cams)
    m = _check_masks(masks, c.shape)
    total = c.sum(axis=(1, 2))
    inside = np.where(m, c, 0.0).sum(axis=(1, 2))
    has_mask = m.any(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        share = inside / total
    return np.where(has_mask & (total > 0), share, np.nan)


def pointing_game(cams: Any, masks: Any, tolerance_px: float = 0) -> np.ndarray:
    """Does each CAM's peak fall inside the mask (grown by ``tolerance_px``)? Shape (N,).

    1.0 hit, 0.0 miss, ``nan`` for an empty mask. When several pixels share the maximum
    (float16 CAMs saturate at 1.0 on plateaus) the value is the fraction of those peak pixels
    inside the mask, rather than whichever one argmax happens to return first; for a flat CAM it
    is therefore the chance level. The mean over images is the hit rate.
    """
    c = _check_cams(cams)
    m = _check_masks(masks, c.shape)
    out = np.full(c.shape[0], np.nan)
    for i in range(c.shape[0]):
        if not m[i].any():
            continue
        peak = c[i] == c[i].max()
        target = _dilate(m[i], tolerance_px)
        out[i] = float(np.count_nonzero(peak & target)) / float(np.count_nonzero(peak))
    return out


def chance_level(masks: Any, tolerance_px: float = 0) -> np.ndarray:
    """Area fraction of each mask (grown by ``tolerance_px``), shape (N,); ``nan`` if empty.

    This is what a uniform CAM scores in :func:`cam_energy_fraction` (tolerance 0) and the
    expected pointing-game hit of a peak placed at random (with the same tolerance).
    """
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {m.shape}")
    m = _check_masks(m, m.shape)
    out = np.full(m.shape[0], np.nan)
    for i in range(m.shape[0]):
        if m[i].any():
            out[i] = float(_dilate(m[i], tolerance_px).mean())
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _summary(cams: np.ndarray, target: np.ndarray, tolerance_px: float) -> dict[str, Any]:
    energy = cam_energy_fraction(cams, target)
    chance = chance_level(target)
    hits = pointing_game(cams, target, tolerance_px)
    point_chance = chance_level(target, tolerance_px) if tolerance_px > 0 else chance
    return {
        "n_with_target": int(np.count_nonzero(target.any(axis=(1, 2)))),
        "energy_share": _nanmean(energy),
        "chance_share": _nanmean(chance),
        "pointing_hit_rate": _nanmean(hits),
        "pointing_chance": _nanmean(point_chance),
    }


def score_cams(
    cams: Any,
    labels: Any,
    masks: Mapping[str, Any],
    feature_map: Mapping[int, Sequence[str]] | None = None,
    tolerance_px: float = 0,
) -> dict[str, dict[str, Any]]:
    """Per class: how much of the CAMs lies on that class's truth features, vs chance.

    For each class label in ``feature_map`` (default :data:`DEFAULT_FEATURE_MAP`: ventilation ->
    neck/airway/stomach features, perfusion -> heart and lungs) the target of an image is the
    union of its listed masks that exist in ``masks``. Only images of that class, with a
    non-empty target, are scored. Means are over those images.

    Returns ``{class_name: {...}}`` with keys ``label``, ``targets`` (mask names used),
    ``missing`` (names asked for but not in ``masks``), ``n_images`` (of that class),
    ``n_with_target``, ``energy_share``, ``chance_share``, ``pointing_hit_rate``,
    ``pointing_chance``, and ``per_feature`` (the same five numbers for each target mask alone).
    Values are nan when no image qualifies.
    """
    c = _check_cams(cams)
    y = np.asarray(labels)
    if y.shape != (c.shape[0],):
        raise ValueError(f"labels shape {y.shape} does not match {c.shape[0]} CAMs")
    checked = {name: _check_masks(m, c.shape, f"mask {name!r}") for name, m in masks.items()}
    fmap = DEFAULT_FEATURE_MAP if feature_map is None else feature_map
    result: dict[str, dict[str, Any]] = {}
    for label, names in fmap.items():
        label = int(label)
        cls_name = class_name(label)
        present = [n for n in names if n in checked]
        missing = [n for n in names if n not in checked]
        if missing:
            log.info("score_cams: %s masks not available: %s", cls_name, missing)
        sel = y == label
        sub = c[sel]
        entry: dict[str, Any] = {
            "label": label,
            "targets": present,
            "missing": missing,
            "n_images": int(sel.sum()),
        }
        if present and sub.shape[0]:
            union = np.zeros(sub.shape, dtype=bool)
            for n in present:
                union |= checked[n][sel]
            entry.update(_summary(sub, union, tolerance_px))
            entry["per_feature"] = {
                n: _summary(sub, checked[n][sel], tolerance_px) for n in present
            }
        else:
            entry.update(
                n_with_target=0,
                energy_share=math.nan,
                chance_share=math.nan,
                pointing_hit_rate=math.nan,
                pointing_chance=math.nan,
                per_feature={},
            )
        result[cls_name] = entry
    return result


#: The truth masks among ``cams.npz`` arrays; the run-dir contract owns the ``mask_`` prefix.
masks_from_npz = masks_of


# --------------------------------------------------------------------------- the neck measure
#: The phantom's neck activity (the paper's main ventilation cue): trachea, oropharynx, oesophagus.
NECK_MASKS: tuple[str, ...] = ("trachea", "oropharynx", "esophagus")
#: The issue's bar for CAMs that "resolve anatomy": energy >= 2x the (dilated) masks' area share,
#: and the CAM maximum inside them in at least half the images.
NECK_ENERGY_RATIO_MIN = 2.0
NECK_HIT_RATE_MIN = 0.5
#: The paper's CAM resolution (224 px, stride 32): coarser maps get a warning in the report.
PAPER_CAM_GRID = 7


def cell_tolerance_px(image_size: int, grid: int | None) -> float:
    """Half a CAM cell in image pixels: a CAM cannot place a peak finer than its own cell."""
    if not grid or grid <= 0:
        return 0.0
    return 0.5 * float(image_size) / float(grid)


def neck_scores(
    cams: Any, labels: Any, masks: Mapping[str, Any], tolerance_px: float = 0.0
) -> dict[str, Any]:
    """The neck measure on the neck-positive ventilation images (trachea mask not empty).

    The target is the union of :data:`NECK_MASKS` present, grown by ``tolerance_px``. Returns
    ``n`` (images scored), ``energy_share`` and ``chance_share`` (the grown union's area share:
    what a flat CAM scores), ``energy_ratio``, ``hit_rate`` (CAM maximum inside the target, plateaus
    counted by share) and ``hit_chance`` (the same area share: a peak placed at random), and
    ``passes`` (both bars met). All nan and ``passes`` None when there is no such image or no
    trachea mask (not phantom data).
    """
    c = _check_cams(cams)
    y = np.asarray(labels).reshape(-1)
    present = [n for n in NECK_MASKS if n in masks]
    empty = {
        "n": 0,
        "tolerance_px": float(tolerance_px),
        "energy_share": math.nan,
        "chance_share": math.nan,
        "energy_ratio": math.nan,
        "hit_rate": math.nan,
        "hit_chance": math.nan,
        "passes": None,
    }
    if "trachea" not in present or y.shape != (c.shape[0],):
        return empty
    checked = {n: _check_masks(masks[n], c.shape, f"mask {n!r}") for n in present}
    sel = (y == 0) & checked["trachea"].any(axis=(1, 2))
    if not sel.any():
        return empty
    union = np.zeros((int(sel.sum()), *c.shape[1:]), dtype=bool)
    for n in present:
        union |= checked[n][sel]
    target = np.stack([_dilate(m, tolerance_px) for m in union])
    sub = c[sel]
    energy = _nanmean(cam_energy_fraction(sub, target))
    chance = _nanmean(chance_level(target))
    hits = _nanmean(pointing_game(sub, target))
    ratio = energy / chance if chance > 0 else math.nan
    return {
        **empty,
        "n": int(sel.sum()),
        "energy_share": energy,
        "chance_share": chance,
        "energy_ratio": ratio,
        "hit_rate": hits,
        "hit_chance": chance,
        "passes": bool(ratio >= NECK_ENERGY_RATIO_MIN and hits >= NECK_HIT_RATE_MIN),
    }


def coarse_cam_warning(grid: tuple[int, int] | None, model: str) -> str | None:
    """A warning line when a model's CAM feature map is coarser than the paper's 7 x 7."""
    if grid is None:
        return None
    h, w = int(grid[0]), int(grid[1])
    if min(h, w) >= PAPER_CAM_GRID:
        return None
    return (
        f"{model}: its CAMs come from a {h} x {w} feature map, coarser than the paper's "
        f"{PAPER_CAM_GRID} x {PAPER_CAM_GRID}: each map has only {h * w} independent values, "
        "so they cannot resolve the neck or the heart (use a larger input, model.cam_layer or "
        "model.output_stride)"
    )
