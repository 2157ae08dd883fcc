"""Built-in V/Q phantom: simulated anterior planar lung perfusion and ventilation scintigraphy.

No public planar V/Q data set can be downloaded, so the project ships a simulator as its default
data set. It has two jobs: make the perfusion-vs-ventilation task realistic (not trivial - the
paper's CNNs score 89-99 %), and know its own ground truth (every sampled parameter and a binary
mask of every discriminative feature), which no real data set offers. The truth lets the project
test its centring (known lung offset) and score where class activation maps look.

Model, in the order the image is made (all numbers live in ``conf/sim/paper.yaml``):

* **Geometry** (per patient): two lungs (tapered superellipses with a diaphragm dome), a
  mediastinal gap (rarely touching lungs), the heart impression on the image's right lung (the
  patient's left), cardiomegaly, the right hemidiaphragm higher in most people, a per-patient
  scale; per study a zoom, an offset and a small rotation in the camera field.
* **Intensity**: planar thickness profile ``thickness**e`` (perfusion sharper edges), gravity
  gradient (perfusion 2-4 upright, 1.1-1.5 supine; ventilation ~1.3), the right:left split
  (perfusion 52.5:47.5, aerosol L/R 0.87), mottling, patchy deposition and hilar deposition for
  aerosols, a soft-tissue background (DTPA clears through the alveolar wall).
* **Features**: ventilation - neck/trachea (exactly 111 of the paper's 136), oropharynx,
  esophagus, stomach, central airway hot spots (more in COPD); perfusion - mismatched wedge
  defects, MAA clumps, free pertechnetate (thyroid, stomach), right-to-left shunt (kidneys, brain),
  residual aerosol in the airways; shared per patient - matched defects, pleural effusion,
  shine-through of the earlier study when both are done the same day.
* **Camera**: Gaussian PSF (FWHM 7-12 mm) plus a broad scatter tail, the detector's rectangular
  field, Poisson counts (perfusion 300k-1M, DTPA 80k-400k, Technegas 150k-500k per view; the
  ranges overlap, so total counts are no shortcut after min-max normalisation), stored as uint16.

Sources: Cheng 2006 (perfusion split); XCAT (lung size); Jogi et al., J Nucl Med 2010;51:735
(DTPA vs Technegas); PIOPED (defect sizes); national V/Q guidelines (MAA activities, V/Q count-rate
ratio >= 3 when ventilation goes first). The rest are engineering estimates, marked in the yaml.

Determinism: cohort-level assignments come from ``default_rng([seed, 0])``; every patient has
its own generators ``default_rng([seed, 1, slot, k])``, so a patient's images do not depend on
the order in which the cohort is generated.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import fft as sfft
from threadpoolctl import threadpool_limits

from lung_cls.data.masks import PackedMasks
from lung_cls.labels import PERFUSION, VENTILATION
from lung_cls.utils.io import to_plain

log = logging.getLogger(__name__)

DEFAULT_SIM_PATH = Path(__file__).resolve().parents[2] / "conf" / "sim" / "paper.yaml"

#: Mask keys every case carries (all-False where the feature is absent).
MASK_KEYS: tuple[str, ...] = (
    "lungs",
    "heart",
    "trachea",
    "oropharynx",
    "esophagus",
    "stomach",
    "hotspots",
    "defects",
    "effusion",
    "clumps",
    "thyroid",
    "shunt",
    "residual_aerosol",
    "shine_through",
)
#: The discriminative / confounding features; ``params[key]`` is their present flag.
FEATURE_KEYS: tuple[str, ...] = MASK_KEYS[2:]

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass
class PhantomCase:
    """One simulated anterior image with its ground truth.

    ``params`` is json-able (flat: str, int, float, bool); ``offset_y``/``offset_x`` are the true
    offset in pixels of the midpoint of the two lung-mask centroids from the image centre
    ``((H - 1) / 2, (W - 1) / 2)``. Absent features have an all-False (shared, read-only) mask.
    ``masks`` is a dict of bool arrays, or the same mapping bit-packed (`PackedMasks`, from
    ``simulate_cohort(..., pack_masks=True)``).
    """

    id: str
    label: int
    patient_id: str
    image: np.ndarray
    params: dict[str, Any]
    masks: Mapping[str, np.ndarray] = field(repr=False)


# --------------------------------------------------------------------------------------------
# configuration


@lru_cache(maxsize=1)
def _default_sim_cached() -> dict:
    if not DEFAULT_SIM_PATH.is_file():
        raise FileNotFoundError(
            f"{DEFAULT_SIM_PATH}: default phantom config not found (the phantom reads its "
            "defaults from the repository's conf/sim/paper.yaml; pass a `sim` mapping instead)"
        )
    with DEFAULT_SIM_PATH.open() as fh:
        return yaml.safe_load(fh)


def default_sim() -> dict:
    """The paper-like simulator settings (``conf/sim/paper.yaml``), as a fresh plain dict."""
    return copy.deepcopy(_default_sim_cached())


def _merge(base: dict, over: Mapping, where: str = "sim") -> dict:
    """Overlay `over` on `base`; an unknown key is an error (a typo must not pass silently)."""
    out = dict(base)
    for k, v in over.items():
        if k not in out:
            raise ValueError(f"{where}.{k}: unknown phantom setting (see conf/sim/paper.yaml)")
        if isinstance(v, Mapping) and isinstance(out[k], Mapping):
            out[k] = _merge(out[k], v, f"{where}.{k}")
        else:
            out[k] = v
    return out


def resolve_sim(sim: Mapping | None = None) -> dict:
    """Defaults from ``conf/sim/paper.yaml`` overlaid with ``sim`` (a partial mapping is fine)."""
    cfg = default_sim()
    if sim is not None:
        cfg = _merge(cfg, to_plain(sim))
    d = float(cfg.get("difficulty", 0.5))
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"sim.difficulty must be in [0, 1], got {d}")
    if int(cfg.get("size", 256)) < 64:
        raise ValueError(f"sim.size must be >= 64 pixels, got {cfg.get('size')}")
    return cfg


# --------------------------------------------------------------------------------------------
# small sampling helpers


def _u(rng: np.random.Generator, r: Sequence[float]) -> float:
    return float(rng.uniform(float(r[0]), float(r[1])))


def _ri(rng: np.random.Generator, r: Sequence[int]) -> int:
    return int(rng.integers(int(r[0]), int(r[1]) + 1))


def _lerp(pair: Sequence[float], d: float) -> float:
    return float(pair[0]) + (float(pair[1]) - float(pair[0])) * d


def _n_exact(p: float, n: int) -> int:
    return int(math.floor(min(max(p, 0.0), 1.0) * n + 0.5))


def _exact_flags(
    rng: np.random.Generator,
    n: int,
    p: float,
    among: np.ndarray | None = None,
    k: int | None = None,
) -> np.ndarray:
    """Exactly round(p * n) True entries (or k), drawn without replacement (from `among`)."""
    out = np.zeros(n, dtype=bool)
    idx = np.arange(n) if among is None else np.flatnonzero(among)
    k = _n_exact(p, n) if k is None else k
    k = min(k, idx.size)
    if k > 0:
        out[rng.choice(idx, size=k, replace=False)] = True
    return out


def _counts(rng: np.random.Generator, spec: Mapping) -> float:
    lo, hi = (float(x) for x in spec["range"])
    sigma = (math.log(hi) - math.log(lo)) / 4.0
    return float(np.clip(float(spec["median"]) * math.exp(sigma * rng.standard_normal()), lo, hi))


# --------------------------------------------------------------------------------------------
# the pixel grid of one study pose


@lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


@lru_cache(maxsize=4)
def _empty_mask(size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m.flags.writeable = False
    return m


Window = tuple[slice, slice]


class _Frame:
    """Reference-patient coordinates of every pixel of one pose (mm; u: image right, v: caudal).

    Positive ``rot`` turns the patient clockwise as displayed. Shapes are evaluated on windows
    (the bounding box of their support) so a small feature costs a small amount of work.
    """

    def __init__(self, size: int, mm_px: float, scale: float, oy: float, ox: float, rot: float):
        yy, xx = _pixel_grid(size)
        self.size = size
        self.mm_px = mm_px
        self.k = mm_px / scale
        self.c = (size - 1) / 2.0
        self.oy, self.ox = oy, ox
        th = math.radians(rot)
        self.cos, self.sin = math.cos(th), math.sin(th)
        dy = yy - np.float32(self.c + oy)
        dx = xx - np.float32(self.c + ox)
        cs, sn = np.float32(self.cos * self.k), np.float32(self.sin * self.k)
        self.u = cs * dx + sn * dy
        self.v = cs * dy - sn * dx

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        dx = (self.cos * u - self.sin * v) / self.k
        dy = (self.sin * u + self.cos * v) / self.k
        return self.c + self.oy + dy, self.c + self.ox + dx

    def window(self, u0: float, u1: float, v0: float, v1: float) -> Window | None:
        """Pixel bounding box of the patient-space rectangle [u0, u1] x [v0, v1] (None: outside)."""
        big = 1e5
        pts = [
            self.to_pixel(u, v)
            for u in (max(u0, -big), min(u1, big))
            for v in (max(v0, -big), min(v1, big))
        ]
        ys = [p[0] for p in pts]
        xs = [p[1] for p in pts]
        y0, y1 = max(int(math.floor(min(ys))) - 1, 0), min(int(math.ceil(max(ys))) + 2, self.size)
        x0, x1 = max(int(math.floor(min(xs))) - 1, 0), min(int(math.ceil(max(xs))) + 2, self.size)
        if y0 >= y1 or x0 >= x1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def blob(
        self,
        u0: float,
        v0: float,
        su: float,
        sv: float,
        tilt_deg: float = 0.0,
        power: float = 2.0,
        reach: float = 3.5,
    ) -> tuple[Window | None, np.ndarray]:
        """exp(-0.5 r**power) on its window; power > 2 flattens the top, tilt turns the axes."""
        r = reach * max(su, sv)
        win = self.window(u0 - r, u0 + r, v0 - r, v0 + r)
        if win is None:
            return None, np.zeros((0, 0), np.float32)
        du, dv = self.u[win] - np.float32(u0), self.v[win] - np.float32(v0)
        if tilt_deg:
            t = math.radians(tilt_deg)
            ct, st = np.float32(math.cos(t)), np.float32(math.sin(t))
            du, dv = du * ct + dv * st, dv * ct - du * st
        r2 = (du * np.float32(1.0 / su)) ** 2 + (dv * np.float32(1.0 / sv)) ** 2
        if power != 2.0:
            r2 = r2 ** np.float32(power / 2.0)
        return win, np.exp(np.float32(-0.5) * r2)

    def segment(
        self, p0: tuple[float, float], p1: tuple[float, float], sigma: float
    ) -> tuple[Window | None, np.ndarray]:
        """Gaussian tube of width sigma around the segment p0-p1 (u, v)."""
        (u0, v0), (u1, v1) = p0, p1
        r = 4.0 * sigma
        win = self.window(min(u0, u1) - r, max(u0, u1) + r, min(v0, v1) - r, max(v0, v1) + r)
        if win is None:
            return None, np.zeros((0, 0), np.float32)
        uu, vv = self.u[win], self.v[win]
        du, dv = u1 - u0, v1 - v0
        ll = max(du * du + dv * dv, 1e-6)
        t = np.clip(((uu - u0) * du + (vv - v0) * dv) * np.float32(1.0 / ll), 0.0, 1.0)
        d2 = (uu - (u0 + t * du)) ** 2 + (vv - (v0 + t * dv)) ** 2
        return win, np.exp(d2 * np.float32(-0.5 / sigma**2))

    def full_mask(self, win: Window | None, m: np.ndarray) -> np.ndarray:
        out = np.zeros((self.size, self.size), bool)
        if win is not None:
            out[win] = m
        return out


def _psf_gain(sigma_mm: float, psf_sigma_mm: float) -> float:
    """Height factor so a Gaussian blob keeps its intended peak after the camera blur."""
    return (sigma_mm**2 + psf_sigma_mm**2) / sigma_mm**2


# --------------------------------------------------------------------------------------------
# geometry


def _sample_geometry(
    rng: np.random.Generator, cfg: dict, *, touching: bool, right_higher: bool, cardiomegaly: bool
) -> dict:
    g = cfg["geometry"]
    cam = cfg["camera"]
    size = int(cfg["size"])
    geo: dict[str, Any] = {}
    geo["scale"] = _u(rng, g["scale"])
    geo["width_mm"] = _u(rng, g["lungs_width_mm"])
    geo["height_mm"] = _u(rng, g["lungs_height_mm"])
    geo["touching"] = touching
    geo["gap_mm"] = _u(rng, g["touching_gap_mm"] if touching else g["mediastinum_gap_mm"])
    geo["apex_taper"] = _u(rng, g["apex_taper"])
    geo["dome_mm"] = _u(rng, g["dome_mm"])
    geo["right_higher"] = right_higher
    # positive: the right hemidiaphragm is higher (mm)
    geo["hemidiaphragm_mm"] = (
        _u(rng, g["right_higher_mm"]) if right_higher else -_u(rng, g["left_higher_mm"])
    )
    geo["cardiomegaly"] = cardiomegaly
    cm = _u(rng, g["cardiomegaly_scale"]) if cardiomegaly else 1.0
    geo["heart_factor"] = cm
    geo["heart_a_mm"] = float(g["heart_semi_axes_mm"][0]) * cm * _u(rng, g["heart_size_jitter"])
    geo["heart_b_mm"] = float(g["heart_semi_axes_mm"][1]) * cm * _u(rng, g["heart_size_jitter"])
    geo["heart_shift_mm"] = _u(rng, g["heart_shift_mm"]) * cm
    geo["heart_tilt_deg"] = _u(rng, g["heart_tilt_deg"])
    geo["heart_transmission"] = _u(rng, g["heart_transmission"])
    geo["body_half_width_mm"] = _u(rng, g["body_half_width_mm"])
    geo["neck_half_width_mm"] = _u(rng, g["neck_half_width_mm"])
    base_mm_px = float(cam["field_mm"][0]) / size
    target_px = _u(rng, cam["lung_height_px"]) * size / 256.0
    zoom = target_px * base_mm_px / (geo["height_mm"] * geo["scale"])
    geo["zoom"] = float(np.clip(zoom, *[float(z) for z in cam["zoom"]]))
    geo["mm_px"] = base_mm_px / geo["zoom"]
    return geo


def _sample_pose(rng: np.random.Generator, cfg: dict) -> dict:
    g = cfg["geometry"]
    lim = float(g["offset_max_mm"])
    oy = float(np.clip(rng.normal(0.0, float(g["offset_sd_mm"][0])), -lim, lim))
    ox = float(np.clip(rng.normal(0.0, float(g["offset_sd_mm"][1])), -lim, lim))
    rl = float(g["rotation_max_deg"])
    rot = float(np.clip(rng.normal(0.0, float(g["rotation_sd_deg"])), -rl, rl))
    return {"oy_mm": oy, "ox_mm": ox, "rotation_deg": rot}


def _jitter_pose(rng: np.random.Generator, cfg: dict, pose: dict) -> dict:
    """The same patient on another day: a nearby position (the "offset family")."""
    g = cfg["geometry"]
    sd, lim = float(g["redo_jitter_mm"]), float(g["offset_max_mm"])
    rl = float(g["rotation_max_deg"])
    return {
        "oy_mm": float(np.clip(pose["oy_mm"] + rng.normal(0, sd), -lim, lim)),
        "ox_mm": float(np.clip(pose["ox_mm"] + rng.normal(0, sd), -lim, lim)),
        "rotation_deg": float(
            np.clip(pose["rotation_deg"] + rng.normal(0, float(g["redo_jitter_deg"])), -rl, rl)
        ),
    }


def _frame(cfg: dict, geo: dict, pose: dict) -> _Frame:
    mm_px = geo["mm_px"]
    return _Frame(
        int(cfg["size"]),
        mm_px,
        geo["scale"],
        pose["oy_mm"] / mm_px,
        pose["ox_mm"] / mm_px,
        pose["rotation_deg"],
    )


def _lung_boxes(geo: dict) -> dict[int, dict[str, float]]:
    """Per lung (side -1: patient's right = image left; +1: patient's left) its extent in mm."""
    w_each = (geo["width_mm"] - geo["gap_mm"]) / 2.0
    h = geo["height_mm"]
    top = -0.473 * h  # puts the mean lung-centroid midpoint at the patient origin
    out = {}
    for side in (-1, 1):
        # the higher hemidiaphragm shortens that lung from below
        hd = geo["hemidiaphragm_mm"]
        raise_mm = max(hd, 0.0) if side < 0 else max(-hd, 0.0)
        bottom = top + h - raise_mm
        out[side] = {
            "a": w_each / 2.0,
            "uc": side * (geo["gap_mm"] / 2.0 + w_each / 2.0),
            "top": top,
            "bottom": bottom,
            "b": (bottom - top) / 2.0,
            "vc": (bottom + top) / 2.0,
        }
    return out


def _anatomy(fr: _Frame, geo: dict) -> dict[str, Any]:
    """Lung thickness maps (on windows), lung and heart masks and the heart attenuation."""
    size = fr.size
    boxes = _lung_boxes(geo)
    thick: dict[int, tuple[Window, np.ndarray]] = {}
    shape: dict[int, np.ndarray] = {}
    t0 = geo["apex_taper"]
    for side, bx in boxes.items():
        win = fr.window(
            bx["uc"] - 1.02 * bx["a"], bx["uc"] + 1.02 * bx["a"], bx["top"] - 2, bx["bottom"] + 2
        )
        full = np.zeros((size, size), bool)
        if win is None:
            shape[side] = full
            continue
        X = (fr.u[win] - np.float32(bx["uc"])) * np.float32(1.0 / bx["a"])
        Y = (fr.v[win] - np.float32(bx["vc"])) * np.float32(1.0 / bx["b"])
        Yc = np.clip(Y, -1.0, 1.0)
        taper = np.float32(t0) + np.float32(1 - t0) * np.sqrt((Yc + 1.0) * np.float32(0.5))
        Xt = np.abs(X / taper)
        medial = (X * -side) > 0
        aY = np.abs(Y)
        # straighter medial border (mediastinum), rounder lateral border, round apex, flat base
        f = np.where(medial, Xt**4, Xt**2.2) + np.where(Y < 0, aY**2.2, aY**6)
        base = np.float32(bx["bottom"]) - np.float32(geo["dome_mm"]) * (
            1.0 - np.clip(X, -1.0, 1.0) ** 2
        )
        below = np.clip((base - fr.v[win]) * np.float32(1.0 / 12.0), 0.0, 1.0)
        tau = np.sqrt(np.clip(1.0 - f, 0.0, 1.0) * below)
        thick[side] = (win, tau)
        full[win] = tau > 0.05
        shape[side] = full
    # heart impression: medial-lower part of the patient's left lung (image right)
    hu = geo["gap_mm"] / 2.0 + geo["heart_shift_mm"] - 5.0
    hv = boxes[1]["bottom"] - 0.6 * geo["heart_b_mm"]
    hwin, hb = fr.blob(
        hu, hv, geo["heart_a_mm"], geo["heart_b_mm"], geo["heart_tilt_deg"], power=4.0, reach=1.3
    )
    heart = fr.full_mask(hwin, hb > math.exp(-0.5))
    att = np.ones((size, size), np.float32)
    if hwin is not None:
        att[hwin] = 1.0 - np.float32(1.0 - geo["heart_transmission"]) * np.clip(
            (hb - np.float32(0.45)) * np.float32(4.0), 0, 1
        )
    lung_r = shape[-1] & ~heart
    lung_l = shape[1] & ~heart
    return {
        "boxes": boxes,
        "thick": thick,
        "shape": shape,
        "lung": {-1: lung_r, 1: lung_l},
        "lungs": lung_r | lung_l,
        "heart": heart,
        "heart_att": att,
    }


@lru_cache(maxsize=64)
def _gauss_matrix(n_fine: int, n_coarse: int, sigma_q: int) -> np.ndarray:
    """Fine x coarse Gaussian interpolation weights (sigma in quarter pixels, for caching)."""
    f = n_fine / n_coarse
    centres = (np.arange(n_coarse) + 0.5) * f - 0.5
    d = np.arange(n_fine)[:, None] - centres[None, :]
    s = sigma_q / 4.0
    g = np.exp(-0.5 * (d / s) ** 2)
    g[g < 1e-7] = 0.0  # no float32 denormals: they make BLAS crawl
    g = g.astype(np.float32)
    g.flags.writeable = False
    return g


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Unit-variance smooth Gaussian noise: coarse white noise through Gaussian interpolation."""
    sigma_px = max(float(sigma_px), 1.0)
    f = int(np.clip(int(sigma_px), 2, 8))
    n = -(-size // f)
    g = _gauss_matrix(size, n, max(int(round(sigma_px * 4)), 4))
    z = g @ rng.standard_normal((n, n)).astype(np.float32) @ g.T
    z -= z.mean()
    z *= np.float32(1.0 / (z.std() + 1e-12))
    return z


def _wedge(
    fr: _Frame, anat: dict, rng: np.random.Generator, cfg: dict
) -> tuple[Window | None, np.ndarray]:
    """A pleural-based segmental wedge: the peripheral part of a sector from the hilum.

    Returns the weight (0..1, soft edges) on the lung's window; the defect removes
    ``depth * weight`` of the activity, and its mask is weight > 0.5 inside the lung.
    """
    ds = cfg["features"]["defect_shape"]
    side = int(rng.choice([-1, 1]))
    bx = anat["boxes"][side]
    hu = bx["uc"] - side * 0.45 * bx["a"]
    hv = bx["vc"] - 0.1 * bx["b"]
    theta = math.radians(_u(rng, cfg["placement"]["defect_direction_deg"]))  # 0 = lateral
    half = math.radians(_u(rng, ds["angle_deg"])) / 2.0
    inner = _u(rng, ds["inner_mm"])
    if side not in anat["thick"]:
        return None, np.zeros((0, 0), np.float32)
    win, _ = anat["thick"][side]
    du = (fr.u[win] - np.float32(hu)) * side
    dv = fr.v[win] - np.float32(hv)
    ang = np.arctan2(dv, du) - np.float32(theta)
    ang = (ang + np.float32(math.pi)) % np.float32(2 * math.pi) - np.float32(math.pi)
    soft_ang = np.float32(math.radians(4.0))
    w_ang = np.clip((np.float32(half) - np.abs(ang)) / soft_ang + 0.5, 0.0, 1.0)
    w_rad = np.clip((np.hypot(du, dv) - np.float32(inner)) * np.float32(1.0 / 8.0) + 0.5, 0, 1)
    return win, w_ang * w_rad * anat["shape"][side][win]


def _effusion(fr: _Frame, anat: dict, eff: dict) -> np.ndarray:
    """Pleural fluid at one lung base, the meniscus higher laterally."""
    side = eff["side"]
    bx = anat["boxes"][side]
    xl = np.clip((fr.u - np.float32(bx["uc"])) * (side / bx["a"]), -1.0, 1.0)
    level = np.float32(bx["bottom"]) - np.float32(eff["height_mm"]) * (0.45 + 0.275 * (xl + 1))
    return (fr.v > level) & anat["shape"][side]


def _body(fr: _Frame, anat: dict, geo: dict) -> np.ndarray:
    """Soft-tissue thickness profile of torso and neck (0..1)."""
    shoulder = anat["boxes"][-1]["top"] - 15.0
    bw, nw = geo["body_half_width_mm"], geo["neck_half_width_mm"]
    inv = np.where(fr.v > np.float32(shoulder), np.float32(1.0 / bw), np.float32(1.0 / nw))
    return np.sqrt(np.clip(1.0 - (fr.u * inv) ** 2, 0.0, 1.0))


def _lungs_activity(
    fr: _Frame,
    anat: dict,
    *,
    edge_exp: float,
    gradient: float,
    fractions: dict[int, float],
    factor: np.ndarray,
) -> np.ndarray:
    """Lung activity (thickness**e, gravity gradient, x factor), lung-mask mean 1."""
    total = np.zeros((fr.size, fr.size), np.float32)
    n_lung = max(int(anat["lungs"].sum()), 1)
    for side, (win, tau) in anat["thick"].items():
        bx = anat["boxes"][side]
        t = np.clip((fr.v[win] - np.float32(bx["top"])) * np.float32(1.0 / (2 * bx["b"])), 0, 1)
        a = tau ** np.float32(edge_exp) * (1.0 + np.float32(gradient - 1.0) * t)
        a *= factor[win]
        s = float(a.sum())
        if s > 0:
            total[win] += a * np.float32(fractions[side] * n_lung / s)
    return total


# --------------------------------------------------------------------------------------------
# one study: noise-free activity + masks


class _Canvas:
    """Accumulates a study's activity: lungs/background and features apart (for shine-through)."""

    def __init__(self, fr: _Frame):
        self.fr = fr
        self.base = np.zeros((fr.size, fr.size), np.float32)
        self.feat = np.zeros((fr.size, fr.size), np.float32)
        self.masks: dict[str, np.ndarray] = {}

    def add(
        self, key: str, win: Window | None, vals: np.ndarray, amp: float, thresh: float
    ) -> None:
        if win is None:
            return
        self.feat[win] += np.float32(amp) * vals
        m = self.masks.get(key)
        if m is None:
            m = self.masks[key] = np.zeros((self.fr.size, self.fr.size), bool)
        m[win] |= vals > thresh


def _class_look(
    label: int,
    fr: _Frame,
    anat: dict,
    cfg: dict,
    flags: dict,
    rng: np.random.Generator,
    cls_k: float,
    hv: float,
    par: dict[str, Any],
) -> np.ndarray:
    """The planar look of one class: gradient, edges, left/right split, texture, background.

    ``class_contrast`` (``cls_k``) pulls the two classes towards a common middle. Returns the
    per-pixel activity factor; the sampled values go into ``par``.
    """
    pl = cfg["placement"]
    size = fr.size
    boxes = anat["boxes"]
    pc, vc = cfg["perfusion"], cfg["ventilation"]
    e_mid = 0.5 * (float(np.mean(pc["edge_exponent"])) + float(np.mean(vc["edge_exponent"])))
    g_mid = 0.5 * (float(np.mean(pc["gradient_upright"])) + float(np.mean(vc["gradient"])))
    bg_mid = 0.5 * (float(np.mean(pc["background"])) + float(np.mean(vc["background"])))
    factor = anat["heart_att"].copy()
    if label == PERFUSION:
        supine = bool(flags["supine"])
        g = _u(rng, pc["gradient_supine"] if supine else pc["gradient_upright"])
        if not supine:
            g = g_mid + (g - g_mid) * cls_k
        e = _u(rng, pc["edge_exponent"])
        rs = pc["right_fraction"]
        rf = float(np.clip(rng.normal(rs["mean"], rs["sd"]), 0.4, 0.65))
        tex_sd = _u(rng, pc["heterogeneity"])
        factor *= _texture(rng, size, tex_sd, 6.0 / fr.mm_px)
        bg = _u(rng, pc["background"])
        par.update(agent="MAA", central_deposition=0.0)
    else:
        agent = "technegas" if flags["technegas"] else "dtpa"
        g = g_mid + (_u(rng, vc["gradient"]) - g_mid) * cls_k
        e = _u(rng, vc["edge_exponent"])
        lr = vc["left_right_ratio"]
        ratio = float(np.clip(rng.normal(lr["mean"], lr["sd"]), 0.5, 1.3))
        rf = 1.0 / (1.0 + ratio)
        tex_sd = _u(rng, vc["patchiness"][agent]) * (1.6 if flags["copd"] else 1.0) * cls_k
        factor *= _texture(rng, size, tex_sd, _u(rng, vc["patch_size_mm"]) / fr.mm_px / 2.0)
        bg = _u(rng, vc["background"])
        cd = _u(rng, vc["central_deposition"][agent]) * cls_k
        for side in (-1, 1):
            bx = boxes[side]
            win, b = fr.blob(bx["uc"] - side * 0.35 * bx["a"], hv, *pl["hilar_blob_mm"])
            if win is not None:
                factor[win] *= 1.0 + np.float32(cd) * b
        par.update(agent="Technegas" if flags["technegas"] else "DTPA", central_deposition=cd)
    e = float(np.clip(e_mid + (e - e_mid) * cls_k, 0.15, 1.2))
    bg = max(bg_mid + (bg - bg_mid) * cls_k, 0.0)
    g = max(g, 1.0)
    par.update(gradient=g, edge_exponent=e, right_fraction=rf, texture_sd=tex_sd, background=bg)
    return factor


def _defects_and_effusion(
    label: int,
    fr: _Frame,
    anat: dict,
    cfg: dict,
    flags: dict,
    shared: dict,
    rng: np.random.Generator,
    factor: np.ndarray,
    cv: _Canvas,
    par: dict[str, Any],
) -> None:
    """Wedge defects (the patient's matched ones + perfusion-only mismatched ones) and pleural
    effusion, cut out of ``factor``; their masks go onto the canvas."""
    size = fr.size
    specs = list(shared["matched_defects"])
    if label == PERFUSION and flags["mismatched_defects"]:
        fs = cfg["features"]["perfusion"]["mismatched_defects"]
        ds = cfg["features"]["defect_shape"]
        for _ in range(_ri(rng, fs["n"])):
            specs.append({"seed": int(rng.integers(2**31)), "depth": _u(rng, ds["depth"])})
    if specs:
        dm = np.zeros((size, size), bool)
        for sp in specs:  # seeded per wedge: a matched defect is the same in both studies
            win, w = _wedge(fr, anat, np.random.default_rng(sp["seed"]), cfg)
            if win is not None:
                factor[win] *= 1.0 - np.float32(sp["depth"]) * w
                dm[win] |= w > 0.5
        cv.masks["defects"] = dm & anat["lungs"]
    par["n_defects"] = len(specs)
    if shared["effusion"] is not None:
        em = _effusion(fr, anat, shared["effusion"])
        factor[em] *= np.float32(shared["effusion"]["transmission"])
        cv.masks["effusion"] = em & anat["lungs"]


class _Features:
    """Paints the class features (extra activity outside the lung pattern) onto a canvas.

    The neck midline and the stomach's place are drawn once per study, in this order, before any
    feature: both classes may use them (ventilation: trachea, swallowed aerosol; perfusion: free
    pertechnetate, residual aerosol).
    """

    def __init__(self, fr: _Frame, cv: _Canvas, anat: dict, geo: dict, cfg: dict,
                 rng: np.random.Generator, psf_sigma: float, feat_k: float) -> None:  # fmt: skip
        self.fr, self.cv, self.anat, self.geo, self.rng = fr, cv, anat, geo, rng
        self.pl = pl = cfg["placement"]
        self.cfg, self.psf_sigma, self.feat_k = cfg, psf_sigma, feat_k
        boxes = self.boxes = anat["boxes"]
        self.top = top = min(b["top"] for b in boxes.values())
        self.hv = 0.5 * (boxes[-1]["vc"] + boxes[1]["vc"]) - 0.15 * boxes[1]["b"]  # hilum level
        self.neck_u = float(rng.normal(0.0, float(pl["midline_sd_mm"])))
        self.carina_v = top + float(pl["carina_level"]) * (boxes[-1]["bottom"] - top)
        self.st_uv = (
            geo["gap_mm"] / 2.0 + boxes[1]["a"] * _u(rng, pl["stomach_lateral"]),
            boxes[1]["bottom"] + _u(rng, pl["stomach_below_mm"]),
        )
        self.st_tilt = _u(rng, pl["stomach_tilt_deg"])

    def peak(self, amp: float, sig_mm: float) -> float:
        """Amplitude before the camera blur that peaks at ``amp`` after it."""
        return amp * _psf_gain(sig_mm, self.psf_sigma)

    def trachea(self, key: str, amp: float, width_mm: float, fade_mm: float) -> None:
        fr, pl, top, neck_u, carina_v = self.fr, self.pl, self.top, self.neck_u, self.carina_v
        sig = width_mm * _FWHM_TO_SIGMA
        win = fr.window(neck_u - 4 * sig, neck_u + 4 * sig, -1e4, carina_v)
        if win is None:
            return
        uu, vv = fr.u[win], fr.v[win]
        prof = np.exp(np.float32(-0.5 / sig**2) * (uu - np.float32(neck_u)) ** 2)
        fade = np.clip((np.float32(carina_v) - vv) * np.float32(1.0 / fade_mm), 0.0, 1.0)
        # the neck part (above the apices) is brighter than the intrathoracic part
        neck = np.where(vv < np.float32(top), np.float32(pl["neck_gain"]), np.float32(1.0))
        self.cv.feat[win] += np.float32(self.peak(amp, sig)) * prof * fade * neck
        m = self.cv.masks.setdefault(key, np.zeros((fr.size, fr.size), bool))
        m[win] |= (prof > 0.3) & (fade > 0.1)

    def stomach(self, amp: float) -> None:
        pl = self.pl
        win, b = self.fr.blob(*self.st_uv, *pl["stomach_semi_axes_mm"], self.st_tilt,
                              power=4.0, reach=2.0)  # fmt: skip
        self.cv.add("stomach", win, b, amp, 0.5)

    def ventilation(self, flags: dict, par: dict[str, Any]) -> None:
        fr, cv, rng, pl, geo, boxes = self.fr, self.cv, self.rng, self.pl, self.geo, self.boxes
        top, neck_u, hv, feat_k = self.top, self.neck_u, self.hv, self.feat_k
        fv = self.cfg["features"]["ventilation"]
        if flags["trachea"]:
            s = fv["trachea"]
            amp = _u(rng, s["amplitude"]) * feat_k
            self.trachea("trachea", amp, _u(rng, s["width_mm"]), _u(rng, s["fade_mm"]))
        if flags["oropharynx"]:
            ov = top - _u(rng, pl["oropharynx_above_apex_mm"])
            su, sv = (_u(rng, r) for r in pl["oropharynx_semi_axes_mm"])
            win, b = fr.blob(neck_u, ov, su, sv)
            cv.add("oropharynx", win, b, _u(rng, fv["oropharynx"]["amplitude"]) * feat_k, 0.5)
        if flags["stomach"]:
            self.stomach(_u(rng, fv["stomach"]["amplitude"]) * feat_k)
        if flags["esophagus"]:
            s = fv["esophagus"]
            sig = _u(rng, s["width_mm"]) * _FWHM_TO_SIGMA
            gej = (geo["gap_mm"] / 2.0 + 8.0, boxes[1]["bottom"] + 5.0)
            start = (neck_u + 3.0, top - float(pl["esophagus_top_above_apex_mm"]))
            win, seg = fr.segment(start, gej, sig)
            cv.add("esophagus", win, seg, self.peak(_u(rng, s["amplitude"]) * feat_k, sig), 0.5)
        if flags["hotspots"]:
            s = fv["hotspots"]
            n = _ri(rng, s["n"])
            for _ in range(n):
                side = int(rng.choice([-1, 1]))
                u0 = side * (geo["gap_mm"] / 2.0 + _u(rng, pl["airway_medial_mm"]))
                v0 = hv + _u(rng, pl["airway_level_mm"])
                sg = _u(rng, s["sigma_mm"])
                win, b = fr.blob(u0, v0, sg, sg)
                cv.add("hotspots", win, b, self.peak(_u(rng, s["amplitude"]) * feat_k, sg), 0.2)
            par["n_hotspots"] = n

    def perfusion(self, flags: dict, par: dict[str, Any], body: np.ndarray) -> None:
        fr, cv, rng, pl, geo, boxes = self.fr, self.cv, self.rng, self.pl, self.geo, self.boxes
        top, neck_u, hv, feat_k = self.top, self.neck_u, self.hv, self.feat_k
        fp = self.cfg["features"]["perfusion"]
        if flags["clumps"]:
            s = fp["clumps"]
            n = _ri(rng, s["n"])
            idx = np.flatnonzero(self.anat["lungs"])
            for _ in range(n if idx.size else 0):
                p = int(rng.choice(idx))
                u0, v0 = float(fr.u.flat[p]), float(fr.v.flat[p])
                sg = _u(rng, s["sigma_mm"])
                win, b = fr.blob(u0, v0, sg, sg)
                cv.add("clumps", win, b, self.peak(_u(rng, s["amplitude"]) * feat_k, sg), 0.2)
            par["n_clumps"] = n
        if flags["free_pertechnetate"]:
            s = fp["free_pertechnetate"]
            amp = _u(rng, s["thyroid_amplitude"]) * feat_k
            tv = top - _u(rng, pl["thyroid_above_apex_mm"])
            tsu, tsv = pl["thyroid_semi_axes_mm"]
            for side in (-1, 1):
                tu = neck_u + side * _u(rng, pl["thyroid_lateral_mm"])
                win, b = fr.blob(tu, tv, tsu, tsv)
                cv.add("thyroid", win, b, self.peak(amp, math.sqrt(tsu * tsv)), 0.4)
            self.stomach(_u(rng, s["stomach_amplitude"]) * feat_k)
        if flags["shunt"]:
            s = fp["shunt"]
            ka = _u(rng, s["kidney_amplitude"]) * feat_k
            for side in (-1, 1):
                kv = boxes[side]["bottom"] + _u(rng, pl["kidney_below_mm"])
                ku = side * _u(rng, pl["kidney_lateral_mm"])
                win, b = fr.blob(ku, kv, *pl["kidney_semi_axes_mm"])
                cv.add("shunt", win, b, ka, 0.4)
            bv = top - _u(rng, pl["brain_above_apex_mm"])
            win, b = fr.blob(0.0, bv, *pl["brain_semi_axes_mm"])
            cv.add("shunt", win, b, _u(rng, s["brain_amplitude"]) * feat_k, 0.4)
            cv.feat += np.float32(_u(rng, s["background"])) * body
        if flags["residual_aerosol"]:
            s = fp["residual_aerosol"]
            width, fade = _u(rng, s["width_mm"]), _u(rng, s["fade_mm"])
            self.trachea("residual_aerosol", _u(rng, s["amplitude"]), width, fade)
            for _ in range(_ri(rng, s["n_hotspots"])):
                side = int(rng.choice([-1, 1]))
                u0 = side * (geo["gap_mm"] / 2.0 + _u(rng, pl["airway_medial_mm"]))
                sg = _u(rng, s["hotspot_sigma_mm"])
                win, b = fr.blob(u0, hv + _u(rng, pl["airway_level_mm"]), sg, sg)
                amp = self.peak(_u(rng, s["hotspot_amplitude"]), sg)
                cv.add("residual_aerosol", win, b, amp, 0.2)


def _render_study(
    label: int,
    fr: _Frame,
    anat: dict,
    geo: dict,
    cfg: dict,
    d: float,
    flags: dict,
    shared: dict,
    rng: np.random.Generator,
) -> tuple[_Canvas, dict[str, Any]]:
    """Noise-free activity (lung mean 1), feature masks and sampled parameters of one study.

    The draws from ``rng`` come in a fixed order (blur, class look, defects, feature places,
    features): the same seed gives the same study.
    """
    eff = cfg["difficulty_effects"]
    cv = _Canvas(fr)
    par: dict[str, Any] = {}
    fwhm = _u(rng, cfg["camera"]["fwhm_mm"]) * _lerp(eff["blur"], d)
    psf_sigma = fwhm * _FWHM_TO_SIGMA
    par["fwhm_mm"] = fwhm
    boxes = anat["boxes"]
    hv = 0.5 * (boxes[-1]["vc"] + boxes[1]["vc"]) - 0.15 * boxes[1]["b"]  # hilum level
    cls_k = _lerp(eff["class_contrast"], d)
    factor = _class_look(label, fr, anat, cfg, flags, rng, cls_k, hv, par)
    _defects_and_effusion(label, fr, anat, cfg, flags, shared, rng, factor, cv, par)
    rf = par["right_fraction"]
    cv.base += _lungs_activity(
        fr, anat, edge_exp=par["edge_exponent"], gradient=par["gradient"],
        fractions={-1: rf, 1: 1 - rf}, factor=factor,
    )  # fmt: skip
    body = _body(fr, anat, geo)
    cv.base += np.float32(par["background"]) * body
    features = _Features(fr, cv, anat, geo, cfg, rng, psf_sigma, _lerp(eff["feature_contrast"], d))
    if label == VENTILATION:
        features.ventilation(flags, par)
    else:
        features.perfusion(flags, par, body)
    par["psf_sigma_mm"] = psf_sigma
    return cv, par


def _texture(rng: np.random.Generator, size: int, sd: float, sigma_px: float) -> np.ndarray:
    z = _smooth_noise(rng, size, sigma_px)
    return np.exp(np.float32(sd) * z - np.float32(sd * sd / 2.0))


# --------------------------------------------------------------------------------------------
# camera


@lru_cache(maxsize=4)
def _freq2(n: int) -> np.ndarray:
    fy = sfft.fftfreq(n).astype(np.float32)
    fx = sfft.rfftfreq(n).astype(np.float32)
    return fy[:, None] ** 2 + fx[None, :] ** 2


def _camera_blur(act: np.ndarray, sigma_px: float, tail_px: float, tail_frac: float) -> np.ndarray:
    """Gaussian PSF (FFT, zero padded) plus a broad scatter tail (on a 4x coarser grid)."""
    size = act.shape[0]
    pad = int(math.ceil(3.5 * sigma_px))
    n = sfft.next_fast_len(size + 2 * pad, real=True)
    buf = np.zeros((n, n), np.float32)
    buf[:size, :size] = act
    h = np.exp(np.float32(-2.0 * math.pi**2 * sigma_px**2) * _freq2(n))
    h[h < 1e-7] = 0.0  # no float32 denormals (slow arithmetic)
    out = sfft.irfft2(sfft.rfft2(buf) * h, s=(n, n))[:size, :size]
    out *= np.float32(1.0 - tail_frac)
    f = 4 if size % 4 == 0 else 1
    coarse = act.reshape(size // f, f, size // f, f).sum(axis=(1, 3))
    g = _gauss_matrix(size, size // f, max(int(round(tail_px * 4)), 4))
    # each coarse pixel spreads its counts with a unit-mass 2-D Gaussian on the fine grid
    norm = np.float32(1.0 / (2.0 * math.pi * tail_px**2))
    out += np.float32(tail_frac) * norm * (g @ coarse @ g.T)
    return np.maximum(out, 0.0)


def _field_of_view(size: int, mm_px: float, field_mm: Sequence[float]) -> np.ndarray:
    c = (size - 1) / 2.0
    r = np.abs(np.arange(size) - c) * mm_px
    rows = r <= float(field_mm[1]) / 2.0
    cols = r <= float(field_mm[0]) / 2.0
    return (rows[:, None] & cols[None, :]).astype(np.float32)


def _lung_offset(lung: dict[int, np.ndarray], size: int) -> tuple[float, float]:
    """Midpoint of the two lung-mask centroids, relative to the image centre (pixels)."""
    c = (size - 1) / 2.0
    yy, xx = _pixel_grid(size)
    cents = []
    for m in lung.values():
        n = int(m.sum())
        if n:
            cents.append((float(yy[m].sum()) / n, float(xx[m].sum()) / n))
    if not cents:
        return 0.0, 0.0
    return float(np.mean([p[0] for p in cents])) - c, float(np.mean([p[1] for p in cents])) - c


def _finish(
    label: int,
    act: np.ndarray,
    fr: _Frame,
    geo: dict,
    cfg: dict,
    d: float,
    rng: np.random.Generator,
    par: dict,
) -> tuple[np.ndarray, dict]:
    """Camera: blur + scatter, detector field, Poisson counts -> uint16."""
    cam = cfg["camera"]
    mm_px = geo["mm_px"]
    tail_mm = _u(rng, cam["scatter_sigma_mm"])
    tail_frac = _u(rng, cam["scatter_fraction"])
    blurred = _camera_blur(act, par["psf_sigma_mm"] / mm_px, tail_mm / mm_px, tail_frac)
    blurred *= _field_of_view(fr.size, mm_px, cam["field_mm"])
    if label == PERFUSION:
        spec = cam["counts"]["perfusion"]
    else:
        spec = cam["counts"]["technegas" if par["agent"] == "Technegas" else "dtpa"]
    n_counts = _counts(rng, spec) * _lerp(cfg["difficulty_effects"]["counts"], d)
    s = float(blurred.sum(dtype=np.float64))
    lam = blurred * np.float32(n_counts / s) if s > 0 else blurred
    img = np.minimum(rng.poisson(lam), np.iinfo(np.uint16).max).astype(np.uint16)
    return img, {
        "scatter_sigma_mm": tail_mm,
        "scatter_fraction": tail_frac,
        "counts_expected": n_counts,
        "counts": int(img.sum(dtype=np.int64)),
        "max_count": int(img.max()),
    }


# --------------------------------------------------------------------------------------------
# the cohort


def _plan(cfg: dict, n_p: int, n_v: int, seed: int, d: float) -> dict:
    """Cohort-level assignments: who is paired and which image gets which feature (exact counts)."""
    rng = np.random.default_rng([seed, 0])
    co, geo = cfg["cohort"], cfg["geometry"]
    fv, fp, fs = (cfg["features"][k] for k in ("ventilation", "perfusion", "shared"))
    conf_k = _lerp(cfg["difficulty_effects"]["confusion_prob"], d)
    n_paired = min(_n_exact(float(co["p_paired"]), n_v), n_p)
    n_pat = n_v + n_p - n_paired
    pids = [f"PH{int(i) + 1:04d}" for i in rng.permutation(n_pat)]
    v = {"trachea": _exact_flags(rng, n_v, float(fv["trachea"]["p"]))}
    # oropharynx and esophagus are neck activity too: only where the trachea shows
    v["oropharynx"] = _exact_flags(rng, n_v, float(fv["oropharynx"]["p"]), among=v["trachea"])
    v["esophagus"] = _exact_flags(rng, n_v, float(fv["esophagus"]["p"]), among=v["trachea"])
    v["stomach"] = _exact_flags(rng, n_v, float(fv["stomach"]["p"]))
    v["technegas"] = _exact_flags(rng, n_v, float(cfg["ventilation"]["p_technegas"]))
    v["copd"] = _exact_flags(rng, n_v, float(cfg["ventilation"]["p_copd"]))
    hs = fv["hotspots"]
    n_copd = int(v["copd"].sum())
    k_copd, k_rest = _n_exact(float(hs["p_copd"]), n_copd), _n_exact(float(hs["p"]), n_v - n_copd)
    v["hotspots"] = _exact_flags(rng, n_v, 0.0, among=v["copd"], k=k_copd) | _exact_flags(
        rng, n_v, 0.0, among=~v["copd"], k=k_rest
    )
    q = {"supine": _exact_flags(rng, n_p, float(cfg["perfusion"]["p_supine"]))}
    for k in ("mismatched_defects", "clumps", "free_pertechnetate", "shunt"):
        q[k] = _exact_flags(rng, n_p, float(fp[k]["p"]))
    q["residual_aerosol"] = _exact_flags(rng, n_p, float(fp["residual_aerosol"]["p"]) * conf_k)
    pat = {
        "touching": _exact_flags(rng, n_pat, float(geo["p_touching"])),
        "right_higher": _exact_flags(rng, n_pat, float(geo["p_right_higher"])),
        "cardiomegaly": _exact_flags(rng, n_pat, float(geo["p_cardiomegaly"])),
        "matched_defects": _exact_flags(rng, n_pat, float(fs["matched_defects"]["p"])),
        "effusion": _exact_flags(rng, n_pat, float(fs["effusion"]["p"])),
    }
    pair = {
        "same_day": _exact_flags(rng, n_paired, float(co["p_same_day"]) * conf_k),
        "ventilation_first": _exact_flags(rng, n_paired, float(co["p_ventilation_first"])),
    }
    return {"n_paired": n_paired, "n_patients": n_pat, "pids": pids, "v": v, "q": q,
            "patient": pat, "pair": pair}  # fmt: skip


def cohort_plan(
    sim: Mapping | None, n_perfusion: int, n_ventilation: int, seed: int
) -> dict[str, Any]:
    """The cohort-level draws of `simulate_cohort`, without rendering a pixel (cheap).

    Keys: ``n_patients``, ``n_paired``, ``pids`` (per patient slot; slots < n_ventilation have a
    ventilation image, slots < n_paired or >= n_ventilation a perfusion image), and boolean
    arrays ``v`` (per ventilation image: trachea, oropharynx, esophagus, stomach, technegas,
    copd, hotspots), ``q`` (per perfusion image: supine, mismatched_defects, clumps,
    free_pertechnetate, shunt, residual_aerosol), ``patient`` (touching, right_higher,
    cardiomegaly, matched_defects, effusion) and ``pair`` (same_day, ventilation_first).
    """
    cfg = resolve_sim(sim)
    return _plan(cfg, int(n_perfusion), int(n_ventilation), int(seed), float(cfg["difficulty"]))


def _patient_draws(slot: int, plan: dict, cfg: dict, seed: int, n_v: int) -> dict[str, Any]:
    """What one patient's studies share: anatomy, shared defects and effusion, poses, pairing.

    Drawn from the patient's own generator, in a fixed order, so a patient is the same whatever
    else the cohort holds and however many threads simulate it.
    """
    n_paired = plan["n_paired"]
    has_v = slot < n_v
    has_q = slot < n_paired or slot >= n_v
    fs = cfg["features"]["shared"]
    ds = cfg["features"]["defect_shape"]
    g_rng = np.random.default_rng([seed, 1, slot, 2])
    pf = {k: bool(a[slot]) for k, a in plan["patient"].items()}
    geo = _sample_geometry(
        g_rng,
        cfg,
        touching=pf["touching"],
        right_higher=pf["right_higher"],
        cardiomegaly=pf["cardiomegaly"],
    )
    shared: dict[str, Any] = {"matched_defects": [], "effusion": None}
    if pf["matched_defects"]:
        for _ in range(_ri(g_rng, fs["matched_defects"]["n"])):
            shared["matched_defects"].append(
                {"seed": int(g_rng.integers(2**31)), "depth": _u(g_rng, ds["depth"])}
            )
    if pf["effusion"]:
        shared["effusion"] = {
            "side": int(g_rng.choice([-1, 1])),
            "height_mm": _u(g_rng, fs["effusion"]["height_mm"]),
            "transmission": _u(g_rng, fs["effusion"]["transmission"]),
        }
    paired = has_v and has_q
    same_day = bool(plan["pair"]["same_day"][slot]) if paired else False
    pose_v = _sample_pose(g_rng, cfg)
    # same day: the patient stays on the table; another day: a nearby position
    pose_q = pose_v if same_day else _jitter_pose(g_rng, cfg, pose_v)
    return {
        "pid": plan["pids"][slot],
        "has_v": has_v,
        "has_q": has_q,
        "qi": slot if slot < n_paired else slot - n_v + n_paired,  # index among perfusion images
        "geo": geo,
        "shared": shared,
        "paired": paired,
        "same_day": same_day,
        "v_first": bool(plan["pair"]["ventilation_first"][slot]) if paired else False,
        "pose": {VENTILATION: pose_v, PERFUSION: pose_q},
        "shine_frac": _u(g_rng, cfg["cohort"]["shine_fraction"]) if same_day else 0.0,
    }


def _add_shine_through(studies: dict[int, dict], pt: dict, cfg: dict, size: int) -> int:
    """The second of two same-day studies shows the first one's activity too; returns its label."""
    later, earlier = (PERFUSION, VENTILATION) if pt["v_first"] else (VENTILATION, PERFUSION)
    st_l, st_e = studies[later]["cv"], studies[earlier]["cv"]
    # airway and neck deposits clear (mucociliary, swallowing) before the second study
    clear = float(cfg["cohort"]["shine_feature_clearance"])
    shine = np.float32(pt["shine_frac"])
    st_l.base = st_l.base + shine * (st_e.base + np.float32(clear) * st_e.feat)
    sm = np.zeros((size, size), bool)
    for k, m in st_e.masks.items():
        if k in FEATURE_KEYS and k not in ("defects", "effusion"):
            sm |= m
    st_l.masks["shine_through"] = sm
    return later


def _case_params(
    label: int, st: dict, pt: dict, d: float, offset: tuple[float, float], is_later: bool
) -> dict[str, Any]:
    """Every sampled parameter of one image, flat, before the camera's and the study's own."""
    geo, flags, pose, shared = pt["geo"], st["flags"], st["pose"], pt["shared"]
    same_day = pt["same_day"]
    return {
        "id": st["case_id"],
        "label": label,
        "modality": "perfusion" if label == PERFUSION else "ventilation",
        "patient_id": pt["pid"],
        "paired": pt["paired"],
        "same_day": same_day,
        "order": ("second" if is_later else "first") if same_day else "separate",
        "difficulty": d,
        "offset_y": offset[0],
        "offset_x": offset[1],
        "pose_offset_y_mm": pose["oy_mm"],
        "pose_offset_x_mm": pose["ox_mm"],
        "rotation_deg": pose["rotation_deg"],
        "scale": geo["scale"],
        "zoom": geo["zoom"],
        "pixel_mm": geo["mm_px"],
        "lungs_width_mm": geo["width_mm"],
        "lungs_height_mm": geo["height_mm"],
        "gap_mm": geo["gap_mm"],
        "touching": geo["touching"],
        "hemidiaphragm_mm": geo["hemidiaphragm_mm"],
        "cardiomegaly": geo["cardiomegaly"],
        "heart_factor": geo["heart_factor"],
        "supine": flags.get("supine", False),
        "technegas": flags.get("technegas", False),
        "copd": flags.get("copd", False),
        "n_hotspots": 0,
        "n_clumps": 0,
        "mismatched_defects": flags.get("mismatched_defects", False),
        "matched_defects": len(shared["matched_defects"]),
        "free_pertechnetate": flags.get("free_pertechnetate", False),
        "shine_fraction": pt["shine_frac"] if is_later else 0.0,
    }


def _drawn_flags(flags: dict, params: dict, shared: dict, is_later: bool) -> dict[str, bool]:
    """Per FEATURE_KEYS name: was the feature drawn in this image (its mask is empty otherwise)."""
    drawn = {
        "trachea": flags.get("trachea", False),
        "oropharynx": flags.get("oropharynx", False),
        "esophagus": flags.get("esophagus", False),
        "stomach": flags.get("stomach", False) or flags.get("free_pertechnetate", False),
        "hotspots": flags.get("hotspots", False),
        "defects": params["n_defects"] > 0,
        "effusion": shared["effusion"] is not None,
        "clumps": flags.get("clumps", False),
        "thyroid": flags.get("free_pertechnetate", False),
        "shunt": flags.get("shunt", False),
        "residual_aerosol": flags.get("residual_aerosol", False),
        "shine_through": is_later,
    }
    return {k: bool(drawn[k]) for k in FEATURE_KEYS}


def _simulate_patient(
    slot: int, plan: dict, cfg: dict, d: float, seed: int, n_v: int
) -> list[PhantomCase]:
    """Both studies of one patient (or the one it has), from the patient's own generators."""
    size = int(cfg["size"])
    pt = _patient_draws(slot, plan, cfg, seed, n_v)
    geo = pt["geo"]
    studies: dict[int, dict] = {}
    frames: dict[int, tuple[_Frame, dict]] = {}
    for label, present in ((VENTILATION, pt["has_v"]), (PERFUSION, pt["has_q"])):
        if not present:
            continue
        rng = np.random.default_rng([seed, 1, slot, label])
        if label == VENTILATION:
            flags = {k: bool(a[slot]) for k, a in plan["v"].items()}
        else:
            flags = {k: bool(a[pt["qi"]]) for k, a in plan["q"].items()}
        pose = pt["pose"][label]
        if pt["same_day"] and frames:
            fr, anat = next(iter(frames.values()))  # same pose: reuse the anatomy
        else:
            fr = _frame(cfg, geo, pose)
            anat = _anatomy(fr, geo)
        frames[label] = (fr, anat)
        cv, par = _render_study(label, fr, anat, geo, cfg, d, flags, pt["shared"], rng)
        case_id = f"{pt['pid']}_{'Q' if label == PERFUSION else 'V'}"
        studies[label] = {"fr": fr, "anat": anat, "cv": cv, "par": par, "flags": flags,
                          "rng": rng, "pose": pose, "case_id": case_id}  # fmt: skip
    later = _add_shine_through(studies, pt, cfg, size) if pt["same_day"] else None
    empty = _empty_mask(size)
    # masks say where a thing is visible: inside the detector's field (the zoom is per patient)
    fov = _field_of_view(size, geo["mm_px"], cfg["camera"]["field_mm"]) > 0
    out = []
    for label, st in studies.items():
        cv, anat = st["cv"], st["anat"]
        img, cam_par = _finish(
            label, cv.base + cv.feat, st["fr"], geo, cfg, d, st["rng"], st["par"]
        )
        offset = _lung_offset({k: m & fov for k, m in anat["lung"].items()}, size)
        masks = {"lungs": anat["lungs"] & fov, "heart": anat["heart"] & fov}
        for k in FEATURE_KEYS:
            m = cv.masks.get(k)
            m = m & fov if m is not None else None
            masks[k] = m if m is not None and m.any() else empty
        is_later = label == later
        params = _case_params(label, st, pt, d, offset, is_later)
        params.update(st["par"])
        params.update(cam_par)
        params.pop("psf_sigma_mm", None)
        params.update(_drawn_flags(st["flags"], params, pt["shared"], is_later))
        params = to_plain(params, ndigits=5)  # flat, json-able, 5 decimals
        out.append(PhantomCase(st["case_id"], label, pt["pid"], img, params, masks))
    return out


def simulate_cohort(
    sim: Mapping | None,
    n_perfusion: int,
    n_ventilation: int,
    seed: int,
    *,
    workers: int | None = None,
    pack_masks: bool = False,
) -> list[PhantomCase]:
    """Simulate a V/Q cohort: all perfusion cases first, then all ventilation cases.

    ``sim`` is the ``conf/sim/paper.yaml`` mapping (a partial mapping overrides those defaults;
    None uses them as they are). Most ventilation patients also have a perfusion image (same
    patient id and anatomy, ``cohort.p_paired``); the other perfusion images belong to
    perfusion-only patients. Deterministic in ``seed`` whatever ``workers`` (threads; None: up
    to 4, one per CPU) is, because every patient has its own generators. ``pack_masks=True``
    turns each case's masks into a bit-packed `PackedMasks` as soon as its patient is simulated
    (the same mapping, an eighth of the memory: what the training data source asks for).
    """
    n_p, n_v = int(n_perfusion), int(n_ventilation)
    if n_p < 0 or n_v < 0:
        raise ValueError(f"cohort sizes must be >= 0, got n_perfusion={n_p} n_ventilation={n_v}")
    cfg = resolve_sim(sim)
    d = float(cfg["difficulty"])
    plan = _plan(cfg, n_p, n_v, int(seed), d)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    # one BLAS thread per worker: the small matrix products only slow down when oversubscribed
    with threadpool_limits(limits=1, user_api="blas"):
        per_patient = _run_patients(plan, cfg, d, int(seed), n_v, workers, pack_masks)
    cases = [c for group in per_patient for c in group]
    perf = [c for c in cases if c.label == PERFUSION]
    vent = [c for c in cases if c.label == VENTILATION]
    log.debug("phantom: %d perfusion, %d ventilation, seed %d", len(perf), len(vent), seed)
    return perf + vent


def _run_patients(
    plan: dict, cfg: dict, d: float, seed: int, n_v: int, workers: int, pack_masks: bool = False
) -> list[list[PhantomCase]]:
    def one(slot: int) -> list[PhantomCase]:
        cases = _simulate_patient(slot, plan, cfg, d, seed, n_v)
        if pack_masks:
            for c in cases:
                c.masks = PackedMasks.pack(c.masks)
        return cases

    slots = range(plan["n_patients"])
    if workers > 1 and plan["n_patients"] > 8:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            per_patient = list(ex.map(one, slots))
    else:
        per_patient = [one(s) for s in slots]
    return per_patient
