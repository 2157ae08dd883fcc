"""The paper's pre-processing, as pure functions, plus the cached data set built from it.

Steps (PAPER.md, "Pre-processing"), in this order:

1. pad a non-square image to a square (centred; the fill is the image's own minimum, which becomes
   0 after normalisation - "zero fill" in the normalised image), then resample to ``size`` x
   ``size`` with an anti-aliased bilinear resize (torch ``interpolate(antialias=True)`` on the
   whole batch: one call for 530 images);
2. min-max normalisation x 255 (float32 until the very end);
3. centring: threshold at ``threshold`` (>= 30 -> lung), connected components, the two largest
   components are the lungs if they pass plausibility checks (area, left/right arrangement,
   midpoint offset); the midpoint of their centres of mass is moved onto the image centre
   ((S - 1) / 2, (S - 1) / 2) with zero fill;
4. fallback where that is impossible: the mean image of the images centred in step 3, a seeded
   random search over translations maximising the normalised mutual information (NMI) with it
   (on a 56 x 56 copy), then a deterministic local pattern search at full size (2 and 1 px, then
   0.5 and 0.25 px steps).

Translations are sub-pixel by default (``subpixel: true``; bilinear, zero fill), so the midpoint
lands exactly on the centre; ``subpixel: false`` rounds the shift to whole pixels (no
interpolation at all). The shift applied is recorded per image as ``shift_y``/``shift_x`` in pixels
at the output size (positive = the content moved down/right).

Only NumPy/SciPy/torch here: no Hydra, no Lightning; configs are plain mappings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from scipy.special import entr

from lung_cls.data.masks import PackedMasks
from lung_cls.utils.io import atomic_savez

log = logging.getLogger(__name__)

PREP_DEFAULTS: dict[str, Any] = {
    "size": 224,
    "resize_mode": "bilinear",  # anti-aliased; "area" and "nearest" also accepted
    "threshold": 30.0,
    "connectivity": 1,  # 1: 4-neighbourhood (lungs touching at a corner stay apart), 2: 8
    "min_lung_area_frac": 0.015,
    "max_lung_area_frac": 0.3,
    "min_area_ratio": 0.25,
    "min_lung_separation_frac": 0.08,
    "max_lung_dy_frac": 0.2,
    "max_midpoint_offset_frac": 0.25,
    "subpixel": True,
    "nmi_trials": 128,
    "nmi_max_shift": 0.25,
    "nmi_bins": 32,
    "nmi_size": 56,
    "nmi_steps": [2.0, 1.0, 0.5, 0.25],
    "nmi_stride": 2,
    "seed": 0,
}
"""Defaults of every knob (the paper's values where it names one); conf/prep/paper.yaml mirrors it."""

CACHE_VERSION = 2  # 2: NMI-fallback images stored unshifted (nmi_moving)


def prep_config(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overlaid with ``cfg``; unknown keys are an error (a typo must not pass silently)."""
    out = dict(PREP_DEFAULTS)
    if cfg is None:
        return out
    for key in cfg:
        if key not in PREP_DEFAULTS:
            raise ValueError(
                f"unknown pre-processing option {key!r}; known: {sorted(PREP_DEFAULTS)}"
            )
        value = cfg[key]
        if key == "nmi_steps":
            value = [float(v) for v in value]
        out[key] = value
    if int(out["size"]) < 32:
        raise ValueError(f"preprocess size must be >= 32, got {out['size']}")
    return out


# --------------------------------------------------------------------------------------------------
# Geometry: pad, resize, normalise, translate
# --------------------------------------------------------------------------------------------------
def pad_to_square(
    image: np.ndarray, fill: float | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre a non-square image in a square (fill: the image minimum) -> (square, (top, left))."""
    h, w = image.shape[-2:]
    side = max(h, w)
    if h == w:
        return image, (0, 0)
    top, left = (side - h) // 2, (side - w) // 2
    value = float(image.min()) if fill is None else fill
    out = np.full(image.shape[:-2] + (side, side), value, dtype=image.dtype)
    out[..., top : top + h, left : left + w] = image
    return out, (top, left)


def resize_batch(images: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    """(N, H, W) float32 -> (N, size, size); anti-aliased so down-sampling does not alias noise."""
    if images.shape[-2:] == (size, size):
        return images.astype(np.float32, copy=False)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    with torch.no_grad():
        if mode == "bilinear":
            y = F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        elif mode == "area":
            y = F.interpolate(x, size=(size, size), mode="area")
        elif mode == "nearest":
            y = F.interpolate(x, size=(size, size), mode="nearest-exact")
        else:
            raise ValueError(f"resize_mode must be bilinear, area or nearest, got {mode!r}")
    return y[:, 0].numpy()


def minmax_255(images: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """Per-image min-max normalisation to 0..255 (float32). Constant images raise ValueError.

    ``inplace=True`` overwrites ``images`` (which must then be float32) instead of allocating a
    second copy of the set.
    """
    x = np.asarray(images, dtype=np.float32)
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    bad = np.flatnonzero(hi <= lo)
    if bad.size:
        raise ValueError(f"constant image(s) at index {bad.tolist()}: min == max, cannot normalise")
    scale = (np.float32(255.0) / (hi - lo)).astype(np.float32)
    out = np.subtract(x, lo[:, None, None], out=x if inplace else None, dtype=np.float32)
    out *= scale[:, None, None]
    return out


def _shift_int(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = img[y - dy, x - dx], zero outside."""
    h, w = img.shape[-2:]
    out = np.zeros_like(img)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = img[..., ys, xs]
    return out


def translate(image: np.ndarray, dy: float, dx: float, *, subpixel: bool = True) -> np.ndarray:
    """Move the content by (dy, dx) pixels with zero fill; bilinear for fractional shifts.

    Exact for whole-pixel shifts (pure slicing), so an integer translation never blurs.
    """
    img = np.asarray(image, dtype=np.float32)
    if not subpixel:
        return _shift_int(img, int(round(dy)), int(round(dx)))
    iy, ix = math.floor(dy), math.floor(dx)
    fy, fx = dy - iy, dx - ix
    if fy < 1e-9 and fx < 1e-9:
        return _shift_int(img, iy, ix)
    h, w = img.shape[-2:]
    # out[y, x] = sum of the four neighbours img[y - iy - {0,1}, x - ix - {0,1}]: windows of a
    # zero-padded copy, so each term is a view and the zero fill comes for free
    p = max(abs(iy), abs(ix)) + 2
    if p >= max(h, w) + 2:
        return np.zeros_like(img)
    padded = np.zeros(img.shape[:-2] + (h + 2 * p, w + 2 * p), np.float32)
    padded[..., p : p + h, p : p + w] = img
    out = None
    for oy, wy in ((0, 1.0 - fy), (1, fy)):
        for ox, wx in ((0, 1.0 - fx), (1, fx)):
            wgt = wy * wx
            if wgt <= 1e-9:
                continue
            y0, x0 = p - iy - oy, p - ix - ox
            term = padded[..., y0 : y0 + h, x0 : x0 + w]
            if out is None:
                out = term * np.float32(wgt)
            else:
                out += term * np.float32(wgt)
    return out


# --------------------------------------------------------------------------------------------------
# Lung detection (step 3)
# --------------------------------------------------------------------------------------------------
def detect_lungs(norm: np.ndarray, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Find the two lungs in one normalised (0..255) image.

    Returns ``ok``, ``reason`` (why not, for the log and the NMI fallback record), the binary mask,
    the component label image, the two chosen labels, their centres of mass ``centroids``
    ((y, x) each, the patient's right lung - image left - first) and their ``midpoint``.
    """
    c = {**PREP_DEFAULTS, **(dict(cfg) if cfg is not None else {})}
    h, w = norm.shape
    side = float(min(h, w))
    binary = norm >= float(c["threshold"])
    structure = ndi.generate_binary_structure(2, int(c["connectivity"]))
    labels, n = ndi.label(binary, structure=structure)
    out: dict[str, Any] = {
        "ok": False, "reason": "", "binary": binary, "labels": labels,
        "chosen": [], "centroids": None, "midpoint": None,
    }  # fmt: skip
    if n < 2:
        out["reason"] = f"{n} region(s) above the threshold: lungs not separable"
        return out
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64) / (h * w)
    order = np.argsort(-areas, kind="stable")
    if areas[order[0]] > float(c["max_lung_area_frac"]):
        out["reason"] = (
            f"largest region covers {areas[order[0]]:.1%} of the image (> max_lung_area_frac "
            f"{float(c['max_lung_area_frac']):.0%}): lungs merged"
        )
        return out
    a1, a2 = areas[order[0]], areas[order[1]]
    if a2 < float(c["min_lung_area_frac"]):
        out["reason"] = (
            f"second region covers only {a2:.1%} of the image (< min_lung_area_frac "
            f"{float(c['min_lung_area_frac']):.1%}): one lung region"
        )
        return out
    if a2 / a1 < float(c["min_area_ratio"]):
        out["reason"] = (
            f"lung regions too unequal (area ratio {a2 / a1:.2f} < {c['min_area_ratio']})"
        )
        return out
    chosen = [int(order[0]) + 1, int(order[1]) + 1]
    cents = np.empty((2, 2), dtype=np.float64)
    for k, lab in enumerate(chosen):  # centre of mass of the binary region (row/column sums)
        m = (labels == lab).view(np.uint8)
        area = float(np.count_nonzero(m))
        cents[k, 0] = np.add.reduce(m, axis=1, dtype=np.int32) @ np.arange(h) / area
        cents[k, 1] = np.add.reduce(m, axis=0, dtype=np.int32) @ np.arange(w) / area
    cents = cents[np.argsort(cents[:, 1])]  # image-left lung first
    dy, dx = abs(cents[1, 0] - cents[0, 0]), abs(cents[1, 1] - cents[0, 1])
    out["chosen"], out["centroids"] = chosen, cents
    mid = cents.mean(axis=0)
    out["midpoint"] = mid
    if dx < float(c["min_lung_separation_frac"]) * side:
        out["reason"] = f"regions not side by side (horizontal distance {dx:.1f} px)"
        return out
    if dy > float(c["max_lung_dy_frac"]) * side:
        out["reason"] = f"regions not side by side (vertical distance {dy:.1f} px)"
        return out
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    off = np.abs(mid - centre).max()
    if off > float(c["max_midpoint_offset_frac"]) * side:
        out["reason"] = (
            f"lung midpoint {off:.1f} px from the centre (> max_midpoint_offset_frac "
            f"{float(c['max_midpoint_offset_frac']):.0%} of the side)"
        )
        return out
    out["ok"] = True
    return out


# --------------------------------------------------------------------------------------------------
# Normalised mutual information (step 4)
# --------------------------------------------------------------------------------------------------
def _quantise(x: np.ndarray, bins: int) -> np.ndarray:
    """0..255 grey levels -> bin index 0..bins-1 (int32)."""
    return np.clip(
        (np.asarray(x, np.float32) * np.float32(bins / 256.0)).astype(np.int32), 0, bins - 1
    )


def _nmi_from_joint_codes(codes: np.ndarray, bins: int) -> np.ndarray:
    """(T, P) joint codes ``moving_bin * bins + ref_bin`` -> (T,) NMI; one bincount for all T.

    NMI = (H(A) + H(B)) / H(A, B) from the joint histogram (Studholme's normalisation).
    """
    t, p = codes.shape
    codes = codes + (np.arange(t, dtype=codes.dtype) * (bins * bins))[:, None]
    joint = np.bincount(codes.ravel(), minlength=t * bins * bins).reshape(t, bins, bins)
    pj = joint * (1.0 / p)
    hab = entr(pj).sum(axis=(1, 2))
    ha = entr(pj.sum(axis=2)).sum(axis=1)
    hb = entr(pj.sum(axis=1)).sum(axis=1)
    return (ha + hb) / np.maximum(hab, 1e-12)


def _nmi_from_codes(moving_q: np.ndarray, ref_q: np.ndarray, bins: int) -> np.ndarray:
    """(T, P) and (P,) bin indices -> (T,) NMI."""
    return _nmi_from_joint_codes(moving_q.astype(np.int32) * bins + ref_q[None], bins)


def nmi(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """NMI of two 0..255 images, histogram based: 1 (independent) .. 2 (one determines the other)."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"nmi: shapes differ {np.shape(a)} vs {np.shape(b)}")
    qa = _quantise(a, bins).ravel()
    qb = _quantise(b, bins).ravel()
    return float(_nmi_from_codes(qa[None], qb, bins)[0])


class _ShiftScorer:
    """NMI of a moving image, translated with zero fill, against a fixed reference.

    The moving image is zero-padded once; a whole-pixel shift is then a slice (no copy of the
    data, no interpolation), a fractional one a bilinear mix of four slices.
    """

    def __init__(
        self,
        moving: np.ndarray,
        reference: np.ndarray,
        bins: int,
        max_shift: float,
        stride: int = 1,
    ) -> None:
        self.h, self.w = moving.shape
        self.bins, self.stride = bins, int(stride)
        self.pad = int(math.ceil(max_shift)) + 2
        self.padded = np.pad(np.asarray(moving, np.float32), self.pad)
        self.padded_q = _quantise(self.padded, bins) * np.int32(bins)  # moving bin, pre-multiplied
        self.ref_q = _quantise(reference, bins)[:: self.stride, :: self.stride].ravel()
        self.n = self.ref_q.size

    def _window(self, src: np.ndarray, iy: int, ix: int) -> np.ndarray:
        """The moving image shifted by whole pixels, sampled every ``stride`` pixels (a view)."""
        y0, x0, st = self.pad - iy, self.pad - ix, self.stride
        return src[y0 : y0 + self.h : st, x0 : x0 + self.w : st]

    def score(self, shifts: np.ndarray) -> np.ndarray:
        shifts = np.clip(np.asarray(shifts, np.float64), -(self.pad - 2), self.pad - 2)
        rows = []
        for dy, dx in shifts:
            iy, ix = math.floor(dy), math.floor(dx)
            fy, fx = dy - iy, dx - ix
            if fy < 1e-9 and fx < 1e-9:
                rows.append(self._window(self.padded_q, iy, ix))
                continue
            acc = np.zeros(self.ref_q.size, np.float32).reshape(
                len(range(0, self.h, self.stride)), -1
            )
            for oy, wy in ((0, 1.0 - fy), (1, fy)):
                for ox, wx in ((0, 1.0 - fx), (1, fx)):
                    if wy * wx > 1e-9:
                        acc += np.float32(wy * wx) * self._window(self.padded, iy + oy, ix + ox)
            rows.append(_quantise(acc, self.bins) * np.int32(self.bins))
        out = []
        for start in range(0, len(rows), 64):  # bounded memory
            block = np.stack(rows[start : start + 64]).reshape(-1, self.n)
            block += self.ref_q
            out.append(_nmi_from_joint_codes(block, self.bins))
        return np.concatenate(out)


_NEIGHBOURS = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)], float)  # up, down, left, right


def _pattern_search(
    scorer: _ShiftScorer,
    start: np.ndarray,
    start_score: float,
    steps: Sequence[float],
    limit: float,
) -> tuple[np.ndarray, float]:
    """Deterministic local search: move to the best of the 4 neighbours while it improves."""
    best, best_score = np.asarray(start, float).copy(), float(start_score)
    for step in steps:
        for _ in range(64):
            cand = np.clip(best[None] + float(step) * _NEIGHBOURS, -limit, limit)
            sc = scorer.score(cand)
            j = int(np.argmax(sc))
            if sc[j] <= best_score + 1e-12:
                break
            best, best_score = cand[j].copy(), float(sc[j])
    return best, best_score


def nmi_search(
    image: np.ndarray,
    reference: np.ndarray,
    cfg: Mapping[str, Any] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[float, float, float, float]:
    """Translation of ``image`` (0..255) that maximises NMI with ``reference`` -> (dy, dx, nmi, nmi0).

    1. The paper's random search: ``nmi_trials`` uniform translations within +-``nmi_max_shift`` x
       side (plus no translation), scored on copies down-sampled to ``nmi_size`` (whole pixels of
       that grid, so each trial is a slice);
    2. a deterministic pattern search around the best at full resolution, with the steps of
       ``nmi_steps`` (px at full size; four neighbours per step until none improves). Steps below
       one pixel use bilinear sub-pixel shifts and only run with ``subpixel: true``.

    ``nmi0`` is the NMI without a shift, so the record shows what the search gained.
    """
    c = prep_config(cfg)
    rng = rng if rng is not None else np.random.default_rng(int(c["seed"]))
    s = int(image.shape[-1])
    bins = int(c["nmi_bins"])
    limit = float(c["nmi_max_shift"]) * s
    small = min(int(c["nmi_size"]), s)
    r = small / s
    # 1. random translations on the coarse grid
    pair = resize_batch(np.stack([image, reference]).astype(np.float32), small, "bilinear")
    coarse = _ShiftScorer(pair[0], pair[1], bins, limit * r)
    trials = np.rint(rng.uniform(-limit, limit, size=(int(c["nmi_trials"]), 2)) * r)
    cand = np.vstack([np.zeros((1, 2)), trials])
    sc = coarse.score(cand)
    j = int(np.argmax(sc))
    best_small, _ = _pattern_search(coarse, cand[j], float(sc[j]), [1.0], limit * r)
    # 2. local refinement at full resolution
    full = _ShiftScorer(image, reference, bins, limit, stride=int(c["nmi_stride"]))
    start = np.rint(best_small / r)
    s0 = full.score(np.vstack([np.zeros((1, 2)), start[None]]))
    steps = [float(v) for v in c["nmi_steps"] if float(v) >= 1.0 or bool(c["subpixel"])]
    best, best_score = _pattern_search(full, start, float(s0[1]), steps, limit)
    return float(best[0]), float(best[1]), best_score, float(s0[0])


# --------------------------------------------------------------------------------------------------
# The whole set
# --------------------------------------------------------------------------------------------------
def _square_and_resize(
    images: Sequence[np.ndarray], size: int, mode: str, chunk: int = 128
) -> tuple[np.ndarray, list[tuple[int, int]], list[int]]:
    """Pad each image to a square and resize, in batches of images of the same shape.

    Chunks of ``chunk`` images keep the float copies small (cache-friendly, bounded memory).
    """
    n = len(images)
    out = np.empty((n, size, size), dtype=np.float32)
    pads: list[tuple[int, int]] = [(0, 0)] * n
    sides: list[int] = [0] * n
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(np.shape(img)), []).append(i)
    for (h, w), idx in groups.items():
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            batch = np.empty((len(part), side, side), dtype=np.float32)
            for k, i in enumerate(part):
                img = np.asarray(images[i])
                if (h, w) != (side, side):
                    batch[k] = img.min()  # the background fill becomes 0 after min-max
                batch[k, top : top + h, left : left + w] = img
            out[part] = resize_batch(batch, size, mode)
        for i in idx:
            pads[i] = (top, left)
            sides[i] = side
    return out, pads, sides


def normalise_set(
    images: Sequence[np.ndarray], cfg: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, list[tuple[int, int]], list[int]]:
    """Steps 1-2 only: pad to square, resize, min-max x 255 -> (float32 (N, S, S), pads, sides).

    Shown on its own in the pre-processing figures (the image the threshold is applied to).
    """
    c = prep_config(cfg)
    resized, pads, sides = _square_and_resize(images, int(c["size"]), str(c["resize_mode"]))
    return minmax_255(resized, inplace=True), pads, sides


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Round 0..255 floats to the stored grey levels."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def preprocess_set(
    images: Sequence[np.ndarray],
    cfg: Mapping[str, Any] | None = None,
    *,
    reference: np.ndarray | None = None,
    timings: dict | None = None,
    chunk: int = 64,
    release: bool = False,
    moving_out: dict[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """The paper's pre-processing of a whole set -> (uint8 (N, S, S), per-image records).

    Records: ``method`` ("centroid", "nmi", or "none" when no image of the set could be centred by
    centroids and no ``reference`` mean image was given), ``shift_y``/``shift_x`` (px at S),
    ``reason`` (why the centroid method failed), ``centroids``/``midpoint`` (px at S, before the
    shift), ``nmi`` (after, NMI method), ``orig_shape``, ``pad`` and ``square`` (the geometry that
    `transform_mask` replays). ``reference``: a mean image to align NMI-fallback images to when
    the set itself has no centroid-centred image (e.g. a single image). ``timings``: filled with
    the seconds spent (benchmarks).

    Images go through steps 1-3 ``chunk`` at a time, straight into the uint8 result, so the float
    working copies stay small whatever the set size (the 530-image cohort at 224 px would need
    100 MB per float copy); only the images left for the NMI fallback keep a float copy. The
    result does not depend on ``chunk``. ``release=True`` (``images`` a list holding the only
    references) sets each entry to None once its chunk is resized, so the raw images are freed as
    the set is processed instead of all at the end. ``moving_out``: a dict filled with the
    normalised, not yet shifted image (float32 (S, S), 0..255) of every NMI-fallback image, so a
    caller can align them again to another reference (the training set's mean,
    `lung_cls.data.datamodule`).
    """
    c = prep_config(cfg)
    size = int(c["size"])
    n = len(images)
    if n == 0:
        return np.zeros((0, size, size), np.uint8), []
    for i, img in enumerate(images):
        a = np.asarray(img)
        if a.ndim != 2:
            raise ValueError(f"image {i}: expected 2-D, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"image {i}: contains NaN or Inf")
    t0 = time.perf_counter()
    subpixel = bool(c["subpixel"])
    centre = (size - 1) / 2.0
    out = np.empty((n, size, size), np.uint8)
    mean_sum = np.zeros((size, size), np.float64)
    n_centred = 0
    infos: list[dict] = []
    todo: dict[int, np.ndarray] = {}  # index -> its normalised float image (NMI fallback)
    chunk = max(1, int(chunk))
    for start in range(0, n, chunk):
        norm, pads, sides = normalise_set(images[start : start + chunk], c)
        shapes = [[int(v) for v in np.shape(images[start + k])] for k in range(len(norm))]
        if release:
            images[start : start + len(norm)] = [None] * len(norm)
        for k in range(len(norm)):
            i = start + k
            det = detect_lungs(norm[k], c)
            info: dict[str, Any] = {
                "method": "centroid", "shift_y": 0.0, "shift_x": 0.0, "reason": "",
                "centroids": None, "midpoint": None, "nmi": None,
                "orig_shape": shapes[k],
                "pad": [int(pads[k][0]), int(pads[k][1])], "square": int(sides[k]), "size": size,
            }  # fmt: skip
            if det["centroids"] is not None:
                info["centroids"] = np.round(det["centroids"], 3).tolist()
                info["midpoint"] = np.round(det["midpoint"], 3).tolist()
            if det["ok"]:
                dy, dx = centre - det["midpoint"][0], centre - det["midpoint"][1]
                if not subpixel:
                    dy, dx = float(round(dy)), float(round(dx))
                info["shift_y"], info["shift_x"] = float(dy), float(dx)
                centred = translate(norm[k], dy, dx, subpixel=subpixel)
                mean_sum += centred
                n_centred += 1
                out[i] = _to_uint8(centred)
            else:
                info["method"] = "nmi"
                info["reason"] = det["reason"]
                todo[i] = norm[k].copy()
            infos.append(info)
        del norm
    t1 = time.perf_counter()
    if moving_out is not None:
        moving_out.update({i: m.astype(np.float32) for i, m in todo.items()})
    if todo:
        if n_centred:
            mean = (mean_sum / n_centred).astype(np.float32)
        elif reference is not None:  # e.g. the training set's mean image (0..255), as it is
            mean = resize_batch(np.asarray(reference, np.float32)[None], size)[0]
        else:
            mean = None
        for i, moving in todo.items():
            if mean is None:
                infos[i]["method"] = "none"
                infos[i]["reason"] += "; no centroid-centred image to build the mean image from"
                out[i] = _to_uint8(moving)
                continue
            rng = np.random.default_rng([int(c["seed"]), i])
            dy, dx, score, score0 = nmi_search(moving, mean, c, rng)
            if not subpixel:
                dy, dx = float(round(dy)), float(round(dx))
            infos[i].update(
                shift_y=dy, shift_x=dx, nmi=round(score, 6), nmi_unshifted=round(score0, 6)
            )
            out[i] = _to_uint8(translate(moving, dy, dx, subpixel=subpixel))
    t2 = time.perf_counter()
    log.info(
        "Pre-processed %d images in %.2f s (centroid %d, NMI fallback %d in %.2f s)",
        n, t2 - t0, n - len(todo), len(todo), t2 - t1,
    )  # fmt: skip
    if timings is not None:
        timings.update(total_s=t2 - t0, centroid_s=t1 - t0, nmi_s=t2 - t1, n_nmi=len(todo))
    return out, infos


def transform_masks(
    masks: Sequence[np.ndarray] | np.ndarray, infos: Sequence[Mapping[str, Any]], size: int
) -> np.ndarray:
    """Replay each image's geometry (pad, resize, translate) on its mask: bool (N, H, W) -> (N, S, S).

    Resize and shift are done in float (bilinear), and thresholded once at 0.5, so the mask stays
    where the image content went. Empty masks are skipped (most feature masks are).
    """
    m = masks
    n = len(m)
    out = np.zeros((n, size, size), dtype=bool)
    nonempty = [i for i in range(n) if np.asarray(m[i]).any()]
    for start in range(0, len(nonempty), 128):
        idx = nonempty[start : start + 128]
        shapes = {tuple(np.shape(m[i])) for i in idx}
        for shape in shapes:
            sel = [i for i in idx if tuple(np.shape(m[i])) == shape]
            batch = np.stack([np.asarray(m[i], dtype=np.float32) for i in sel])
            batch, _ = pad_to_square(batch, fill=0.0)
            res = resize_batch(batch, size, "bilinear")
            for k, i in enumerate(sel):
                info = infos[i]
                moved = translate(res[k], float(info["shift_y"]), float(info["shift_x"]))
                out[i] = moved >= 0.5
    return out


def transform_mask(mask: np.ndarray, info: Mapping[str, Any], size: int) -> np.ndarray:
    """One mask (bool (H, W)) through its image's recorded geometry -> bool (size, size)."""
    return transform_masks(np.asarray(mask)[None], [info], size)[0]


# --------------------------------------------------------------------------------------------------
# The cached data set
# --------------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    """The pre-processed data set: everything training needs, in arrays (labels: -1 = unknown)."""

    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    ids: np.ndarray
    paths: np.ndarray
    info: list[dict]
    masks: Mapping[str, np.ndarray] | None = None  # a dict, or PackedMasks from the cache
    skipped: list[str] = field(default_factory=list)
    cache_file: str | None = None
    # NMI-fallback images before their shift: index -> float32 (S, S), to re-align them to a
    # training-only reference (the cohort mean they were first aligned to includes test images)
    nmi_moving: dict[int, np.ndarray] = field(default_factory=dict)
    # data.subgroup: the column's name and one category per image (str), or None for no subgroup
    subgroup_column: str | None = None
    subgroups: np.ndarray | None = None


def _code_hash() -> str:
    here = Path(__file__)
    h = hashlib.sha1()
    for name in ("preprocess.py", "sources.py", "masks.py", "subgroups.py"):
        f = here.with_name(name)
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(data_cfg: Mapping[str, Any], prep: Mapping[str, Any]) -> str:
    """Hash of what the prepared data depend on: the sources (stat only), the config, the code."""
    from lung_cls.data.sources import source_fingerprint

    payload = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(data_cfg),
        "prep": prep_config(prep),
        "code": _code_hash(),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def save_prepared(data: PreparedData, path: str | os.PathLike) -> None:
    """One uncompressed .npz (uint8 images, bit-packed masks): np.load reads it back in ms."""
    arrays: dict[str, np.ndarray] = {
        "images": data.images,
        "labels": data.labels,
        "patient_ids": data.patient_ids,
        "ids": data.ids,
        "paths": data.paths,
        "info_json": np.array(json.dumps(data.info)),
        "skipped": np.array(list(data.skipped), dtype=str),
        "nmi_index": np.array(sorted(data.nmi_moving), dtype=np.int64),
    }
    if data.subgroups is not None:
        arrays["subgroups"] = np.asarray(data.subgroups, dtype=str)
        arrays["subgroup_column"] = np.array(str(data.subgroup_column))
    if data.nmi_moving:
        arrays["nmi_moving"] = np.stack([data.nmi_moving[i] for i in sorted(data.nmi_moving)])
    if data.masks:
        arrays["mask_names"] = np.array(sorted(data.masks), dtype=str)
        for name in data.masks:
            if isinstance(data.masks, PackedMasks):  # already packed: no unpack/repack round trip
                arrays[f"mask_{name}"] = data.masks.packed(name)
            else:
                arrays[f"mask_{name}"] = np.packbits(data.masks[name], axis=-1)
    atomic_savez(path, compress=False, **arrays)


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Inverse of `save_prepared` (masks stay packed until used)."""
    with np.load(path, allow_pickle=False) as z:
        images = z["images"]
        masks = None
        if "mask_names" in z.files:
            packed = {str(name): z[f"mask_{name}"] for name in z["mask_names"]}
            masks = PackedMasks(packed, images.shape[-1])
        return PreparedData(
            images=images,
            labels=z["labels"],
            patient_ids=z["patient_ids"],
            ids=z["ids"],
            paths=z["paths"],
            info=json.loads(str(z["info_json"])),
            masks=masks,
            skipped=[str(s) for s in z["skipped"]],
            cache_file=str(path),
            nmi_moving=dict(zip(z["nmi_index"].tolist(), z["nmi_moving"], strict=True))
            if "nmi_moving" in z.files
            else {},
            subgroup_column=str(z["subgroup_column"]) if "subgroups" in z.files else None,
            subgroups=z["subgroups"] if "subgroups" in z.files else None,
        )


def _prep_from_data_cfg(data_cfg: Mapping[str, Any]) -> Mapping[str, Any] | None:
    try:
        return data_cfg["preprocess"]
    except (KeyError, AttributeError):
        return None


def _move_masks(
    studies: Sequence[Any], infos: Sequence[Mapping[str, Any]], size: int
) -> PackedMasks:
    """Each study's truth masks through its image's geometry, bit-packed -> `PackedMasks`.

    One mask name and ``chunk`` studies at a time, packed as soon as they are moved: the 14
    phantom masks of the 530-image cohort are 370 MB as bool arrays at 224 px and 47 MB packed
    (what the cache stores anyway), and the per-study masks (bit-packed themselves) are only
    unpacked a chunk at a time.
    """
    names = sorted({k for s in studies for k in s.truth["masks"]})
    n, chunk = len(studies), 64
    packed = {name: np.empty((n, size, (size + 7) // 8), np.uint8) for name in names}
    for name in names:
        for start in range(0, n, chunk):
            part = range(start, min(n, start + chunk))
            stack = [
                np.asarray(
                    studies[i].truth["masks"].get(name, np.zeros(infos[i]["orig_shape"], bool)),
                    dtype=bool,
                )
                for i in part
            ]
            moved = transform_masks(stack, [infos[i] for i in part], size)
            packed[name][start : part.stop] = np.packbits(moved, axis=-1)
    return PackedMasks(packed, size)


def build_prepared(
    data_cfg: Mapping[str, Any], prep: Mapping[str, Any] | None = None
) -> PreparedData:
    """Load the studies and pre-process them (no cache)."""
    from lung_cls.data.sources import load_studies

    c = prep_config(prep)
    studies, errors = load_studies(data_cfg)
    raw = [s.pixels for s in studies]
    for s in studies:
        s.pixels = None  # `raw` holds the only references: freed chunk by chunk below
    moving: dict[int, np.ndarray] = {}
    images, infos = preprocess_set(raw, c, release=True, moving_out=moving)
    del raw
    for s, info in zip(studies, infos, strict=True):
        if s.meta.get("duplicate_of"):
            info["duplicate_of"] = s.meta["duplicate_of"]
        for key in ("pixel_hash", "sop_instance_uid"):  # the QA check's "training image?" test
            if s.meta.get(key):
                info[key] = s.meta[key]
    masks = None
    if studies and all(s.truth is not None and s.truth.get("masks") for s in studies):
        masks = _move_masks(studies, infos, int(c["size"]))
    column, subgroups = _subgroups(data_cfg, studies, masks)
    return PreparedData(
        images=images,
        labels=np.array([-1 if s.label is None else int(s.label) for s in studies], np.int64),
        patient_ids=np.array([s.patient_id for s in studies], dtype=str),
        ids=np.array([s.id for s in studies], dtype=str),
        paths=np.array([s.path for s in studies], dtype=str),
        info=infos,
        masks=masks,
        skipped=[str(e) for e in errors],
        nmi_moving=moving,
        subgroup_column=column,
        subgroups=subgroups,
    )


def _subgroups(
    data_cfg: Mapping[str, Any], studies: Sequence[Any], masks: Mapping[str, np.ndarray] | None
) -> tuple[str | None, np.ndarray | None]:
    """``data.subgroup`` per image: the manifest column's values, or the phantom's neck truth
    (trachea mask non-empty after pre-processing, i.e. in the masks ``cams.npz`` stores)."""
    from lung_cls.data import subgroups as sg

    column = sg.subgroup_column(data_cfg)
    if column is None or not studies:
        return None, None
    if all(s.truth is not None for s in studies):  # the phantom
        return sg.PHANTOM_COLUMN, sg.from_masks(masks)
    return column, np.array([str(s.meta.get("subgroup", "")) for s in studies], dtype=str)


def prepare_dataset(
    data_cfg: Mapping[str, Any],
    cache_dir: str | os.PathLike | None,
    prep: Mapping[str, Any] | None = None,
) -> PreparedData:
    """The data set the config describes, pre-processed; cached under ``cache_dir``.

    The cache file ``prepared_<key>.npz`` is keyed by the sources (file paths, sizes, mtimes, or
    the phantom config and seed), the pre-processing config (``prep``, default
    ``data_cfg.preprocess``) and the code of this module and `sources`; a second call with the same
    inputs only reads the file. ``cache_dir=None`` disables caching. Phantom truth masks go through
    the same geometry as their images.
    """
    prep = prep if prep is not None else _prep_from_data_cfg(data_cfg)
    if cache_dir is None:
        return build_prepared(data_cfg, prep)
    key = cache_key(data_cfg, prep or {})
    path = Path(cache_dir) / f"prepared_{key}.npz"
    if path.exists():
        try:
            data = load_prepared(path)
            log.debug("Prepared data loaded from cache %s (%d images)", path, len(data.images))
            return data
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            log.warning("Cache %s unreadable (%s): rebuilding", path, err)
    data = build_prepared(data_cfg, prep)
    save_prepared(data, path)
    data.cache_file = str(path)
    log.info("Prepared data cached at %s", path)
    return data
