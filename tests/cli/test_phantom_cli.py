"""``python -m lung_cls.phantom``: the phantom written as files (lung_cls/data/phantom_files.py)
through its door - class folders, manifest, truth, formats, refusals with one line and exit 2."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from lung_cls.data.phantom import default_sim, simulate_cohort


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lung_cls.phantom", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_class_folders_manifest_truth_and_refuses_overwrite(tmp_path):
    out = tmp_path / "ph"
    run = _cli(f"out={out}", "format=dicom", "n_perfusion=3", "n_ventilation=2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "5 images" in run.stdout
    assert len(list((out / "perfusion").glob("*.dcm"))) == 3
    assert len(list((out / "ventilation").glob("*.dcm"))) == 2
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert set(rows[0]) == {"path", "label", "patient_id"}
    assert {r["label"] for r in rows} == {"perfusion", "ventilation"}
    for r in rows:
        assert (out / r["path"]).is_file() and r["path"].startswith(r["label"] + "/")
    truth = list(csv.DictReader((out / "truth.csv").open()))
    assert len(truth) == 5 and {"offset_y", "offset_x", "trachea", "counts"} <= truth[0].keys()
    # the written pixels are the simulated ones
    import pydicom

    cases = {c.id: c for c in simulate_cohort(None, 3, 2, seed=0)}
    for r in rows:
        ds = pydicom.dcmread(out / r["path"])
        case = cases[Path(r["path"]).stem]
        assert np.array_equal(ds.pixel_array, case.image)
        assert ds.PatientID == r["patient_id"] == case.patient_id
        assert ds.SeriesDescription == ("LUNG PERFUSION ANT" if case.label else "LUNG VENT ANT")
    # Hydra leaves nothing in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ph"]
    # a second run into the same folder is refused, without a traceback
    again = _cli(f"out={out}", "n_perfusion=1", "n_ventilation=1", cwd=tmp_path)
    assert again.returncode == 2  # bad input, through the one task wrapper
    assert again.stderr.startswith("error: ") and len(again.stderr.strip().splitlines()) == 1
    assert "overwrite=true" in again.stderr and "Traceback" not in again.stderr
    assert len(list((out / "perfusion").iterdir())) == 3  # untouched


def test_overwrite_replaces_the_earlier_phantom(tmp_path):
    from lung_cls.phantom import run

    out = tmp_path / "ph"
    cfg = _cfg(out, "npy")
    cfg.n_perfusion = 3
    run(cfg)
    (out / "notes.txt").write_text("mine")
    cfg.n_perfusion, cfg.overwrite = 1, True
    run(cfg)
    assert len(list(csv.DictReader((out / "manifest.csv").open()))) == 2
    assert len(list((out / "perfusion").iterdir())) == 1  # the old files are gone
    assert (out / "notes.txt").read_text() == "mine"  # other files are left alone


def _cfg(out: Path, fmt: str, difficulty: float = 0.5):
    from omegaconf import OmegaConf

    sim = {**default_sim(), "difficulty": difficulty}
    return OmegaConf.create(
        {"out": str(out), "format": fmt, "seed": 0, "n_perfusion": 1, "n_ventilation": 1,
         "overwrite": False, "sim": sim}
    )  # fmt: skip


def test_png_is_16_bit_counts_and_npy_is_uint16(tmp_path):
    from PIL import Image

    from lung_cls.phantom import run

    case = simulate_cohort({"difficulty": 0.2}, 1, 1, seed=0)[0]
    run(_cfg(tmp_path / "png", "png", 0.2))
    arr = np.array(Image.open(tmp_path / "png" / "perfusion" / f"{case.id}.png"))
    assert arr.dtype == np.uint16 and np.array_equal(arr, case.image)
    run(_cfg(tmp_path / "npy", "npy", 0.2))
    arr = np.load(tmp_path / "npy" / "perfusion" / f"{case.id}.npy")
    assert arr.dtype == np.uint16 and np.array_equal(arr, case.image)


def test_run_rejects_bad_arguments(tmp_path):
    from lung_cls.errors import UserError
    from lung_cls.phantom import run

    with pytest.raises(UserError, match="format"):
        run(_cfg(tmp_path / "x", "jpeg"))
    with pytest.raises(UserError, match="difficulty"):
        run(_cfg(tmp_path / "y", "npy", difficulty=2.0))
    assert not (tmp_path / "y").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        run(_cfg(tmp_path / "file", "npy"))
