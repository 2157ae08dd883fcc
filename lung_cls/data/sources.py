"""Image sources: turn a phantom, a folder of class subfolders or a CSV manifest into `Study` records.

Every reader ends in the same validation, so a bad file fails here - with one message that names
the file and says why - and never later as a NaN loss or a silent mis-centring. Pixels are kept as
float32 "raw" values (counts after DICOM rescale); normalisation belongs to pre-processing.

Pure Python/NumPy (+ pydicom, Pillow): no Hydra or Lightning imports, so the readers are usable
from any script. ``data_cfg`` is any Mapping (an OmegaConf DictConfig works as it is).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Defined once elsewhere, re-exported here where readers have always found them.
from lung_cls.data.subgroups import check_source as check_subgroup_source
from lung_cls.data.subgroups import is_missing, normalise, subgroup_column
from lung_cls.errors import DataError
from lung_cls.labels import CLASS_NAMES
from lung_cls.utils.io import to_plain

log = logging.getLogger(__name__)

DEFAULT_CLASS_DIRS: dict[str, str] = {"perfusion": "perfusion", "ventilation": "ventilation"}
DEFAULT_EXTENSIONS: tuple[str, ...] = ("dcm", "dicom", "", "png", "tif", "tiff", "npy")
"""File extensions read by the folder source; "" means no extension (DICOM, detected by "DICM")."""

MIN_SIDE = 32
"""Smallest accepted image side in pixels: below this there is no lung anatomy left to centre."""

_DICOM_EXT = {"dcm", "dicom"}
_RASTER_EXT = {"png", "tif", "tiff"}
_NON_IMAGE_MODALITIES = {"SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "DOC", "REG", "SEG"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's "L"


@dataclass
class Study:
    """One planar image with what the rest of the pipeline needs to know about it.

    ``pixels``: float32 (H, W) raw counts (after rescale slope/intercept), or for the phantom its
    uint16 counts as simulated. ``truth`` (phantom only): ``{"params": {...}, "masks": PackedMasks}``.
    """

    id: str
    pixels: np.ndarray
    label: int | None
    patient_id: str
    path: str
    meta: dict = field(default_factory=dict)
    truth: dict | None = None


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _cfg_get(cfg: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """``cfg[key]``; ``default`` where the key is missing, unresolvable or None."""
    if cfg is None:
        return default
    try:
        value = cfg[key]
    except (KeyError, AttributeError):
        return default
    except Exception:  # an OmegaConf missing value (???) or failed interpolation
        return default
    return default if value is None else value


def _class_dirs_or_none(data_cfg: Mapping[str, Any]) -> Any:
    """data.class_dirs: missing -> the defaults; an explicit null -> None (read label-less)."""
    try:
        return data_cfg["class_dirs"]
    except (KeyError, AttributeError):
        return DEFAULT_CLASS_DIRS
    except Exception:
        return DEFAULT_CLASS_DIRS


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) -> (H, W) grey; alpha is dropped (scintigrams carry no meaning in it)."""
    return rgb[..., :3].astype(np.float32) @ _LUMA


