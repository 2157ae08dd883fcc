"""The header gate and the reader on real DICOM written by other software (pydicom's test files and
the pydicom-data package, a test dependency: nothing is downloaded) and on synthetic NM studies of
other organs and acquisitions (tests/qa/organs.py)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from organs import write_others
from qa_helpers import run_cli, save_scratch_checkpoint, write_study

from lung_cls.data.preprocess import prep_config
from lung_cls.data.sources import DataError, read_image
from lung_cls.qa.decide import status_kind
from lung_cls.qa.gate import GateSettings, HeaderFacts, gate_dataset, header_gate
from lung_cls.qa.inputs import ReadOptions, find_inputs, prepare_file

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _pydicom_data_dir() -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data"


def real_files() -> list[Path]:
    """Every DICOM file of pydicom's test files and of pydicom-data."""
    files = sorted(PYDICOM_FILES.rglob("*.dcm")) + sorted(_pydicom_data_dir().glob("*.dcm"))
    assert len(files) > 100, "pydicom-data is a dev dependency: pip install pydicom-data"
    return files


def planar(**kw) -> HeaderFacts:
    base = dict(
        modality="NM", sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
        sop_class="Nuclear Medicine Image Storage",
        image_type=("ORIGINAL", "PRIMARY", "STATIC", "EMISSION"), n_frames=1, rows=256,
        columns=256, views=["Anterior projection"],
    )  # fmt: skip
    base.update(kw)
    return HeaderFacts(**base)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({}, None),
        ({"modality": "MR"}, "rejected: Modality MR, not NM"),
        ({"modality": ""}, "rejected: no Modality in the header"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.481.2", "sop_class": "RT Dose Storage"},
         "rejected: RT Dose Storage is not an image SOP class"),
        ({"has_pixels": False}, "rejected: no pixel data"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION")}, "whole-body"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION")}, "tomographic"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "GATED", "EMISSION")}, "gated acquisition"),
        ({"attributes": ("RotationInformationSequence",)}, "tomographic acquisition"),
        ({"attributes": ("PhaseInformationSequence",)}, "dynamic acquisition"),
        ({"rows": 1024, "columns": 256}, "1024 x 256 matrix"),
        ({"n_frames": 24, "views": ["Anterior projection"] * 24}, "dynamic or gated series"),
        ({"views": ["Posterior projection"]}, "rejected: no anterior view (views: Posterior"),
        ({"views": [None]}, "rejected: no view in the header"),
        ({"n_frames": 2, "views": [None, None]}, "set frame_index"),
        ({"texts": {"series_description": "THYROID ANT"}}, "a thyroid study"),
        ({"texts": {"radiopharmaceutical": "Technetium Tc^99m^ medronate"}}, "a bone study"),
        ({"texts": {"study_description": "NM RENAL MAG3"}}, "a renal study"),
        ({"body_part": "ABDOMEN"}, "body part ABDOMEN"),
    ],
)  # fmt: skip
def test_header_gate_checks_in_order(change, reason):
    result = header_gate(planar(**change))
    if reason is None:
        assert result.passed
    else:
        assert not result.passed and result.gate == "header"
        assert result.status.startswith("rejected: ") and reason in result.status, result.status
        assert "\n" not in result.status


def test_header_gate_settings():
    two_frames = planar(n_frames=2, views=[None, None])
    assert header_gate(two_frames, GateSettings(frame_index=0)).passed
    assert header_gate(planar(views=[None]), GateSettings(require_view=False)).passed
    assert header_gate(planar(modality="MR"), GateSettings(modalities=("NM", "MR"))).passed
    assert header_gate(planar(texts={"series_description": "LUNG PERFUSION ANT"})).passed
    # "V/Q" and "vent" are not other studies; the keyword match is on whole words.
    assert header_gate(planar(texts={"series_description": "LUNG V/Q VENT ANT"})).passed
    assert header_gate(planar(texts={"series_description": "BONEY"})).passed


def test_the_phantom_writer_passes_the_header_gate(tmp_path):
    image = (np.random.default_rng(0).random((64, 64)) * 100).astype(np.uint16)
    path = write_study(tmp_path / "a.dcm", image, "P1", "LUNG PERF ANT", label_hint=1)
    result, facts = gate_dataset(pydicom.dcmread(path))
    assert result.passed, result
    assert (facts.modality, facts.sop_class, facts.view) == (
        "NM", "Nuclear Medicine Image Storage", "Anterior projection",
    )  # fmt: skip


def _prepare(path: Path, root: Path):
    return prepare_file(path, root, prep_config({"size": 32}), None, ReadOptions())


