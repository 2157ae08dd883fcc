"""``python -m lung_cls.phantom out=DIR [format=dicom|png|npy] [seed=0] [sim.difficulty=0.5]``

Writes the built-in V/Q phantom (`lung_cls.data.phantom`) as files, so it can be used like any
exported data set (``data=folder data.root=DIR`` or ``data=manifest data.manifest=DIR/manifest.csv``)
or opened in a DICOM viewer:

* ``DIR/perfusion/<id>.<ext>`` and ``DIR/ventilation/<id>.<ext>`` - one file per image: NM DICOM
  (``.dcm``), 16-bit grey PNG of the counts (``.png``) or a uint16 array (``.npy``);
* ``DIR/manifest.csv`` - ``path,label,patient_id`` (paths relative to DIR);
* ``DIR/truth.csv`` - one row per image with every sampled parameter (offsets, features ...).

A paired patient's ventilation and perfusion share the patient id and, when done the same day,
the DICOM study. Refuses to write into a non-empty folder unless ``overwrite=true``.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from lung_cls.utils.hydra import UserError, quote_path_overrides

log = logging.getLogger(__name__)

FORMATS = {"dicom": ".dcm", "png": ".png", "npy": ".npy"}
CLASS_DIR = {1: "perfusion", 0: "ventilation"}
OWN_OUTPUTS = ("perfusion", "ventilation", "manifest.csv", "truth.csv")


def _prepare_out(out: Path, overwrite: bool) -> None:
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


def write_cohort(cases: list, out: Path, fmt: str, seed: int) -> list[dict[str, Any]]:
    """Write the images and return the manifest rows."""
    from lung_cls.data.dicomio import SERIES_DESCRIPTION, write_nm_dicom

    ext = FORMATS[fmt]
    rows = []
    for case in cases:
        rel = Path(CLASS_DIR[case.label]) / f"{case.id}{ext}"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        p = case.params
        if fmt == "dicom":
            # one V/Q study when both were done the same day; otherwise a study each
            study_key = "VQ" if p["same_day"] else CLASS_DIR[case.label]
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
        elif fmt == "png":
            _write_png(path, case.image)
        else:
            np.save(path, case.image)
        rows.append({"path": rel.as_posix(), "label": CLASS_DIR[case.label],
                     "patient_id": case.patient_id})  # fmt: skip
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def run(cfg: DictConfig) -> dict[str, Any]:
    """The command without Hydra's decorator (tests and other tools call this)."""
    from lung_cls.data.phantom import resolve_sim, simulate_cohort

    if OmegaConf.is_missing(cfg, "out") or cfg.get("out") in (None, ""):
        raise UserError("out=DIR is required: the folder to write the phantom into")
    fmt = str(cfg.get("format", "dicom")).lower()
    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: use one of {', '.join(FORMATS)}")
    n_p, n_v = int(cfg.n_perfusion), int(cfg.n_ventilation)
    if n_p < 0 or n_v < 0 or n_p + n_v == 0:
        raise UserError(f"n_perfusion={n_p} n_ventilation={n_v}: need at least one image")
    seed = int(cfg.seed)
    out = Path(str(cfg.out)).expanduser()
    try:
        sim = resolve_sim(OmegaConf.to_container(cfg.sim, resolve=True))
    except ValueError as err:
        raise UserError(f"sim: {err}") from None
    _prepare_out(out, bool(cfg.get("overwrite", False)))
    t0 = time.perf_counter()
    cases = simulate_cohort(sim, n_p, n_v, seed)
    t_sim = time.perf_counter() - t0
    rows = write_cohort(cases, out, fmt, seed)
    _write_csv(out / "manifest.csv", rows)
    truth = [{"path": r["path"], **c.params} for r, c in zip(rows, cases, strict=True)]
    _write_csv(out / "truth.csv", truth)
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="phantom")
def main(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.markup import escape

    try:
        s = run(cfg)
    except UserError as err:
        # handled here rather than by utils.hydra.clean_errors: that one imports the training
        # stack (torch) to know its error types, seconds for a plain "folder not empty"
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        Console(stderr=True, soft_wrap=True).print(f"[red]error[/]: {escape(str(err))}")
        sys.exit(2)
    Console(soft_wrap=True).print(
        f"[green]phantom[/]: {s['n']} images ({s['n_perfusion']} perfusion, "
        f"{s['n_ventilation']} ventilation, {s['n_patients']} patients, difficulty "
        f"{float(cfg.sim.difficulty):g}, seed {int(cfg.seed)}) as {s['format']} in "
        f"{escape(s['out'])} - simulated at {s['n'] / max(s['seconds_simulate'], 1e-9):.0f} images/s, "
        f"{s['seconds_total']:.1f} s in all"
    )


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    main()
