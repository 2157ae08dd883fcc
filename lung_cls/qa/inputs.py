"""The studies of a QA check: find the files, read one, say what it declares, pre-process it.

Each study is pre-processed on its own, so its result never depends on which other files sit in
the same folder: a study whose lungs cannot be separated is aligned (NMI fallback) to the mean
centred *training* image that the model carries. A study that cannot be read or pre-processed
becomes a row with status ``error: <reason>``; it never stops the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lung_cls.data.sources import DataError as ReaderError  # what read_image raises
from lung_cls.data.sources import has_dicom_preamble
from lung_cls.errors import UserError
from lung_cls.qa.declared import (
    SERIES_FIELDS,
    STUDY_FIELDS,
    UNKNOWN,
    Declared,
    KeywordMatcher,
    dataset_texts,
    declared_for_file,
    declared_from_texts,
)
from lung_cls.qa.gate import GateSettings, facts_columns, gate_dataset
from lung_cls.qa.output import empty_row

log = logging.getLogger("lung_cls.predict")

DEFAULT_EXTENSIONS: tuple[str, ...] = ("dcm", "dicom", "", "png", "tif", "tiff", "npy")


def _ext(path: Path) -> str:
    return path.suffix[1:].lower() if path.suffix else ""


def find_inputs(
    input_path: str | os.PathLike,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    exclude: Iterable[str | os.PathLike] = (),
    ignored: list[tuple[Path, str]] | None = None,
) -> tuple[list[Path], list[ReaderError], Path]:
    """Image files under ``input_path`` -> (files, unreadable entries, root).

    A single file is taken as it is (whatever its type: a bad one becomes an error row). In a
    folder, files are picked by extension; extension-less files only with the DICOM preamble;
    files with other extensions (reports, DICOMDIR) are not studies: they are appended to
    ``ignored`` as (path, why), so that the check can still name every file in its table.
    Folders in ``exclude`` (the output folder, when it sits inside the input) are skipped.
    """
    from lung_cls.data.sources import walk_files

    root = Path(os.path.expanduser(str(input_path)))
    if root.is_file():
        return [root], [], root.parent
    if not root.exists():
        raise UserError(f"input={root}: no such file or folder")
    if not root.is_dir():
        raise UserError(f"input={root}: not a file or folder")
    exts = {str(e).lower().lstrip(".") for e in extensions}
    skip = [Path(e).resolve() for e in exclude]
    errors: list[ReaderError] = []
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in walk_files(root, errors):
        rp = p.resolve()
        if any(rp == s or s in rp.parents for s in skip):
            continue
        ext = _ext(p)
        if p.name == "DICOMDIR":
            skipped.append((p, "a DICOMDIR (the media index), not an image"))
        elif ext == "" and "" in exts:
            if has_dicom_preamble(p):
                files.append(p)
            else:
                skipped.append((p, "no extension and no DICOM preamble: not an image file"))
        elif ext in exts and ext != "":
            files.append(p)
        else:
            shown = f".{ext}" if ext else "no extension"
            skipped.append((p, f"not an image file type ({shown})"))
    if skipped:  # each gets its own row (and console line) from the caller
        log.debug(
            "%d file(s) under %s are not images of the accepted types: %s",
            len(skipped), root, ", ".join(p.name for p, _ in skipped[:10]),
        )  # fmt: skip
    if ignored is not None:
        ignored.extend(skipped)
    if not files and not errors:
        shown = ", ".join(sorted("(no extension, DICOM)" if e == "" else f".{e}" for e in exts))
        raise UserError(f"input={root}: no image files found (looked for {shown})")
    return files, errors, root


@dataclass(frozen=True)
class ReadOptions:
    """How a study's file is read, its declared class found and its header checked."""

    matcher: KeywordMatcher = field(default_factory=KeywordMatcher)
    frame_index: int | None = None
    manifest: Mapping[str, str] | None = None
    series_fields: Sequence[str] = SERIES_FIELDS
    study_fields: Sequence[str] = STUDY_FIELDS
    gate: GateSettings = field(default_factory=GateSettings)


