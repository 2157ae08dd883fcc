"""Write planar lung scintigrams as real NM DICOM files (pydicom 3).

Why: the QA tool and the folder/manifest data sources read DICOM from PACS exports, so the phantom
must be able to produce the same kind of file - NM Image Storage, explicit VR little endian, with
the header facts a reader uses to tell studies and views apart (series description, protocol,
radiopharmaceutical, view code per detector). Tests also use this writer to make awkward cases
(multi-frame ANT/POST, rescale slope/intercept, MONOCHROME1).

Codes (DICOM PS3.16):
* View, CID 26 "Nuclear Medicine Projection" (SNOMED CT, scheme ``SCT``): anterior projection
  399321004, posterior projection 399001007, LAO 399074003, RAO 399108003, LPO 399136008,
  RPO 399075002, left lateral 399118008, right lateral 399297009. Each frame's detector carries
  its view in ``DetectorInformationSequence[d].ViewCodeSequence``; ``DetectorVector[i]`` names
  the detector (1-based) of frame i, so a reader finds the anterior frame.
* Radiopharmaceutical, CID 25: Tc-99m aggregated albumin (MAA) 85693008, Tc-99m pentetate
  (DTPA) 430276001; Technegas: Tc-99m labeled carbon 447125008. Radionuclide (CID 18):
  ^99m^Technetium 72454006.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import config as _dcm_config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

log = logging.getLogger(__name__)

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"

#: view name -> (SNOMED CT code, code meaning) from CID 26 "Nuclear Medicine Projection"
VIEW_CODES: dict[str, tuple[str, str]] = {
    "ANTERIOR": ("399321004", "Anterior projection"),
    "POSTERIOR": ("399001007", "Posterior projection"),
    "LAO": ("399074003", "Left anterior oblique"),
    "RAO": ("399108003", "Right anterior oblique"),
    "LPO": ("399136008", "Left posterior oblique"),
    "RPO": ("399075002", "Right posterior oblique"),
    "LEFT LATERAL": ("399118008", "Left lateral projection"),
    "RIGHT LATERAL": ("399297009", "Right lateral projection"),
}
_VIEW_ALIASES = {
    "ANT": "ANTERIOR",
    "POST": "POSTERIOR",
    "LL": "LEFT LATERAL",
    "RL": "RIGHT LATERAL",
    "LLAT": "LEFT LATERAL",
    "RLAT": "RIGHT LATERAL",
}
#: PatientOrientation (row direction, column direction) of a supine/upright patient's view
_ORIENTATION = {"ANTERIOR": ["L", "F"], "POSTERIOR": ["R", "F"]}

#: agent -> (text, SNOMED CT code, code meaning, route)
RADIOPHARMACEUTICALS: dict[str, tuple[str, str, str, str]] = {
    "MAA": ("Tc-99m MAA", "85693008", "Technetium Tc^99m^ aggregated albumin", "Intravenous"),
    "DTPA": ("Tc-99m DTPA aerosol", "430276001", "Technetium Tc^99m^ pentetate", "Inhalation"),
    "TECHNEGAS": (
        "Technegas (Tc-99m labelled carbon)",
        "447125008",
        "Technetium Tc^99m^ labeled carbon",
        "Inhalation",
    ),
}
SERIES_DESCRIPTION = {1: "LUNG PERFUSION ANT", 0: "LUNG VENT ANT"}
PROTOCOL_NAME = {1: "LUNG PERFUSION", 0: "LUNG VENTILATION"}


def _view_key(view: str) -> str:
    key = str(view).strip().upper().replace("_", " ")
    key = _VIEW_ALIASES.get(key, key)
    if key not in VIEW_CODES:
        raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEW_CODES)}")
    return key


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _radiopharmaceutical_item(name: str | None) -> Dataset:
    """A RadiopharmaceuticalInformationSequence item; known agents get their codes."""
    item = Dataset()
    key = (name or "").strip().upper().replace("TC-99M ", "").replace(" AEROSOL", "")
    known = RADIOPHARMACEUTICALS.get(key)
    if known is None:
        for k, v in RADIOPHARMACEUTICALS.items():
            if k in (name or "").upper():
                known = v
                break
    item.Radiopharmaceutical = known[0] if known else str(name)
    item.RadionuclideCodeSequence = DicomSequence([_code("72454006", "^99m^Technetium")])
    if known:
        item.RadiopharmaceuticalCodeSequence = DicomSequence([_code(known[1], known[2])])
        item.RadiopharmaceuticalRoute = known[3]
    return item


def _to_stored(
    pixels: np.ndarray,
    slope: float | None,
    intercept: float | None,
    monochrome1: bool,
    where: str,
) -> np.ndarray:
    """Values -> stored uint16, so a reader that applies rescale then inverts gets `pixels` back."""
    v = np.asarray(pixels)
    if v.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D image, got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.number):
        raise ValueError(f"{where}: pixels must be numeric, got {v.dtype}")
    v = v.astype(np.float64)
    if monochrome1:
        # MONOCHROME1 shows low values bright: store the image inverted within its own range,
        # so the file looks the same; inverting (max + min - x) again returns the values.
        v = v.max() + v.min() - v
    s = 1.0 if slope is None else float(slope)
    b = 0.0 if intercept is None else float(intercept)
    if s == 0:
        raise ValueError(f"{where}: rescale slope must not be 0")
    raw = np.rint((v - b) / s)
    if raw.min() < 0 or raw.max() > 65535:
        raise ValueError(
            f"{where}: values do not fit uint16 after rescale (slope {s}, intercept {b}): "
            f"stored range would be {raw.min():g}..{raw.max():g}"
        )
    return raw.astype("<u2")


def write_nm_dicom(
    path: str | Path,
    pixels_uint16: np.ndarray | None,
    *,
    patient_id: str,
    series_description: str,
    view: str = "ANTERIOR",
    label_hint: int | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    protocol_name: str | None = None,
    radiopharmaceutical: str | None = None,
    frames: Sequence[tuple[np.ndarray, str]] | None = None,
    patient_name: str | None = None,
    pixel_spacing_mm: float | Sequence[float] | None = None,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    photometric: str = "MONOCHROME2",
    study_date: str = "20220101",
    zoom: float = 1.0,
    **extra: Any,
) -> Path:
    """Write one NM Image Storage file and return its path.

    ``pixels_uint16`` (2-D) is a single-frame image shown in ``view``; or pass ``frames`` as a
    list of ``(image, view name)`` for a multi-frame file (one detector per frame; then
    ``pixels_uint16`` must be None). ``label_hint`` (1 perfusion, 0 ventilation) picks the
    default protocol name and radiopharmaceutical (MAA / DTPA). ``rescale_slope``/
    ``rescale_intercept`` store ``(value - intercept) / slope``; ``photometric="MONOCHROME1"``
    stores the image inverted within its range: a reader that applies the rescale and then
    inverts MONOCHROME1 (``max + min - x``) gets the given values back. ``zoom`` is the camera
    zoom recorded per detector (pass ``pixel_spacing_mm`` to match it). Any other keyword is a
    DICOM keyword set on the dataset (``extra``), e.g. ``AccessionNumber="A1"``.
    """
    path = Path(path)
    photometric = str(photometric).upper()
    stored, views, counts = _stored_frames(
        path, pixels_uint16, frames, view, photometric, rescale_slope, rescale_intercept
    )
    ds = _nm_dataset(sop_instance_uid or generate_uid())
    _set_patient_study_series(
        ds,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        series_uid=series_uid,
        study_date=study_date,
        series_description=series_description,
        protocol_name=protocol_name,
        label_hint=label_hint,
    )
    if len(stored) == 1 and views[0] in _ORIENTATION:
        ds.PatientOrientation = _ORIENTATION[views[0]]
    _set_image(ds, stored, photometric, pixel_spacing_mm, rescale_slope, rescale_intercept)
    ds.CountsAccumulated = counts
    ds.ActualFrameDuration = 300000  # ms
    _set_detectors(ds, views, zoom)
    # radiopharmaceutical
    if radiopharmaceutical is None and label_hint is not None:
        radiopharmaceutical = "MAA" if label_hint == 1 else "DTPA"
    ds.RadiopharmaceuticalInformationSequence = DicomSequence(
        [] if radiopharmaceutical is None else [_radiopharmaceutical_item(radiopharmaceutical)]
    )
    ds.PatientOrientationCodeSequence = DicomSequence([])
    for key, value in extra.items():
        if tag_for_keyword(key) is None:
            raise ValueError(f"{path}: unknown DICOM keyword {key!r}")
        setattr(ds, key, value)
    ds.PixelData = (np.stack(stored) if len(stored) > 1 else stored[0]).tobytes()
    _save_strict(ds, path)
    log.debug("wrote %s (%d frame(s), %s)", path, len(stored), ", ".join(views))
    return path


def _stored_frames(
    path: Path,
    pixels: np.ndarray | None,
    frames: Sequence[tuple[np.ndarray, str]] | None,
    view: str,
    photometric: str,
    rescale_slope: float | None,
    rescale_intercept: float | None,
) -> tuple[list[np.ndarray], list[str], int]:
    """The frames as stored values (rescale and MONOCHROME1 applied), their view keys and the
    total counts of the given images; refuses inputs that cannot make a valid file."""
    if frames is not None and pixels is not None:
        raise ValueError(f"{path}: pass either pixels_uint16 or frames, not both")
    if frames is None:
        if pixels is None:
            raise ValueError(f"{path}: no pixels given")
        frames = [(pixels, view)]
    if len(frames) == 0:
        raise ValueError(f"{path}: frames is empty")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(
            f"{path}: photometric must be MONOCHROME1 or MONOCHROME2, got {photometric}"
        )
    views = [_view_key(v) for _, v in frames]
    stored = [
        _to_stored(img, rescale_slope, rescale_intercept, photometric == "MONOCHROME1", f"{path}")
        for img, _ in frames
    ]
    shape = stored[0].shape
    if any(s.shape != shape for s in stored):
        raise ValueError(
            f"{path}: all frames must have the same shape, got {[s.shape for s in stored]}"
        )
    counts = int(sum(int(np.asarray(img).sum(dtype=np.int64)) for img, _ in frames))
    return stored, views, counts


def _nm_dataset(sop_uid: str) -> Dataset:
    """An empty NM Image Storage dataset with its file meta (explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NM_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LUNG_CLS"
    validate_file_meta(meta, enforce_standard=True)
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    return ds


def _set_patient_study_series(
    ds: Dataset,
    *,
    patient_id: str,
    patient_name: str | None,
    study_uid: str | None,
    series_uid: str | None,
    study_date: str,
    series_description: str,
    protocol_name: str | None,
    label_hint: int | None,
) -> None:
    """Patient, study, series and equipment: what a reader uses to group and name the study."""
    ds.PatientName = patient_name if patient_name is not None else str(patient_id)
    ds.PatientID = str(patient_id)
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = "090000"
    ds.SeriesTime = "090000"
    ds.ContentTime = "090000"
    ds.InstanceCreationDate = _dt.date.today().strftime("%Y%m%d")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "NM"
    ds.SeriesNumber = 1 if label_hint is None else (2 if label_hint == 1 else 1)
    ds.InstanceNumber = 1
    ds.SeriesDescription = str(series_description)
    default_protocol = PROTOCOL_NAME.get(label_hint, "LUNG") if label_hint is not None else "LUNG"
    ds.ProtocolName = protocol_name if protocol_name is not None else default_protocol
    ds.Manufacturer = "lung_cls"
    ds.ManufacturerModelName = "V/Q phantom"
    ds.BodyPartExamined = "CHEST"


def _set_image(
    ds: Dataset,
    stored: list[np.ndarray],
    photometric: str,
    pixel_spacing_mm: float | Sequence[float] | None,
    rescale_slope: float | None,
    rescale_intercept: float | None,
) -> None:
    """NM image module: 16-bit unsigned grey, pixel spacing, rescale."""
    rows, cols = stored[0].shape
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if pixel_spacing_mm is None:
        pixel_spacing_mm = 540.0 / cols  # 54 cm field at zoom 1
    if isinstance(pixel_spacing_mm, int | float):
        pixel_spacing_mm = [float(pixel_spacing_mm), float(pixel_spacing_mm)]
    ds.PixelSpacing = [f"{float(p):.6g}" for p in pixel_spacing_mm]
    if rescale_slope is not None or rescale_intercept is not None:
        ds.RescaleSlope = f"{1.0 if rescale_slope is None else float(rescale_slope):.10g}"
        ds.RescaleIntercept = (
            f"{0.0 if rescale_intercept is None else float(rescale_intercept):.10g}"
        )


def _set_detectors(ds: Dataset, views: list[str], zoom: float) -> None:
    """NM multi-frame module: one energy window, one detector per frame carrying its view."""
    n = len(views)
    ds.NumberOfFrames = n
    ds.FrameIncrementPointer = [
        tag_for_keyword("EnergyWindowVector"),
        tag_for_keyword("DetectorVector"),
    ]
    ds.NumberOfEnergyWindows = 1
    ds.EnergyWindowVector = [1] * n
    ds.NumberOfDetectors = n
    ds.DetectorVector = list(range(1, n + 1))
    ewin = Dataset()
    rng_item = Dataset()
    rng_item.EnergyWindowLowerLimit = "126"
    rng_item.EnergyWindowUpperLimit = "154"
    ewin.EnergyWindowRangeSequence = DicomSequence([rng_item])
    ewin.EnergyWindowName = "Tc99m"
    ds.EnergyWindowInformationSequence = DicomSequence([ewin])
    detectors = []
    for v in views:
        det = Dataset()
        det.CollimatorGridName = "LEHR"
        det.CollimatorType = "PARA"
        det.ZoomFactor = [f"{float(zoom):.6g}", f"{float(zoom):.6g}"]
        det.ViewCodeSequence = DicomSequence([_code(*VIEW_CODES[v])])
        detectors.append(det)
    ds.DetectorInformationSequence = DicomSequence(detectors)
    if n == 1:
        ds.ViewCodeSequence = DicomSequence([_code(*VIEW_CODES[views[0]])])


def _save_strict(ds: Dataset, path: Path) -> None:
    """Save with pydicom's writing validation raising: a file this writes is a valid one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old_mode = _dcm_config.settings.writing_validation_mode
    _dcm_config.settings.writing_validation_mode = _dcm_config.RAISE
    try:
        ds.save_as(path, enforce_file_format=True)
    finally:
        _dcm_config.settings.writing_validation_mode = old_mode