def _extension(path: Path) -> str:
    return path.suffix[1:].lower() if path.suffix else ""


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM Part 10 marker "DICM" at byte 128."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def pixel_hash(pixels: np.ndarray) -> str:
    """A study's identity by content: BLAKE2b of its raw values as float32 (and its shape).

    The same image gives the same hash whether it comes from the phantom (uint16 counts), a DICOM
    file or a DICOM object in memory, so the QA check can tell a checkpoint's own training images.
    """
    arr = np.ascontiguousarray(pixels, dtype=np.float32)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def validate_pixels(pixels: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Reject images that pre-processing cannot handle; returns float32 (H, W).

    Non-square images are accepted: pre-processing pads them to a square (centred, background fill)
    before resizing, so the lungs keep their aspect ratio.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise DataError(path, f"expected a 2-D image, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise DataError(path, f"unsupported pixel type {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    h, w = arr.shape
    if min(h, w) < MIN_SIDE:
        raise DataError(
            path, f"image too small: {h}x{w} pixels (need at least {MIN_SIDE} on each side)"
        )
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - finite.sum())
        raise DataError(path, f"image contains NaN or Inf values ({bad} of {arr.size} pixels)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        what = "all pixels are 0" if hi == 0 else f"all pixels are {hi:g}"
        raise DataError(path, f"constant image: min == max, cannot normalise ({what})")
    return arr


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def read_image(
    path: str | os.PathLike, *, frame_index: int | None = None
) -> tuple[np.ndarray, dict]:
    """Read one image file -> (float32 (H, W), meta).

    DICOM (.dcm/.dicom, or any file with the DICM preamble), PNG/TIFF (8/16 bit, grey, RGB, RGBA)
    and NPY. ``frame_index`` picks the frame of a multi-frame file that carries no view
    information. Raises `DataError` naming the file for anything that cannot be used.
    """
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise DataError(p, "broken symbolic link")
    if not p.exists():
        raise DataError(p, "file not found")
    if not p.is_file():
        raise DataError(p, "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise DataError(p, "empty file (0 bytes)")
    ext = _extension(p)
    if ext in _DICOM_EXT or has_dicom_preamble(p):
        pixels, meta = _read_dicom(p, frame_index)
    elif ext in _RASTER_EXT:
        pixels, meta = _read_raster(p, frame_index)
    elif ext == "npy":
        pixels, meta = _read_npy(p)
    else:
        raise DataError(p, f"unsupported file type '.{ext}' (and no DICOM preamble)")
    pixels = validate_pixels(pixels, p)
    meta.setdefault("shape", list(pixels.shape))
    return pixels, meta


def _read_npy(path: Path) -> tuple[np.ndarray, dict]:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise DataError(path, "NPY holds Python objects, not a numeric image") from None
        raise DataError(path, f"corrupt or truncated NPY file ({err})") from None
    except (OSError, EOFError) as err:
        raise DataError(path, f"corrupt or truncated NPY file ({err})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(path, "NPZ archives are not supported: save one image per .npy file")
    if arr.ndim == 3:
        if 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
        elif arr.shape[-1] in (3, 4):
            arr = _luminance(arr)
        else:
            raise DataError(
                path, f"expected a 2-D image (or one channel), got shape {tuple(arr.shape)}"
            )
    return arr, {"format": "npy", "dtype": str(arr.dtype)}


def _read_raster(path: Path, frame_index: int | None) -> tuple[np.ndarray, dict]:
    ext = _extension(path)
    if ext in ("tif", "tiff"):
        try:  # tifffile (a scikit-image dependency) reads 16-bit RGB and multi-page files
            import tifffile
        except ImportError:  # pragma: no cover - Pillow fallback
            tifffile = None
        if tifffile is not None:
            try:
                arr = tifffile.imread(path)
            except Exception as err:
                raise DataError(path, f"corrupt or truncated TIFF ({err})") from None
            meta = {"format": "tiff", "dtype": str(arr.dtype)}
            return _raster_to_grey(path, arr, frame_index, meta), meta
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            n_frames = int(getattr(img, "n_frames", 1))
            if n_frames > 1:
                if frame_index is None:
                    raise DataError(
                        path,
                        f"multi-page image with {n_frames} pages: set data.frame_index to pick one",
                    )
                img.seek(int(frame_index))
            mode = img.mode
            if mode in ("P", "PA"):
                img = img.convert("RGBA")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif mode == "1":
                img = img.convert("L")
            img.load()
            arr = np.asarray(img)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(path, f"not a readable {ext.upper()} image (corrupt file?)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(path, f"corrupt or truncated {ext.upper()} image ({err})") from None
    meta = {"format": ext, "mode": mode, "dtype": str(arr.dtype)}
    return _raster_to_grey(path, arr, None, meta), meta


def _raster_to_grey(path: Path, arr: np.ndarray, frame_index: int | None, meta: dict) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[-1] in (2, 3, 4):  # LA / RGB / RGBA
        meta["channels"] = int(arr.shape[-1])
        return arr[..., 0] if arr.shape[-1] == 2 else _luminance(arr)
    if arr.ndim in (3, 4):  # multi-page (pages first)
        if frame_index is None:
            raise DataError(
                path,
                f"multi-page image with {arr.shape[0]} pages: set data.frame_index to pick one",
            )
        if not 0 <= int(frame_index) < arr.shape[0]:
            raise DataError(path, f"frame_index {frame_index} out of range (0..{arr.shape[0] - 1})")
        meta["frame"] = int(frame_index)
        return _raster_to_grey(path, arr[int(frame_index)], None, meta)
    raise DataError(path, f"unsupported image shape {tuple(arr.shape)}")


# ---- DICOM ---------------------------------------------------------------------------------------
_ANTERIOR = re.compile(r"\banterior\b|\bant\b|^ant(?![a-z])|(?<![a-z])ant$", re.IGNORECASE)


def _is_anterior(text: str | None) -> bool:
    """'ANTERIOR', 'Anterior', 'ANT', 'LUNG ANT' -> True; oblique views and 'posterior' -> False."""
    if not text:
        return False
    t = str(text).strip().lower().replace("_", " ")
    return "oblique" not in t and bool(_ANTERIOR.search(t))


def _code_meaning(item: Any, seq_name: str) -> str | None:
    seq = item.get(seq_name) if item is not None else None
    if seq:
        meaning = seq[0].get("CodeMeaning")
        if meaning:
            return str(meaning)
    return None


def _frame_views(ds: Any, n_frames: int) -> list[str | None]:
    """A view name per frame, from whatever the header offers (None where nothing says)."""
    views: list[str | None] = [None] * n_frames
    # 1. Enhanced/per-frame labels.
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) == n_frames:
        for i, fg in enumerate(per_frame):
            content = fg.get("FrameContentSequence")
            if content:
                label = content[0].get("FrameLabel") or content[0].get("FrameComments")
                if label:
                    views[i] = str(label)
    # 2. NM: detector information (view code / image id per detector) + DetectorVector per frame.
    detectors = ds.get("DetectorInformationSequence")
    if detectors:
        top_ids = ds.get("ImageID")
        if top_ids is not None and not isinstance(top_ids, (list, tuple)):
            try:
                top_ids = list(top_ids) if not isinstance(top_ids, str) else [top_ids]
            except TypeError:
                top_ids = [top_ids]
        det_view: dict[int, str] = {}
        for d, item in enumerate(detectors, start=1):
            name = _code_meaning(item, "ViewCodeSequence") or item.get("ImageID")
            if not name and top_ids is not None and len(top_ids) == len(detectors):
                name = top_ids[d - 1]
            if name:
                det_view[d] = str(name)
        vector = ds.get("DetectorVector")
        if vector is not None:
            vector = [int(v) for v in (vector if isinstance(vector, Iterable) else [vector])]
        if vector is not None and len(vector) == n_frames:
            for i, d in enumerate(vector):
                if views[i] is None and d in det_view:
                    views[i] = det_view[d]
        elif len(detectors) == n_frames:
            for i in range(n_frames):
                if views[i] is None and (i + 1) in det_view:
                    views[i] = det_view[i + 1]
        elif n_frames == 1 and det_view:
            views[0] = views[0] or det_view[min(det_view)]
    # 3. Frame labels as a multi-valued ImageID without detector info.
    image_ids = ds.get("ImageID")
    if image_ids is not None and not isinstance(image_ids, str):
        try:
            ids = list(image_ids)
        except TypeError:
            ids = []
        if len(ids) == n_frames:
            views = [v if v is not None else str(ids[i]) for i, v in enumerate(views)]
    # 4. One view for the whole file.
    if n_frames == 1 and views[0] is None:
        views[0] = _code_meaning(ds, "ViewCodeSequence") or (
            str(ds.get("ViewPosition")) if ds.get("ViewPosition") else None
        )
    return views


def _radiopharmaceutical(ds: Any) -> str | None:
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        return None
    names: list[str] = []
    for item in seq:
        for value in (
            item.get("Radiopharmaceutical"),
            _code_meaning(item, "RadiopharmaceuticalCodeSequence"),
            _code_meaning(item, "RadionuclideCodeSequence"),
        ):
            if value and str(value) not in names:
                names.append(str(value))
    return "; ".join(names) or None


def _dicom_truncation(ds: Any, size: int) -> str | None:
    """Where a parsed file shows it was cut short, in words; None when it looks whole.

    Why: pydicom stops quietly at the end of a truncated file, so a copy that broke off inside the
    header would otherwise be reported as "no pixel data" - true, but not the reason. Two checks:
    the file meta group length, and every element's declared value length against the file size.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "FileMetaInformationGroupLength" in meta:
        try:
            group_len = int(meta.FileMetaInformationGroupLength)
        except (TypeError, ValueError):
            return f"the file meta header breaks off ({size} bytes)"
        if 132 + 12 + group_len > size:  # preamble + "DICM", the length element, the group
            return f"the file meta header needs {144 + group_len} bytes, the file has {size}"
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if ts in DEFLATED_SYNTAXES:
        return None  # offsets are in the inflated stream; zlib itself reports a cut-off file
    end, tag = 0, None
    for elem in ds._dict.values():  # raw elements: still as read, with their file offsets
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if tell is not None and length is not None and length != 0xFFFFFFFF and tell + length > end:
            end, tag = tell + length, elem.tag
    if tag is not None and end > size:
        from pydicom.datadict import keyword_for_tag

        name = keyword_for_tag(tag) or str(tag)
        return f"element {name} {tag} needs {end} bytes, the file has {size}"
    return None


DEFLATED_SYNTAXES = ("1.2.840.10008.1.2.1.99",)
"""Deflated explicit VR little endian: the data set after the file meta is zlib-compressed, so the
element offsets pydicom records are offsets in the *inflated* stream, not in the file."""


def read_dicom_dataset(path: str | os.PathLike, *, pixels: bool = True) -> Any:
    """Parse a DICOM file -> its pydicom Dataset, or `DataError` naming the file and the reason.

    Every transfer syntax pydicom parses is read (deflated included); ``pixels=False`` stops before
    the pixel data (a header check needs no pixels). pydicom's own log records and warnings go to
    the ``pydicom`` logger, which the QA command sends to its log file, not to the console.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    with pydicom_warnings_logged(path):
        try:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
            except InvalidDicomError:
                # .dcm without the Part 10 preamble
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=not pixels)
        except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(
                path, f"truncated or corrupt DICOM file ({type(err).__name__}: {_one_line(err)})"
            ) from None
        except Exception as err:  # pydicom raises many types on garbage input
            raise DataError(
                path, f"cannot parse DICOM file ({type(err).__name__}: {_one_line(err)})"
            ) from None
    if pixels:
        cut = _dicom_truncation(ds, path.stat().st_size)
        if cut is not None:
            raise DataError(path, f"truncated or corrupt DICOM file: {cut}")
    return ds


@contextlib.contextmanager
def pydicom_warnings_logged(path: str | os.PathLike) -> Iterator[None]:
    """Warnings raised inside (pydicom's "invalid value" kind) become records of the ``pydicom``
    logger naming the file, instead of lines on the console."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                logging.getLogger("pydicom").warning("%s: %s", path, w.message)


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (pydicom's run over several)."""
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _read_dicom(path: Path, frame_index: int | None) -> tuple[np.ndarray, dict]:
    return dicom_pixels(read_dicom_dataset(path), path, frame_index)


def dicom_pixels(
    ds: Any, path: str | os.PathLike, frame_index: int | None = None
) -> tuple[np.ndarray, dict]:
    """A parsed DICOM Dataset -> (float32 (H, W) after rescale, meta): the anterior frame of a
    multi-frame file (else ``frame_index``), colour to luminance, MONOCHROME1 inverted.
    ``path`` names the file (or the received object) in errors."""
    path = Path(path)
    modality = str(ds.get("Modality", "") or "")
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", str(sop)) if sop else "unknown"
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if modality.upper() in _NON_IMAGE_MODALITIES:
        raise DataError(
            path, f"not an image: a {modality} object ({sop_name}); only planar images are read"
        )
    if not has_pixels:
        if not modality and not sop:
            raise DataError(
                path, "not a readable DICOM image: no SOP class, modality or pixel data (corrupt?)"
            )
        raise DataError(
            path,
            f"not an image: no pixel data (Modality {modality or 'unknown'}, SOP class {sop_name})",
        )
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with pydicom_warnings_logged(path):
            arr = ds.pixel_array
    except Exception as err:
        msg = str(err)
        compressed = bool(ts is not None and getattr(ts, "is_compressed", False))
        if compressed and re.search(r"missing|plugin|dependenc|handler|install", msg, re.I):
            raise DataError(
                path,
                f"compressed transfer syntax {getattr(ts, 'name', ts)} ({ts}) cannot be decoded: "
                "install pylibjpeg with pylibjpeg-libjpeg (JPEG, JPEG-LS) or pylibjpeg-openjpeg "
                "(JPEG 2000), or python-gdcm",
            ) from None
        raise DataError(
            path,
            f"cannot decode pixel data, truncated or corrupt? ({type(err).__name__}: "
            f"{_one_line(err)})",
        ) from None

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frame_used: int | None = None
    views = _frame_views(ds, n_frames)
    if n_frames > 1:
        if arr.ndim != (4 if samples > 1 else 3) or arr.shape[0] != n_frames:
            raise DataError(path, f"pixel data shape {arr.shape} does not match {n_frames} frames")
        anterior = [i for i, v in enumerate(views) if _is_anterior(v)]
        if anterior:
            frame_used = anterior[0]
        elif frame_index is not None:
            if not -n_frames <= int(frame_index) < n_frames:
                raise DataError(
                    path, f"frame_index {frame_index} out of range for {n_frames} frames"
                )
            frame_used = int(frame_index) % n_frames
        else:
            known = ", ".join(f"{i}: {v}" for i, v in enumerate(views) if v) or "none"
            raise DataError(
                path,
                f"multi-frame image with {n_frames} frames and no view information naming the "
                f"anterior view (views found: {known}): set data.frame_index",
            )
        arr = arr[frame_used]
    else:
        frame_used = 0
    pixels = _luminance(arr) if samples > 1 and arr.ndim == 3 else arr.astype(np.float32)
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    if slope != 1.0 or intercept != 0.0:
        pixels = pixels * np.float32(slope) + np.float32(intercept)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if photometric == "MONOCHROME1":  # low values are bright: flip so activity is high
        pixels = np.float32(pixels.max() + pixels.min()) - pixels

    def s(key: str) -> str | None:
        v = ds.get(key)
        return str(v) if v not in (None, "") else None

    meta = {
        "format": "dicom",
        "modality": modality or None,
        "series_description": s("SeriesDescription"),
        "protocol_name": s("ProtocolName"),
        "patient_id": s("PatientID"),
        "study_uid": s("StudyInstanceUID"),
        "series_uid": s("SeriesInstanceUID"),
        "sop_instance_uid": s("SOPInstanceUID"),
        "radiopharmaceutical": _radiopharmaceutical(ds),
        "view": views[frame_used] if views else None,
        "frame": frame_used,
        "n_frames": n_frames,
        "photometric": photometric or None,
        "transfer_syntax": str(ts) if ts is not None else None,
        "rescale": [slope, intercept],
    }
    return pixels, meta


# --------------------------------------------------------------------------------------------------
# File discovery
# --------------------------------------------------------------------------------------------------
def _norm_extensions(extensions: Iterable[str] | None) -> set[str]:
    if extensions is None:
        return set(DEFAULT_EXTENSIONS)
    return {str(e).lower().lstrip(".") if e is not None else "" for e in extensions}


def _is_candidate(path: Path, extensions: set[str]) -> bool:
    """Image file by extension; extension-less files only when they carry the DICOM preamble."""
    if path.name == "DICOMDIR":
        return False
    ext = _extension(path)
    if ext == "":
        return "" in extensions and has_dicom_preamble(path)
    return ext in extensions


def walk_files(root: Path, errors: list[DataError]) -> Iterator[Path]:
    """All files under ``root`` (sorted, hidden entries skipped), following directory symlinks once.

    A symlink that leads back to a folder already visited (a loop, or a second route to the same
    folder) is reported in ``errors`` and not followed, so a loop cannot recurse forever.
    """
    seen: set[str] = set()

    def visit(folder: Path) -> Iterator[Path]:
        real = os.path.realpath(folder)
        if real in seen:
            errors.append(
                DataError(
                    folder, f"symlink loop: leads back to {real}, already visited; not followed"
                )
            )
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            errors.append(DataError(folder, f"cannot list folder ({err.strerror or err})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            p = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = entry.is_file(follow_symlinks=True)
            except OSError as err:  # ELOOP on a self-referencing link
                errors.append(DataError(p, f"unreadable entry ({err.strerror or err})"))
                continue
            if is_dir:
                yield from visit(p)
            elif is_file:
                yield p
            elif entry.is_symlink():
                errors.append(DataError(p, "broken symbolic link (or a link loop)"))

    yield from visit(root)


def _class_dir_map(data_cfg: Mapping[str, Any]) -> dict[str, str]:
    raw = _cfg_get(data_cfg, "class_dirs", DEFAULT_CLASS_DIRS)
    dirs = {str(k): str(v) for k, v in dict(to_plain(raw)).items()}
    unknown = set(dirs) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(
            f"data.class_dirs: unknown class name(s) {sorted(unknown)}; use {CLASS_NAMES}"
        )
    return dirs


def label_aliases(class_dirs: Mapping[str, str] | None = None) -> dict[str, int]:
    """Accepted label spellings (lower case) -> integer label: class names, folder names, 0/1."""
    aliases: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
    aliases.update({str(i): i for i in range(len(CLASS_NAMES))})
    for name, folder in (class_dirs or DEFAULT_CLASS_DIRS).items():
        aliases[str(folder).lower()] = CLASS_NAMES.index(name)
    return aliases


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    path: Path
    label: int | None
    patient_id: str | None = None
    rel: str | None = None
    subgroup: str | None = None  # the data.subgroup column's cell, as written


class _Collector:
    """Applies on_error: raise the first error, or collect them all."""

    def __init__(self, on_error: str) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.raise_first = on_error == "raise"
        self.errors: list[DataError] = []

    def add(self, err: DataError) -> None:
        if self.raise_first:
            raise err
        log.warning("skipped %s", err)
        self.errors.append(err)


def _folder_entries(data_cfg: Mapping[str, Any], col: _Collector) -> list[_Entry]:
    root_value = _cfg_get(data_cfg, "root")
    if root_value in (None, ""):
        raise DataError("data.root", "no data folder given: set data.root=DIR")
    root = Path(str(root_value)).expanduser()
    if not root.is_dir():
        raise DataError(root, "data folder does not exist" if not root.exists() else "not a folder")
    extensions = _norm_extensions(_cfg_get(data_cfg, "extensions"))
    walk_errors: list[DataError] = []
    entries: list[_Entry] = []
    class_dirs_raw = _class_dirs_or_none(data_cfg)
    if class_dirs_raw is None or (isinstance(class_dirs_raw, str) and not class_dirs_raw):
        # No class folders: every image below root, label unknown (prediction, the preprocess CLI).
        for p in walk_files(root, walk_errors):
            if _is_candidate(p, extensions):
                entries.append(_Entry(p, None, rel=p.relative_to(root).as_posix()))
        for err in walk_errors:
            col.add(err)
        if not entries:
            raise DataError(root, f"no image files found (extensions: {_ext_list(extensions)})")
        return entries

    class_dirs = _class_dir_map(data_cfg)
    by_folder = {folder.lower(): CLASS_NAMES.index(name) for name, folder in class_dirs.items()}
    expected = ", ".join(f"'{class_dirs[n]}'" for n in CLASS_NAMES if n in class_dirs)
    found_any_dir = False
    for child in sorted(root.iterdir(), key=lambda q: q.name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            found_any_dir = True
            label = by_folder.get(child.name.lower())
            if label is None:
                col.add(
                    DataError(
                        child,
                        f"unknown label folder '{child.name}': expected one of {expected} "
                        "(map class names to folder names with data.class_dirs)",
                    )
                )
                continue
            for p in walk_files(child, walk_errors):
                if _is_candidate(p, extensions):
                    entries.append(_Entry(p, label, rel=p.relative_to(root).as_posix()))
        elif child.is_file() and _is_candidate(child, extensions):
            col.add(
                DataError(child, f"image outside a class folder: move it into one of {expected}")
            )
    for err in walk_errors:
        col.add(err)
    if not found_any_dir:
        raise DataError(root, f"no class folders found: expected subfolders {expected}")
    return entries


def _ext_list(extensions: set[str]) -> str:
    return ", ".join(sorted("(none: DICOM)" if e == "" else e for e in extensions))


def _manifest_entries(data_cfg: Mapping[str, Any], col: _Collector) -> list[_Entry]:
    value = _cfg_get(data_cfg, "manifest")
    if value in (None, ""):
        raise DataError("data.manifest", "no manifest given: set data.manifest=FILE.csv")
    manifest = Path(str(value)).expanduser()
    if not manifest.is_file():
        raise DataError(manifest, "manifest file does not exist")
    aliases = label_aliases(_class_dir_map(data_cfg))
    accepted = ", ".join(sorted(aliases))
    sub_col = subgroup_column(data_cfg)
    base = manifest.parent
    entries: list[_Entry] = []
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(manifest, "empty manifest (no header line)")
            cols = [h.strip().lower() for h in header]
            if "path" not in cols:
                raise DataError(
                    manifest, f"manifest has no 'path' column (columns: {', '.join(cols)})"
                )
            i_path = cols.index("path")
            i_label = cols.index("label") if "label" in cols else None
            i_pid = cols.index("patient_id") if "patient_id" in cols else None
            i_sub = None
            if sub_col is not None:
                if sub_col.lower() not in cols:
                    raise DataError(
                        manifest,
                        f"manifest has no column '{sub_col}' (data.subgroup; columns: "
                        f"{', '.join(cols)})",
                    )
                i_sub = cols.index(sub_col.lower())
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                where = f"{manifest}:{line}"
                if len(row) != len(cols):
                    col.add(DataError(where, f"expected {len(cols)} columns, got {len(row)}"))
                    continue
                raw_path = row[i_path].strip()
                if not raw_path:
                    col.add(DataError(where, "empty path"))
                    continue
                p = Path(raw_path).expanduser()
                p = p if p.is_absolute() else base / p
                label: int | None = None
                if i_label is not None:
                    text = row[i_label].strip().lower()
                    if text not in aliases:
                        col.add(
                            DataError(
                                where,
                                f"unknown label '{row[i_label].strip()}' for {raw_path}: "
                                f"expected one of {accepted}",
                            )
                        )
                        continue
                    label = aliases[text]
                sub: str | None = None
                if i_sub is not None:
                    sub = row[i_sub].strip()
                    if is_missing(sub):
                        shown = f"'{sub}'" if sub else "empty"
                        col.add(
                            DataError(
                                where,
                                f"row {line}, column '{sub_col}' (data.subgroup) is {shown} for "
                                f"{raw_path}: every image needs a value (0/1, yes/no, true/false "
                                "or any category name, e.g. 'unknown')",
                            )
                        )
                        continue
                if not p.exists():
                    col.add(DataError(p, f"listed in {manifest} (line {line}) but not found"))
                    continue
                pid = row[i_pid].strip() if i_pid is not None else ""
                try:
                    rel = p.resolve().relative_to(base.resolve()).as_posix()
                except ValueError:
                    rel = p.name
                entries.append(_Entry(p, label, pid or None, rel, sub))
    except UnicodeDecodeError as err:
        raise DataError(manifest, f"manifest is not UTF-8 text ({err})") from None
    if sub_col is not None:  # yes/no-like columns read as yes/no, others as written
        for e, v in zip(entries, normalise([e.subgroup or "" for e in entries]), strict=True):
            e.subgroup = v
    if not entries and not col.errors:
        raise DataError(manifest, "manifest lists no images")
    return entries


def _unique_ids(entries: list[_Entry]) -> list[str]:
    """File stems, made unique by the relative path where two files share a stem."""
    stems = [e.path.stem for e in entries]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    ids = []
    for e, s in zip(entries, stems, strict=True):
        if counts[s] > 1:
            rel = e.rel or e.path.as_posix()
            s = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
        ids.append(s)
    seen: dict[str, int] = {}
    out = []
    for s in ids:
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.append(s if n == 0 else f"{s}#{n}")
    return out


def _read_entries(
    entries: list[_Entry], data_cfg: Mapping[str, Any], col: _Collector
) -> list[Study]:
    frame_index = _cfg_get(data_cfg, "frame_index")
    frame_index = None if frame_index is None else int(frame_index)
    duplicates = str(_cfg_get(data_cfg, "duplicates", "warn"))
    if duplicates not in ("warn", "error"):
        raise ValueError(f"data.duplicates must be 'warn' or 'error', got {duplicates!r}")
    digests: dict[str, str] = {}
    studies: list[Study] = []
    for entry, sid in zip(entries, _unique_ids(entries), strict=True):
        try:
            digest = hashlib.sha1(entry.path.read_bytes()).hexdigest()
        except OSError as err:
            col.add(DataError(entry.path, f"cannot read file ({err.strerror or err})"))
            continue
        first = digests.get(digest)
        if first is not None and duplicates == "error":
            col.add(DataError(entry.path, f"identical bytes to {first} (duplicate file)"))
            continue
        try:
            pixels, meta = read_image(entry.path, frame_index=frame_index)
        except DataError as err:
            col.add(err)
            continue
        digests.setdefault(digest, str(entry.path))
        if first is not None:
            log.warning("%s: identical bytes to %s (duplicate file)", entry.path, first)
            meta["duplicate_of"] = first
        meta["sha1"] = digest
        meta["pixel_hash"] = pixel_hash(pixels)
        if entry.rel is not None:
            meta["relpath"] = entry.rel
        if entry.subgroup is not None:
            meta["subgroup"] = entry.subgroup
        patient = entry.patient_id or meta.get("patient_id") or str(entry.path)
        studies.append(
            Study(
                id=sid,
                pixels=pixels,
                label=entry.label,
                patient_id=str(patient),
                path=str(entry.path),
                meta=meta,
            )
        )
    return studies


def _phantom_studies(data_cfg: Mapping[str, Any]) -> list[Study]:
    from lung_cls.data.phantom import simulate_cohort  # lazy: only the phantom source needs it

    sim = to_plain(_cfg_get(data_cfg, "sim", {}))
    cases = simulate_cohort(
        sim,
        int(_cfg_get(data_cfg, "n_perfusion", 394)),
        int(_cfg_get(data_cfg, "n_ventilation", 136)),
        int(_cfg_get(data_cfg, "phantom_seed", 0)),
        pack_masks=True,  # 1/8 of the memory: the 530-image cohort's masks are ~100 MB as bool
    )
    studies = []
    for c in cases:
        studies.append(
            Study(
                id=c.id,
                pixels=c.image,  # uint16 counts, exact: half the memory of a float32 copy
                label=int(c.label),
                patient_id=str(c.patient_id),
                path=f"phantom://{c.id}",
                meta={
                    "format": "phantom",
                    "view": "ANTERIOR",
                    "modality": "NM",
                    "pixel_hash": pixel_hash(c.image),
                },  # fmt: skip
                truth={"params": c.params, "masks": c.masks},
            )
        )
    return studies


def _check_classes(
    studies: list[Study], data_cfg: Mapping[str, Any], where: str, *, per_folder: bool
) -> None:
    if bool(_cfg_get(data_cfg, "allow_empty_class", False)):
        return
    labels = {s.label for s in studies}
    if labels == {None} or not studies:
        return
    dirs = _class_dir_map(data_cfg) if per_folder else {}
    for label, name in enumerate(CLASS_NAMES):
        if label not in labels:
            place = str(Path(where) / dirs[name]) if per_folder else where
            raise DataError(
                place,
                f"no readable {name} images: both classes are needed "
                "(set data.allow_empty_class=true to load one class only)",
            )


def load_studies(data_cfg: Mapping[str, Any]) -> tuple[list[Study], list[DataError]]:
    """Read every study the data config points at -> (studies, skipped files).

    ``data_cfg.source``: ``phantom`` (the simulator), ``folder`` (``root`` with one subfolder per
    class, names in ``class_dirs``; ``class_dirs: null`` reads all images label-less) or
    ``manifest`` (CSV path,label[,patient_id]). With ``on_error: raise`` the first bad file raises
    its `DataError`; with ``skip`` bad files are returned as the second item so the caller can print
    them. An empty folder or a class without any readable image always raises.
    """
    source = str(_cfg_get(data_cfg, "source", "phantom"))
    check_subgroup_source(data_cfg, source)
    col = _Collector(str(_cfg_get(data_cfg, "on_error", "raise")))
    if source == "phantom":
        studies = _phantom_studies(data_cfg)
        where = "phantom://"
    elif source == "folder":
        entries = _folder_entries(data_cfg, col)
        studies = _read_entries(entries, data_cfg, col)
        where = str(Path(str(_cfg_get(data_cfg, "root"))).expanduser())
        if not studies:
            raise DataError(where, f"no readable images ({len(col.errors)} file(s) skipped)")
    elif source == "manifest":
        entries = _manifest_entries(data_cfg, col)
        studies = _read_entries(entries, data_cfg, col)
        where = str(_cfg_get(data_cfg, "manifest"))
        if not studies:
            raise DataError(where, f"no readable images ({len(col.errors)} row(s) skipped)")
    else:
        raise ValueError(f"data.source must be phantom, folder or manifest, got {source!r}")
    _check_classes(studies, data_cfg, where, per_folder=source == "folder")
    n_by = {CLASS_NAMES[k]: sum(s.label == k for s in studies) for k in range(len(CLASS_NAMES))}
    log.info(
        "Loaded %d studies from %s source %s (%d skipped)",
        len(studies),
        source,
        n_by,
        len(col.errors),
    )
    return studies, col.errors


def source_fingerprint(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the loaded studies depend on, cheaply (stat only): the key of the pre-processing cache.

    Folder/manifest: each candidate file's path, size and mtime (and the manifest's bytes);
    phantom: the simulator config, the counts, the seed and the simulator's source code.
    """
    source = str(_cfg_get(data_cfg, "source", "phantom"))
    keys = ("source", "class_dirs", "extensions", "frame_index", "on_error", "duplicates",
            "allow_empty_class")  # fmt: skip
    fp: dict[str, Any] = {k: to_plain(_cfg_get(data_cfg, k)) for k in keys}
    fp["subgroup"] = subgroup_column(data_cfg)  # the column read (phantom: the neck truth)
    if source == "phantom":
        fp["sim"] = to_plain(_cfg_get(data_cfg, "sim", {}))
        fp["counts"] = [_cfg_get(data_cfg, "n_perfusion"), _cfg_get(data_cfg, "n_ventilation")]
        fp["phantom_seed"] = _cfg_get(data_cfg, "phantom_seed")
        code = Path(__file__).with_name("phantom.py")
        fp["phantom_code"] = hashlib.sha1(code.read_bytes()).hexdigest() if code.exists() else None
        return fp
    files: list[str] = []
    if source == "folder":
        root = Path(str(_cfg_get(data_cfg, "root", ""))).expanduser()
        fp["root"] = str(root.resolve()) if root.exists() else str(root)
        errors: list[DataError] = []
        paths = list(walk_files(root, errors)) if root.is_dir() else []
        fp["walk_errors"] = [str(e) for e in errors]
    elif source == "manifest":
        manifest = Path(str(_cfg_get(data_cfg, "manifest", ""))).expanduser()
        fp["manifest"] = str(manifest.resolve()) if manifest.exists() else str(manifest)
        paths = []
        if manifest.is_file():
            data = manifest.read_bytes()
            fp["manifest_sha1"] = hashlib.sha1(data).hexdigest()
            try:
                rows = list(csv.reader(data.decode("utf-8-sig").splitlines()))
                i = [h.strip().lower() for h in rows[0]].index("path")
                for row in rows[1:]:
                    if len(row) > i and row[i].strip():
                        q = Path(row[i].strip()).expanduser()
                        paths.append(q if q.is_absolute() else manifest.parent / q)
            except (IndexError, ValueError, UnicodeDecodeError):
                pass
    else:
        paths = []
    for p in paths:
        try:
            st = p.stat()
            files.append(f"{p}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            files.append(f"{p}|missing")
    fp["files"] = files
    return fp