@dataclass
class Prepared:
    """One study on its way: its row so far, its pre-processed image (None after an error or a
    rejection), the raw pixels and the pre-processing record (for the overlay and the gates)."""

    row: dict[str, Any]
    image: np.ndarray | None = None
    raw: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def preprocess_study(
    pixels: np.ndarray, prep: Mapping[str, Any], reference: np.ndarray | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """One raw image -> (uint8 (S, S), record), exactly as training pre-processed it.

    Alone on purpose: `preprocess_set` builds the NMI reference from the *set's* centroid-centred
    images; a set of one has none unless the centroid step worked, so a study whose lungs cannot be
    separated is aligned to ``reference`` - the checkpoint's mean centred training image.
    """
    from lung_cls.data.preprocess import preprocess_set

    images, infos = preprocess_set([pixels], prep, reference=reference)
    return images[0], infos[0]


def relative_name(path: Path, root: Path) -> str:
    """How a file is shown to the user: relative to the input root, else its name."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def error_row(path: Path, root: Path, reason: str) -> dict[str, Any]:
    """The row of a folder entry that could not even be listed (a broken link, a loop)."""
    row = empty_row(path, relative_name(path, root))
    row.update(status=f"error: {reason}", declared="unknown", gate="read")
    return row


def ignored_row(path: Path, root: Path, why: str) -> dict[str, Any]:
    """The row of a file that is not an image of an accepted type (a report, a DICOMDIR)."""
    row = empty_row(path, relative_name(path, root))
    row.update(status=f"rejected: {why}", declared="unknown", gate="file")
    return row


def _set_declared(row: dict[str, Any], declared: Declared) -> None:
    row["declared"] = declared.cls
    row["declared_evidence"] = declared.evidence_text() or None


def _reader_error(row: dict[str, Any], err: Exception) -> Prepared:
    if isinstance(err, ReaderError):
        # The reader names the training knob; here the same knob is top-level.
        row["status"] = f"error: {err.reason.replace('data.frame_index', 'frame_index')}"
    else:
        row["status"] = f"error: cannot read file ({type(err).__name__}: {_one_line(err)})"
    row["gate"] = "read"
    return Prepared(row)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def prepare_file(
    path: Path,
    root: Path,
    prep: Mapping[str, Any],
    reference: np.ndarray | None,
    opts: ReadOptions,
) -> Prepared:
    """Read one file: declared class (manifest, header or folder names), the header gate (DICOM),
    pixels, pre-processing."""
    row = empty_row(path, relative_name(path, root))
    looks_dicom = _ext(path) in ("dcm", "dicom") or has_dicom_preamble(path)
    if looks_dicom:
        return _prepare_dicom(row, path, prep, reference, opts)
    from lung_cls.data.sources import read_image

    declared, _ = declared_for_file(
        path, opts.matcher, is_dicom=False, manifest=opts.manifest, root=root,
        series_fields=opts.series_fields, study_fields=opts.study_fields,
    )  # fmt: skip
    _set_declared(row, declared)
    try:
        pixels, meta = read_image(path, frame_index=opts.frame_index)
    except Exception as err:  # noqa: BLE001 - any reader failure is this file's error, not the batch's
        return _reader_error(row, err)
    row["gate"] = "none"  # no header to check: the image gate alone decides
    return _preprocess_into(row, pixels, prep, reference, meta)


def _prepare_dicom(
    row: dict[str, Any],
    path: Path,
    prep: Mapping[str, Any],
    reference: np.ndarray | None,
    opts: ReadOptions,
) -> Prepared:
    from lung_cls.data.sources import pydicom_warnings_logged

    # pydicom warns lazily, when a value is first read: anywhere in here.
    with pydicom_warnings_logged(path):
        return _prepare_dicom_dataset(row, path, prep, reference, opts)


def _prepare_dicom_dataset(
    row: dict[str, Any],
    path: Path,
    prep: Mapping[str, Any],
    reference: np.ndarray | None,
    opts: ReadOptions,
) -> Prepared:
    from lung_cls.data.sources import dicom_pixels, read_dicom_dataset, validate_pixels

    try:
        ds = read_dicom_dataset(path)
    except Exception as err:  # noqa: BLE001
        # A cut-off file may still have a readable header: say what it declares.
        try:
            _declare(row, path, dataset_texts(read_dicom_dataset(path, pixels=False)), opts)
        except Exception:  # noqa: BLE001
            row["declared"] = UNKNOWN
        return _reader_error(row, err)
    texts = dataset_texts(ds)
    _declare(row, path, texts, opts)
    result, facts = gate_dataset(ds, opts.gate, texts)
    row.update(facts_columns(facts))
    if not result.passed:
        row.update(status=result.status, gate=result.gate)
        return Prepared(row, meta=_dataset_meta(ds))
    try:
        pixels, meta = dicom_pixels(ds, path, opts.frame_index)
        pixels = validate_pixels(pixels, path)
    except Exception as err:  # noqa: BLE001
        return _reader_error(row, err)
    row["view"] = meta.get("view") or row.get("view")
    meta.update(_dataset_meta(ds))
    row["gate"] = "header"
    return _preprocess_into(row, pixels, prep, reference, meta)


def _declare(row: dict[str, Any], path: Path, texts: Mapping[str, str], opts: ReadOptions) -> None:
    """The declared class (a manifest entry wins over the header) and the header's text columns."""
    declared = None
    if opts.manifest:
        text = opts.manifest.get(str(path.resolve()))
        if text:
            declared = declared_from_texts(
                {"manifest": text}, opts.matcher, series_fields=("manifest",)
            )
    if declared is None:
        declared = declared_from_texts(
            texts, opts.matcher, series_fields=opts.series_fields, study_fields=opts.study_fields
        )
    _set_declared(row, declared)
    row["patient_id"] = texts.get("patient_id")
    row["series_description"] = texts.get("series_description")


def _dataset_meta(ds: Any) -> dict[str, Any]:
    """What an overlay and the training-split check need from a header."""

    def s(key: str) -> str | None:
        v = ds.get(key)
        return str(v) if v not in (None, "") else None

    orientation = ds.get("PatientOrientation")
    return {
        "sop_instance_uid": s("SOPInstanceUID"),
        "accession": s("AccessionNumber"),
        "study_date": s("StudyDate"),
        "series_number": s("SeriesNumber"),
        "series_description": s("SeriesDescription"),
        "patient_id": s("PatientID"),
        "patient_orientation": [str(v) for v in orientation] if orientation else None,
    }


def prepare_image(
    pixels: np.ndarray,
    header: Mapping[str, Any],
    name: str,
    prep: Mapping[str, Any],
    reference: np.ndarray | None,
    opts: ReadOptions,
    dataset: Any = None,
) -> Prepared:
    """One image already in memory (no file): raw pixels (H, W) after rescale, and its header
    texts (`lung_cls.qa.declared.dataset_texts` of a pydicom Dataset, or any dict of the same
    field names). ``name`` stands in the ``file`` column. ``dataset``: the pydicom Dataset the
    pixels came from; given, the header gate runs on it first (as for a file)."""
    from lung_cls.data.sources import validate_pixels

    row = empty_row(name, name)
    texts = {k: str(v) for k, v in header.items() if v not in (None, "")}
    declared = declared_from_texts(
        texts, opts.matcher, series_fields=opts.series_fields, study_fields=opts.study_fields
    )
    _set_declared(row, declared)
    row["patient_id"] = texts.get("patient_id")
    row["series_description"] = texts.get("series_description")
    meta: dict[str, Any] = {}
    row["gate"] = "none"
    if dataset is not None:
        result, facts = gate_dataset(dataset, opts.gate, texts)
        row.update(facts_columns(facts))
        meta = _dataset_meta(dataset)
        if not result.passed:
            row.update(status=result.status, gate=result.gate)
            return Prepared(row, meta=meta)
        row["gate"] = "header"
    try:
        pixels = validate_pixels(np.asarray(pixels), name)
    except ReaderError as err:
        row.update(status=f"error: {err.reason}", gate="read")
        return Prepared(row, meta=meta)
    return _preprocess_into(row, pixels, prep, reference, meta)


def _preprocess_into(
    row: dict[str, Any],
    pixels: np.ndarray,
    prep: Mapping[str, Any],
    reference: np.ndarray | None,
    meta: Mapping[str, Any] | None = None,
) -> Prepared:
    from lung_cls.data.sources import pixel_hash

    meta = dict(meta or {})
    row["patient_id"] = meta.get("patient_id") or row["patient_id"]
    row["series_description"] = meta.get("series_description") or row["series_description"]
    try:
        image, info = preprocess_study(pixels, prep, reference)
    except Exception as err:  # noqa: BLE001 - same: one bad image must not stop the others
        row["status"] = f"error: pre-processing failed ({type(err).__name__}: {_one_line(err)})"
        row["gate"] = "read"
        return Prepared(row, meta=meta)
    row["preprocessing"] = info.get("method")
    row["shift_y"] = round(float(info.get("shift_y", 0.0)), 3)
    row["shift_x"] = round(float(info.get("shift_x", 0.0)), 3)
    if info.get("method") == "none":
        log.warning("%s: lungs not separable and no reference image: not centred", row["file"])
    meta["pixel_hash"] = pixel_hash(pixels)
    return Prepared(row, image, raw=pixels, info=info, meta=meta)
