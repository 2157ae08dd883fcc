"""The class a study *claims* to be, read from its header (or folder / manifest), for the QA check.

Why this exists: the pre-archive check compares what the model sees with what the study says it
is. A mislabelled series is exactly the error the tool must catch, so the declared class has to be
parsed from the same text a radiographer types or a camera protocol fills in: SeriesDescription,
ProtocolName, the radiopharmaceutical, ImageComments ... Those texts are free-form ("LUNG VENT ANT",
"Tc99m-MAA", "KR81M", "Q ANT"), so the parser matches a configurable keyword map, case-insensitive
and on word boundaries (so "MAA" does not fire inside "MAAX" and "vent" not inside "prevent").

Rules:
* Every keyword found in the series-level fields counts; keywords of both classes -> ``ambiguous``,
  none -> ``unknown``.
* Study-level fields (StudyDescription: "NM LUNG V/Q") often name *both* studies of a V/Q pair, so
  they are consulted only when the series-level fields say nothing.
* Phrases that name both studies at once ("V/Q", "VQ") are removed before matching, so the "Q" of
  "V/Q" is not read as perfusion.

Pure Python + pydicom: no Hydra or Lightning imports. (Moved here from ``lung_cls.data.declared``,
which re-exports it.)
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# _radiopharmaceutical: the one reader of that DICOM sequence, shared with the image reader.
from lung_cls.data.sources import CLASS_NAMES, _radiopharmaceutical
from lung_cls.errors import DataError

log = logging.getLogger(__name__)

VENTILATION, PERFUSION = CLASS_NAMES
AMBIGUOUS = "ambiguous"
UNKNOWN = "unknown"
KNOWN_CLASSES: tuple[str, str] = (VENTILATION, PERFUSION)

DEFAULT_KEYWORDS: dict[str, tuple[str, ...]] = {
    PERFUSION: (
        "MAA",
        "macroaggregated albumin",
        "macro aggregated albumin",
        "macroaggregated",
        "perfusion",
        "perf",
        "Q",
    ),
    VENTILATION: (
        "DTPA",
        "pentetate",
        "Technegas",
        "Galligas",
        "aerosol",
        "Kr-81m",
        "81m-Kr",
        "krypton",
        "Xe-133",
        "133-Xe",
        "xenon",
        "ventilation",
        "vent",
        "inhalation",
    ),
}
"""Default keyword map (conf/predict.yaml repeats it so it can be edited without code)."""

DEFAULT_IGNORE: tuple[str, ...] = (
    "V/Q", "V-Q", "VQ", "V+Q", "V & Q", "V and Q", "Q/V", "Q-V", "Q+V", "Q & V", "Q and V",
)  # fmt: skip
"""Phrases that name both studies; removed before matching."""

SERIES_FIELDS: tuple[str, ...] = (
    "series_description",
    "protocol_name",
    "radiopharmaceutical",
    "image_comments",
    "acquisition_comments",
    "image_id",
)
"""Header fields that describe the one series (checked first)."""

STUDY_FIELDS: tuple[str, ...] = ("study_description", "requested_procedure_description")
"""Header fields that describe the whole visit (checked only when the series fields are silent)."""

_DICOM_KEYWORDS: dict[str, str] = {
    "series_description": "SeriesDescription",
    "protocol_name": "ProtocolName",
    "image_comments": "ImageComments",
    "acquisition_comments": "AcquisitionComments",
    "image_id": "ImageID",
    "study_description": "StudyDescription",
    "requested_procedure_description": "RequestedProcedureDescription",
    "patient_id": "PatientID",
}


@dataclass(frozen=True)
class Declared:
    """The declared class of one study and the text that made it so."""

    cls: str
    """``perfusion``, ``ventilation``, ``ambiguous`` or ``unknown``."""
    evidence: tuple[str, ...] = field(default_factory=tuple)
    """``field: matched text`` for every keyword hit that counted, e.g. ``series_description: VENT``."""

    @property
    def known(self) -> bool:
        return self.cls in KNOWN_CLASSES

    def evidence_text(self) -> str:
        return "; ".join(self.evidence)


def _keyword_pattern(keyword: str) -> str:
    """A keyword -> regex: separators (space, '-', '_', '/') match any run of separators or none,
    and the keyword must not touch a letter or digit on either side."""
    kw = str(keyword).strip().lower()
    if not kw:
        raise ValueError("declared_keywords: empty keyword")
    parts = [re.escape(p) for p in re.split(r"[\s\-_/.]+", kw) if p]
    body = r"[\s\-_/.]*".join(parts)
    return rf"(?<![a-z0-9]){body}(?![a-z0-9])"


class KeywordMatcher:
    """Compiled keyword map: text -> which classes it names (and the matched snippets)."""

    def __init__(
        self,
        keywords: Mapping[str, Sequence[str]] | None = None,
        ignore: Sequence[str] | None = None,
    ) -> None:
        keywords = DEFAULT_KEYWORDS if keywords is None else keywords
        unknown = set(map(str, keywords)) - set(KNOWN_CLASSES)
        if unknown:
            raise ValueError(
                f"declared_keywords: unknown class name(s) {sorted(unknown)}; "
                f"use {list(KNOWN_CLASSES)}"
            )
        self.patterns: dict[str, re.Pattern[str]] = {}
        for cls in KNOWN_CLASSES:
            words = keywords.get(cls) or ()
            if isinstance(words, str):
                words = [words]
            # Longest first, so "perfusion" is reported rather than "perf" where both could match.
            ordered = sorted({str(w) for w in words}, key=len, reverse=True)
            if ordered:
                self.patterns[cls] = re.compile("|".join(_keyword_pattern(w) for w in ordered))
        ignore = DEFAULT_IGNORE if ignore is None else ignore
        ignore_pats = [_keyword_pattern(p) for p in ignore if str(p).strip()]
        self.ignore = re.compile("|".join(ignore_pats)) if ignore_pats else None

    @staticmethod
    def normalise(text: str) -> str:
        # '_' is a word character for \b; treat it as a space ("LUNG_VENT_ANT").
        return str(text).lower().replace("_", " ")

    def find(self, text: str | None) -> dict[str, list[str]]:
        """Classes named in ``text`` -> the snippets that named them (empty dict: none)."""
        if not text:
            return {}
        original = str(text)
        t = self.normalise(original)
        if self.ignore is not None:  # same length, so match spans index the original text
            t = self.ignore.sub(lambda m: " " * len(m.group(0)), t)
        hits: dict[str, list[str]] = {}
        for cls, pat in self.patterns.items():
            src = original if len(original) == len(t) else t  # lower() may change the length
            found = [src[m.start() : m.end()] for m in pat.finditer(t)]
            if found:
                hits[cls] = found
        return hits


def declared_from_texts(
    texts: Mapping[str, Any],
    matcher: KeywordMatcher | None = None,
    *,
    series_fields: Sequence[str] = SERIES_FIELDS,
    study_fields: Sequence[str] = STUDY_FIELDS,
) -> Declared:
    """Declared class from header texts (field name -> text; missing or empty fields are fine).

    Fields in ``series_fields`` are read first; ``study_fields`` only when the former name no class.
    Fields in neither list are ignored.
    """
    matcher = matcher or KeywordMatcher()
    for fields in (series_fields, study_fields):
        classes: set[str] = set()
        evidence: list[str] = []
        for name in fields:
            value = texts.get(name)
            if value is None:
                continue
            for cls, snippets in matcher.find(str(value)).items():
                classes.add(cls)
                evidence.extend(f"{name}: {s.strip()} -> {cls}" for s in snippets)
        if classes:
            cls = classes.pop() if len(classes) == 1 else AMBIGUOUS
            return Declared(cls, tuple(evidence))
    return Declared(UNKNOWN, ())


# --------------------------------------------------------------------------------------------------
# Where the texts come from
# --------------------------------------------------------------------------------------------------
def dicom_header_texts(path: str | os.PathLike) -> dict[str, str]:
    """The free-text header fields of a DICOM file (pixel data is not read): see `dataset_texts`.

    Raises whatever pydicom raises on a file that is not DICOM; callers reading pixels first
    already reported such files.
    """
    import pydicom

    return dataset_texts(pydicom.dcmread(path, stop_before_pixels=True, force=True))


def dataset_texts(ds: Any) -> dict[str, str]:
    """The free-text header fields the declared class is parsed from, of a pydicom Dataset.

    Apart from `dicom_header_texts` so that a caller holding a received Dataset (the DICOM node)
    needs no file. Radiopharmaceutical: every Radiopharmaceutical name and code meaning (agent and
    nuclide) of the RadiopharmaceuticalInformationSequence, joined with '; '.
    """
    out: dict[str, str] = {}
    for name, keyword in _DICOM_KEYWORDS.items():
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = " ".join(str(v) for v in value)
        out[name] = str(value)
    radiopharmaceutical = _radiopharmaceutical(ds)
    if radiopharmaceutical:
        out["radiopharmaceutical"] = radiopharmaceutical
    return out


def read_declared_manifest(path: str | os.PathLike) -> dict[str, str]:
    """A sidecar CSV ``path,declared`` (or ``path,label``) -> {resolved file path: class text}.

    Relative paths are relative to the manifest's folder. The class text goes through the same
    keyword matcher as header text, so "perfusion", "MAA" or "vent" all work.
    """
    manifest = Path(path).expanduser()
    if not manifest.is_file():
        raise DataError(manifest, "declared manifest not found")
    out: dict[str, str] = {}
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header:
            raise DataError(manifest, f"declared manifest has no 'path' column ({header})")
        col = next((c for c in ("declared", "label", "class") if c in header), None)
        if col is None:
            raise DataError(manifest, "declared manifest needs a 'declared' (or 'label') column")
        i_path, i_cls = header.index("path"), header.index(col)
        for row in reader:
            if len(row) <= max(i_path, i_cls) or not row[i_path].strip():
                continue
            p = Path(row[i_path].strip()).expanduser()
            p = p if p.is_absolute() else manifest.parent / p
            out[str(p.resolve())] = row[i_cls].strip()
    return out


def declared_for_file(
    path: str | os.PathLike,
    matcher: KeywordMatcher | None = None,
    *,
    is_dicom: bool,
    manifest: Mapping[str, str] | None = None,
    root: str | os.PathLike | None = None,
    series_fields: Sequence[str] = SERIES_FIELDS,
    study_fields: Sequence[str] = STUDY_FIELDS,
) -> tuple[Declared, dict[str, str]]:
    """Declared class of one file -> (Declared, the header texts read).

    Order: a manifest entry for the file wins (the user said so explicitly); then the DICOM header;
    for other files the names of the folders between ``root`` and the file ("perfusion/",
    "LUNG VENT/"). Anything unreadable gives ``unknown``, never an exception: the pixel reader
    reports broken files.
    """
    matcher = matcher or KeywordMatcher()
    p = Path(path)
    texts: dict[str, str] = {}
    if manifest:
        text = manifest.get(str(p.resolve()))
        if text:
            return declared_from_texts({"manifest": text}, matcher, series_fields=("manifest",)), {}
    if is_dicom:
        try:
            texts = dicom_header_texts(p)
        except Exception as err:  # noqa: BLE001 - unreadable header: nothing is declared
            log.debug("%s: header not readable for the declared class (%s)", p, err)
            return Declared(UNKNOWN, ()), {}
        return declared_from_texts(
            texts, matcher, series_fields=series_fields, study_fields=study_fields
        ), texts
    folders = _folders_between(p, root)
    if folders:
        decl = declared_from_texts(
            {f"folder[{i}]": name for i, name in enumerate(folders)},
            matcher,
            series_fields=[f"folder[{i}]" for i in range(len(folders))],
            study_fields=(),
        )
        # The nearest folder decides when folders disagree ("perfusion/2024/vent_redo/x.png").
        if decl.cls == AMBIGUOUS:
            for i in reversed(range(len(folders))):
                nearest = declared_from_texts(
                    {"folder": folders[i]}, matcher, series_fields=("folder",), study_fields=()
                )
                if nearest.cls != UNKNOWN:
                    return nearest, {}
        return decl, {}
    return Declared(UNKNOWN, ()), {}


def _folders_between(path: Path, root: str | os.PathLike | None) -> list[str]:
    """Folder names from ``root`` (exclusive) down to the file's parent; just the parent without
    a root."""
    parent = path.parent
    if root is None:
        return [parent.name] if parent.name else []
    try:
        rel = parent.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return [parent.name] if parent.name else []
    parts = [p for p in rel.parts if p not in ("", ".")]
    return parts if parts else [Path(root).resolve().name]


def keyword_map_from_config(cfg: Mapping[str, Iterable[str]] | None) -> dict[str, list[str]]:
    """Config (OmegaConf or dict) -> plain {class: [keywords]}; None -> the defaults."""
    if cfg is None:
        return {k: list(v) for k, v in DEFAULT_KEYWORDS.items()}
    return {str(k): [str(w) for w in (v or [])] for k, v in cfg.items()}
