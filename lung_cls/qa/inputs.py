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
    Declared,
    KeywordMatcher,
    declared_for_file,
    declared_from_texts,
)
from lung_cls.qa.output import empty_row

log = logging.getLogger("lung_cls.predict")

DEFAULT_EXTENSIONS: tuple[str, ...] = ("dcm", "dicom", "", "png", "tif", "tiff", "npy")


def _ext(path: Path) -> str:
    return path.suffix[1:].lower() if path.suffix else ""


def find_inputs(
    input_path: str | os.PathLike,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    exclude: Iterable[str | os.PathLike] = (),
) -> tuple[list[Path], list[ReaderError], Path]:
    """Image files under ``input_path`` -> (files, unreadable entries, root).

    A single file is taken as it is (whatever its type: a bad one becomes an error row). In a
    folder, files are picked by extension; extension-less files only with the DICOM preamble;
    files with other extensions (reports, DICOMDIR) are not studies and are counted in the log.
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
    ignored = 0
    for p in walk_files(root, errors):
        rp = p.resolve()
        if any(rp == s or s in rp.parents for s in skip):
            continue
        ext = _ext(p)
        if p.name == "DICOMDIR":
            ignored += 1
        elif ext == "" and "" in exts:
            if has_dicom_preamble(p):
                files.append(p)
            else:
                ignored += 1
        elif ext in exts and ext != "":
            files.append(p)
        else:
            ignored += 1
    if ignored:
        log.info(
            "Ignored %d file(s) under %s that are not images of the accepted types", ignored, root
        )
    if not files and not errors:
        shown = ", ".join(sorted("(no extension, DICOM)" if e == "" else f".{e}" for e in exts))
        raise UserError(f"input={root}: no image files found (looked for {shown})")
    return files, errors, root


@dataclass(frozen=True)
class ReadOptions:
    """How a study's file is read and its declared class found."""

    matcher: KeywordMatcher = field(default_factory=KeywordMatcher)
    frame_index: int | None = None
    manifest: Mapping[str, str] | None = None
    series_fields: Sequence[str] = SERIES_FIELDS
    study_fields: Sequence[str] = STUDY_FIELDS


@dataclass
class Prepared:
    """One study on its way: its row so far, and its pre-processed image (None after an error)."""

    row: dict[str, Any]
    image: np.ndarray | None = None


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
    row.update(status=f"error: {reason}", declared="unknown")
    return row


def _set_declared(row: dict[str, Any], declared: Declared) -> None:
    row["declared"] = declared.cls
    row["declared_evidence"] = declared.evidence_text() or None


def prepare_file(
    path: Path,
    root: Path,
    prep: Mapping[str, Any],
    reference: np.ndarray | None,
    opts: ReadOptions,
) -> Prepared:
    """Read one file: declared class (manifest, header or folder names), pixels, pre-processing."""
    from lung_cls.data.sources import read_image

    row = empty_row(path, relative_name(path, root))
    looks_dicom = _ext(path) in ("dcm", "dicom") or has_dicom_preamble(path)
    declared, texts = declared_for_file(
        path,
        opts.matcher,
        is_dicom=looks_dicom,
        manifest=opts.manifest,
        root=root,
        series_fields=opts.series_fields,
        study_fields=opts.study_fields,
    )
    _set_declared(row, declared)
    row["patient_id"] = texts.get("patient_id")
    row["series_description"] = texts.get("series_description")
    try:
        pixels, meta = read_image(path, frame_index=opts.frame_index)
    except ReaderError as err:
        # The reader names the training knob; here the same knob is top-level.
        row["status"] = f"error: {err.reason.replace('data.frame_index', 'frame_index')}"
        return Prepared(row)
    except Exception as err:  # noqa: BLE001 - any reader failure is this file's error, not the batch's
        row["status"] = f"error: cannot read file ({type(err).__name__}: {err})"
        return Prepared(row)
    row["patient_id"] = meta.get("patient_id") or row["patient_id"]
    row["series_description"] = meta.get("series_description") or row["series_description"]
    return _preprocess_into(row, pixels, prep, reference)


def prepare_image(
    pixels: np.ndarray,
    header: Mapping[str, Any],
    name: str,
    prep: Mapping[str, Any],
    reference: np.ndarray | None,
    opts: ReadOptions,
) -> Prepared:
    """One image already in memory (no file): raw pixels (H, W) after rescale, and its header
    texts (`lung_cls.qa.declared.dataset_texts` of a pydicom Dataset, or any dict of the same
    field names). ``name`` stands in the ``file`` column."""
    from lung_cls.data.sources import validate_pixels

    row = empty_row(name, name)
    texts = {k: str(v) for k, v in header.items() if v not in (None, "")}
    declared = declared_from_texts(
        texts, opts.matcher, series_fields=opts.series_fields, study_fields=opts.study_fields
    )
    _set_declared(row, declared)
    row["patient_id"] = texts.get("patient_id")
    row["series_description"] = texts.get("series_description")
    try:
        pixels = validate_pixels(np.asarray(pixels), name)
    except ReaderError as err:
        row["status"] = f"error: {err.reason}"
        return Prepared(row)
    return _preprocess_into(row, pixels, prep, reference)


def _preprocess_into(
    row: dict[str, Any], pixels: np.ndarray, prep: Mapping[str, Any], reference: np.ndarray | None
) -> Prepared:
    try:
        image, info = preprocess_study(pixels, prep, reference)
    except Exception as err:  # noqa: BLE001 - same: one bad image must not stop the others
        row["status"] = f"error: pre-processing failed ({type(err).__name__}: {err})"
        return Prepared(row)
    row["preprocessing"] = info.get("method")
    row["shift_y"] = round(float(info.get("shift_y", 0.0)), 3)
    row["shift_x"] = round(float(info.get("shift_x", 0.0)), 3)
    if info.get("method") == "none":
        log.warning("%s: lungs not separable and no reference image: not centred", row["file"])
    return Prepared(row, image)
