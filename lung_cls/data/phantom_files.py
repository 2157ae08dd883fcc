"""The built-in V/Q phantom written as files, so it can be used like any exported data set.

``python -m lung_cls.phantom`` is the door; this module does the writing:

* ``<out>/perfusion/<id>.<ext>`` and ``<out>/ventilation/<id>.<ext>`` - one file per image: NM
  DICOM (``.dcm``), 16-bit grey PNG of the counts (``.png``) or a uint16 array (``.npy``);
* ``<out>/manifest.csv`` - ``path,label,patient_id`` (paths relative to ``out``);
* ``<out>/truth.csv`` - one row per image with every sampled parameter (offsets, features ...).

A paired patient's ventilation and perfusion share the patient id and, when done the same day,
the DICOM study; the UIDs are reproducible from the seed. The two CSV files are written
atomically, last, so a folder with a ``manifest.csv`` holds every image it lists.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lung_cls.errors import UserError
from lung_cls.labels import CLASS_NAMES
from lung_cls.utils.io import write_csv_atomic

log = logging.getLogger(__name__)

#: ``format=`` value -> file extension.
FORMATS: dict[str, str] = {"dicom": ".dcm", "png": ".png", "npy": ".npy"}
#: What this writer puts into ``out`` (and so what ``overwrite=true`` may remove).
OWN_OUTPUTS: tuple[str, ...] = (*CLASS_NAMES, "manifest.csv", "truth.csv")


def prepare_out(out: Path, overwrite: bool) -> None:
    """An empty (or, with ``overwrite``, emptied of our own outputs) folder to write into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: output folder is not empty; pass overwrite=true to replace it")
        for name in OWN_OUTPUTS:  # only what an earlier run of this command wrote
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _uid(seed: int, *parts: Any) -> str:
    """A reproducible DICOM UID: the same cohort written twice gets the same UIDs."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["lung_cls phantom", str(seed), *map(str, parts)])


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint16)).save(path)


def _write_dicom(path: Path, case: Any, seed: int) -> None:
    from lung_cls.data.dicomio import SERIES_DESCRIPTION, write_nm_dicom

    p = case.params
    # one V/Q study when both were done the same day; otherwise a study each
    study_key = "VQ" if p["same_day"] else CLASS_NAMES[case.label]
    write_nm_dicom(
        path,
        case.image,
        patient_id=case.patient_id,
        series_description=SERIES_DESCRIPTION[case.label],
        view="ANTERIOR",
        label_hint=case.label,
        radiopharmaceutical=str(p.get("agent", "MAA" if case.label else "DTPA")),
        study_uid=_uid(seed, case.patient_id, study_key),
        series_uid=_uid(seed, case.id, "series"),
        sop_instance_uid=_uid(seed, case.id, "sop"),
        pixel_spacing_mm=float(p["pixel_mm"]),
        zoom=float(p["zoom"]),
        study_date="20220101" if p["same_day"] or case.label == 0 else "20220102",
    )


def write_cohort(cases: list, out: Path, fmt: str, seed: int) -> list[dict[str, Any]]:
    """Write the images (one class folder each) and return the manifest rows."""
    ext = FORMATS[fmt]
    rows = []
    for case in cases:
        name = CLASS_NAMES[case.label]
        rel = Path(name) / f"{case.id}{ext}"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "dicom":
            _write_dicom(path, case, seed)
        elif fmt == "png":
            _write_png(path, case.image)
        else:
            np.save(path, case.image)
        rows.append({"path": rel.as_posix(), "label": name, "patient_id": case.patient_id})
    return rows


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """A CSV whose columns are every key of the rows, in first-seen order."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    write_csv_atomic(path, rows, columns)


def write_phantom(
    out: Path,
    sim: Mapping[str, Any],
    n_perfusion: int,
    n_ventilation: int,
    seed: int,
    fmt: str = "dicom",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Simulate a cohort and write it under ``out``; returns counts and timings for the summary.

    ``sim`` is a (partial) simulator config, as ``lung_cls.data.phantom.resolve_sim`` takes it.
    Nothing is written when ``fmt`` is unknown or ``out`` is not usable.
    """
    from lung_cls.data.phantom import simulate_cohort

    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: use one of {', '.join(FORMATS)}")
    prepare_out(out, overwrite)
    t0 = time.perf_counter()
    cases = simulate_cohort(sim, n_perfusion, n_ventilation, seed)
    t_sim = time.perf_counter() - t0
    rows = write_cohort(cases, out, fmt, seed)
    _write_table(out / "manifest.csv", rows)
    _write_table(
        out / "truth.csv",
        [{"path": r["path"], **c.params} for r, c in zip(rows, cases, strict=True)],
    )
    return {
        "n": len(cases),
        "n_perfusion": sum(c.label == 1 for c in cases),
        "n_ventilation": sum(c.label == 0 for c in cases),
        "n_patients": len({c.patient_id for c in cases}),
        "seconds_simulate": t_sim,
        "seconds_total": time.perf_counter() - t0,
        "out": str(out),
        "format": fmt,
    }


__all__ = ["FORMATS", "OWN_OUTPUTS", "prepare_out", "write_cohort", "write_phantom"]
