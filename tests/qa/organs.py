"""Synthetic NM images of what else a gamma camera sends: other organs, other acquisitions.

The QA gate must refuse them; the tests write them as DICOM with an honest header (what the
camera would fill in for that study) and with a lung header (the wrong protocol picked). Counts
are Poisson, the sizes and activities rough but typical (a bone scan's spine and ribs, two thyroid
lobes in the neck, two kidneys and a bladder, a whole-body strip, gated/dynamic/tomographic frame
sets). Plain NumPy; seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

SIDE = 128


def _grid(h: int = SIDE, w: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy / h, xx / w


def _blob(yy, xx, cy, cx, ry, rx, amp=1.0, power=1):
    return amp * np.exp(-((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) ** power))


def _counts(img: np.ndarray, peak: float, rng: np.random.Generator) -> np.ndarray:
    img = np.asarray(img, np.float64)
    img = img / max(img.max(), 1e-9) * peak
    return rng.poisson(img + 2.0).astype(np.uint16)


def bone_chest(rng: np.random.Generator) -> np.ndarray:
    """Anterior chest view of a bone scan: sternum, ribs, clavicles, shoulders, spine."""
    yy, xx = _grid()
    img = np.zeros_like(yy)
    img += _blob(yy, xx, 0.55, 0.5, 0.35, 0.035, 0.8, 2)  # sternum
    img += _blob(yy, xx, 0.6, 0.5, 0.45, 0.05, 0.5, 2)  # spine behind
    for k in range(8):  # ribs: arcs on each side
        y0 = 0.25 + 0.075 * k
        for side in (-1, 1):
            t = np.linspace(0, 1, 200)
            ys = y0 + 0.08 * t**2
            xs = 0.5 + side * (0.06 + 0.34 * t)
            for y, x in zip(ys[::4], xs[::4], strict=True):
                img += _blob(yy, xx, y, x, 0.012, 0.02, 0.35)
    for side in (-1, 1):
        img += _blob(yy, xx, 0.18, 0.5 + side * 0.2, 0.02, 0.16, 0.6)  # clavicle
        img += _blob(yy, xx, 0.2, 0.5 + side * 0.42, 0.07, 0.06, 1.0)  # shoulder
    return _counts(img, 300, rng)


def thyroid(rng: np.random.Generator) -> np.ndarray:
    """Pinhole-like thyroid view: two lobes and the isthmus in the middle of the field."""
    yy, xx = _grid()
    img = _blob(yy, xx, 0.5, 0.4, 0.16, 0.07, 1.0, 2) + _blob(yy, xx, 0.5, 0.6, 0.15, 0.07, 0.9, 2)
    img += _blob(yy, xx, 0.58, 0.5, 0.03, 0.08, 0.5)
    img += _blob(yy, xx, 0.15, 0.5, 0.05, 0.2, 0.15)  # salivary glands
    return _counts(img, 400, rng)


def renal(rng: np.random.Generator) -> np.ndarray:
    """Posterior-looking renal study shown anterior: two kidneys and the bladder."""
    yy, xx = _grid()
    img = _blob(yy, xx, 0.4, 0.3, 0.12, 0.06, 1.0, 2) + _blob(yy, xx, 0.42, 0.7, 0.12, 0.06, 0.9, 2)
    img -= _blob(yy, xx, 0.4, 0.33, 0.04, 0.02, 0.5)  # pelvis
    img += _blob(yy, xx, 0.85, 0.5, 0.07, 0.1, 0.8, 2)  # bladder
    return _counts(np.clip(img, 0, None), 250, rng)


def cardiac(rng: np.random.Generator) -> np.ndarray:
    """A planar MUGA-like blood pool: the heart with a little lung background."""
    yy, xx = _grid()
    img = _blob(yy, xx, 0.55, 0.55, 0.15, 0.15, 1.0, 2)
    img += _blob(yy, xx, 0.3, 0.5, 0.2, 0.05, 0.4)  # great vessels
    img += 0.1 * _blob(yy, xx, 0.5, 0.5, 0.45, 0.45, 1.0)
    return _counts(img, 300, rng)


def liver_spleen(rng: np.random.Generator) -> np.ndarray:
    """A colloid liver-spleen view: a large liver on the image left, the spleen on the right."""
    yy, xx = _grid()
    img = _blob(yy, xx, 0.5, 0.35, 0.22, 0.25, 1.0, 2) + _blob(yy, xx, 0.45, 0.78, 0.12, 0.07, 0.8)
    return _counts(img, 300, rng)


def whole_body(rng: np.random.Generator) -> np.ndarray:
    """A 512 x 128 whole-body bone strip (head, spine, pelvis, legs)."""
    yy, xx = _grid(512, 128)
    img = _blob(yy, xx, 0.06, 0.5, 0.05, 0.15, 1.0, 2)  # skull
    img += _blob(yy, xx, 0.35, 0.5, 0.2, 0.03, 0.8, 2)  # spine
    img += _blob(yy, xx, 0.52, 0.5, 0.04, 0.25, 0.9, 2)  # pelvis
    for side in (-1, 1):
        img += _blob(yy, xx, 0.75, 0.5 + side * 0.12, 0.2, 0.03, 0.6, 2)  # legs
    return _counts(img, 300, rng)


#: name -> (image maker, honest series description, honest radiopharmaceutical)
PLANAR_OTHERS: dict[str, tuple[Callable[[np.random.Generator], np.ndarray], str, str]] = {
    "bone_chest": (bone_chest, "BONE SCAN ANT CHEST", "Tc-99m MDP"),
    "thyroid": (thyroid, "THYROID ANT", "Tc-99m pertechnetate"),
    "renal": (renal, "RENAL MAG3 SUM", "Tc-99m MAG3"),
    "cardiac": (cardiac, "MUGA ANT", "Tc-99m red blood cells"),
    "liver_spleen": (liver_spleen, "LIVER SPLEEN ANT", "Tc-99m sulphur colloid"),
}

LUNG_HEADER = {"series_description": "LUNG PERFUSION ANT", "radiopharmaceutical": "MAA"}


def write_others(root: Path, seed: int = 0) -> dict[str, dict]:
    """Every other-organ study twice (honest header, lung header) under ``root``; plus the
    non-planar acquisitions (whole-body, gated, dynamic, tomographic) and a blank image and a NaN
    image. Returns {file name: {"kind", "header": "honest" | "lung", "expect"}} where ``expect``
    is the set of statuses (kinds) the gate may give."""
    from lung_cls.data.dicomio import write_nm_dicom

    rng = np.random.default_rng(seed)
    truth: dict[str, dict] = {}
    root.mkdir(parents=True, exist_ok=True)

    def put(name, kind, header, expect, pixels=None, **kw):
        desc = kw.pop("series_description")
        write_nm_dicom(
            root / name, pixels, patient_id=f"O{len(truth):03d}", series_description=desc, **kw
        )
        truth[name] = {"kind": kind, "header": header, "expect": expect}

    for kind, (make, desc, pharm) in PLANAR_OTHERS.items():
        put(f"{kind}_honest.dcm", kind, "honest", {"rejected"}, make(rng),
            series_description=desc, radiopharmaceutical=pharm, protocol_name=desc)  # fmt: skip
        put(f"{kind}_lung.dcm", kind, "lung", {"rejected", "review"}, make(rng),
            series_description=LUNG_HEADER["series_description"],
            radiopharmaceutical=LUNG_HEADER["radiopharmaceutical"], label_hint=1)  # fmt: skip
    # Whole-body: the camera writes WHOLE BODY into Image Type and a long strip matrix.
    for header, desc in (("honest", "WB BONE ANT"), ("lung", "LUNG PERFUSION ANT")):
        put(f"whole_body_{header}.dcm", "whole_body", header, {"rejected"}, whole_body(rng),
            series_description=desc, label_hint=1,
            ImageType=["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"])  # fmt: skip
    # Frame sets: gated (16 frames of the heart), dynamic (24 frames of the kidneys), SPECT (32
    # projections); each with the Image Type value 3 the camera writes.
    sets = {
        "gated": (cardiac, 16, "GATED", "MUGA GATED"),
        "dynamic": (renal, 24, "DYNAMIC", "RENAL DYNAMIC"),
        "tomo": (bone_chest, 32, "TOMO", "SPECT CHEST"),
    }
    for kind, (make, n, itype, desc) in sets.items():
        for header, d in (("honest", desc), ("lung", "LUNG PERFUSION ANT")):
            frames = [(make(rng), "ANTERIOR") for _ in range(n)]
            put(f"{kind}_{header}.dcm", kind, header, {"rejected"}, frames=frames,
                series_description=d, label_hint=1,
                ImageType=["ORIGINAL", "PRIMARY", itype, "EMISSION"])  # fmt: skip
    # Nothing in it, and NaNs: not images to classify.
    put("blank_lung.dcm", "blank", "lung", {"error"}, np.zeros((SIDE, SIDE), np.uint16),
        series_description="LUNG PERFUSION ANT", label_hint=1)  # fmt: skip
    nan = np.full((SIDE, SIDE), np.nan, np.float32)
    nan[32:96, 32:96] = 5.0
    np.save(root / "nan_image.npy", nan)
    truth["nan_image.npy"] = {"kind": "nan", "header": "none", "expect": {"error"}}
    return truth