def test_every_real_file_is_rejected_or_an_error_one_line_each():
    """pydicom's own test files and pydicom-data hold no planar NM lung study: none may reach the
    model. Each gets one row, one line, no traceback."""
    kinds: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom's warnings go to its logger, never out of here
        for path in real_files():
            prepared = _prepare(path, path.parent)
            row = prepared.row
            kind = status_kind(row["status"])
            kinds[kind] = kinds.get(kind, 0) + 1
            assert kind in ("rejected", "error"), (path.name, row["status"])
            assert prepared.image is None
            assert "\n" not in row["status"] and "Traceback" not in row["status"]
            if kind == "rejected":
                assert row["gate"] == "header"
    assert kinds["rejected"] > 3 * kinds.get("error", 0)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("MR_small.dcm", "rejected: Modality MR, not NM"),
        ("CT_small.dcm", "rejected: Modality CT, not NM"),
        ("rtdose.dcm", "rejected: Modality RTDOSE, not NM"),
        ("JPEG2000.dcm", "rejected: whole-body acquisition"),  # the NM whole-body bone scan
        ("image_dfl.dcm", "rejected: Modality OT, not NM"),  # deflated: read, not "truncated"
    ],
)
def test_known_real_files(name, expected):
    path = PYDICOM_FILES / name
    assert _prepare(path, path.parent).row["status"].startswith(expected)


def test_deflated_and_compressed_syntaxes_are_read_like_pydicom_reads_them():
    """Every file pydicom itself decodes is decoded by the reader too (it may still refuse it by
    policy: not an image, too small), and the deflated file is no longer "truncated"."""
    pixels, meta = read_image(PYDICOM_FILES / "image_dfl.dcm")
    assert meta["transfer_syntax"] == "1.2.840.10008.1.2.1.99"
    ds = pydicom.dcmread(PYDICOM_FILES / "image_dfl.dcm")
    np.testing.assert_array_equal(pixels, ds.pixel_array.astype(np.float32))
    policy = ("not an image", "image too small")
    for path in real_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _ = pydicom.dcmread(path, force=True).pixel_array
            except Exception:  # noqa: BLE001 - pydicom cannot decode it: not the reader's to do
                continue
        try:
            read_image(path, frame_index=0)
        except DataError as err:
            assert err.reason.startswith(policy), (path.name, err.reason)


def test_other_organs_and_acquisitions_honest_headers_rejected_by_the_header(tmp_path):
    truth = write_others(tmp_path / "others")
    files, _, root = find_inputs(tmp_path / "others")
    assert {f.name for f in files} == set(truth)
    for f in files:
        row = _prepare(f, root).row
        t = truth[f.name]
        if t["header"] == "honest" or t["kind"] in ("whole_body", "gated", "dynamic", "tomo"):
            assert row["status"].startswith("rejected: "), (f.name, row["status"])
            assert row["gate"] == "header"
        elif t["kind"] in ("blank", "nan"):
            assert row["status"].startswith("error: "), (f.name, row["status"])
        else:  # another organ under a lung header: the image gate's job (tests/qa/test_image_gate)
            assert row["gate"] == "header" and row["status"] is None, (f.name, row["status"])


def test_reader_messages_go_to_the_log_file_not_the_console(tmp_path):
    ckpt = save_scratch_checkpoint(tmp_path / "m.ckpt", size=32)
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("SC_rgb_jpeg.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm", "MR_small.dcm"):
        src = (
            PYDICOM_FILES / name if (PYDICOM_FILES / name).exists() else _pydicom_data_dir() / name
        )
        (inp / name).write_bytes(src.read_bytes())
    (inp / "notes.txt").write_text("a report")
    out = tmp_path / "out"
    res = run_cli("lung_cls.predict", [f"ckpt={ckpt}", f"input={inp}", f"output={out}"], tmp_path)
    assert res.returncode == 0, res.stderr
    console = res.stdout + res.stderr
    pydicom_says = ("Expected explicit VR", "End of file reached before delimiter")
    assert "Traceback" not in console and not any(t in console for t in pydicom_says), console
    log_text = (out / "predict.log").read_text()
    assert all(t in log_text for t in pydicom_says), log_text
    # Every file named, once, each on one line of the console.
    for name in ("SC_rgb_jpeg.dcm", "MR_small.dcm", "notes.txt"):
        assert sum(name in line for line in console.splitlines()) == 1, (name, console)


def test_pydicom_logger_is_restored_after_a_run():
    assert logging.getLogger("pydicom").propagate
