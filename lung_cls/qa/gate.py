"""The header gate: refuse, before any pixel is used, what is not an anterior planar NM lung study.

A QA tool that answers ``ok`` for a chest radiograph is worse than none: a radiographer reads "ok"
as "a valid, correctly labelled lung study". So the DICOM header is checked first, in this order,
and the first failed check decides (``rejected: <reason>``, one line, ``gate = header``):

1. the modality is in ``modalities`` (default NM): ``rejected: Modality MR, not NM``;
2. the SOP class is an image storage class (not RT dose, a segmentation, a structured report);
3. the acquisition is planar: not whole-body, tomographic, dynamic or gated - judged from Image
   Type (value 3 of an NM image: STATIC, WHOLE BODY, DYNAMIC, GATED, TOMO, RECON TOMO ...), the
   NM-specific sequences (rotation, phase, R-R interval, slice vectors, whole-body technique),
   the frame count and the matrix shape (a 1024 x 256 strip is a whole-body scan);
4. the header names no other study (bone, thyroid, renal, cardiac ...: ``other_study_keywords``
   in the series and study texts and BodyPartExamined);
5. the anterior view is present (a view code, ImageID, frame label or ViewPosition naming it);
   a multi-frame file whose views are unnamed passes only with ``frame_index``.

`header_facts` reads what the checks need from a pydicom Dataset (no pixels), `header_gate`
decides; `gate_dataset` does both, for a caller holding a received Dataset (the DICOM node).
Pure: pydicom is the only import, and only for the SOP class names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lung_cls.data.sources import _frame_views, _is_anterior

NM_IMAGE_STORAGE = ("1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.5")  # current, retired

#: Image Type value 3 of an NM image (PS3.3 C.8.4.7) -> what it means for this tool.
NON_PLANAR_TYPES: dict[str, str] = {
    "WHOLE BODY": "whole-body",
    "DYNAMIC": "dynamic",
    "GATED": "gated",
    "TOMO": "tomographic",
    "GATED TOMO": "tomographic",
    "RECON TOMO": "tomographic",
    "RECON GATED TOMO": "tomographic",
}
#: NM attributes that only a non-planar acquisition carries -> what it is.
NON_PLANAR_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("RotationInformationSequence", "tomographic"),
    ("NumberOfRotations", "tomographic"),
    ("SliceVector", "tomographic"),
    ("NumberOfSlices", "tomographic"),
    ("PhaseInformationSequence", "dynamic"),
    ("NumberOfPhases", "dynamic"),
    ("GatedInformationSequence", "gated"),
    ("NumberOfRRIntervals", "gated"),
    ("NumberOfTimeSlots", "gated"),
    ("WholeBodyTechnique", "whole-body"),
    ("ScanLength", "whole-body"),
)

DEFAULT_OTHER_STUDIES: dict[str, tuple[str, ...]] = {
    "bone": ("bone", "skeletal", "skeleton", "MDP", "HDP", "HMDP", "medronate", "oxidronate"),
    "thyroid": ("thyroid", "parathyroid", "sestamibi parathyroid"),
    "renal": ("renal", "kidney", "kidneys", "renogram", "MAG3", "mertiatide", "DMSA", "succimer"),
    "cardiac": ("cardiac", "myocardial", "MPI", "MUGA", "sestamibi", "tetrofosmin", "thallium"),
    "hepatobiliary": ("HIDA", "mebrofenin", "hepatobiliary", "liver", "spleen"),
    "gastro-intestinal": ("gastric", "GI bleed", "Meckel"),
    "brain": ("brain", "DaTscan", "ioflupane", "HMPAO", "ECD"),
    "tumour": ("MIBG", "octreotide", "sentinel", "lymphoscintigraphy", "gallium"),
    "whole-body": ("whole body", "WB"),
}
"""Words that name another study; conf/predict.yaml (``gate.other_studies``) repeats them."""

LUNG_BODY_PARTS = ("CHEST", "LUNG", "THORAX", "")


@dataclass(frozen=True)
class GateSettings:
    """What the header gate accepts (``gate:`` in conf/predict.yaml)."""

    modalities: tuple[str, ...] = ("NM",)
    require_view: bool = True
    """A single-frame file must name its view; off: an unnamed view passes (with view unknown)."""
    max_aspect: float = 1.6
    """Rows / columns (or columns / rows) above this: a whole-body strip, not a planar chest."""
    max_static_frames: int = 8
    """A multi-frame file with more frames than this and not one distinct view per frame (a view
    repeated, or none) is a dynamic or gated series, whatever its Image Type says."""
    other_studies: Mapping[str, Sequence[str]] = field(
        default_factory=lambda: dict(DEFAULT_OTHER_STUDIES)
    )
    frame_index: int | None = None
    """Set by the user for multi-frame files without views: then any frame count passes step 5."""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, frame_index: int | None = None):
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"modalities", "require_view", "max_aspect", "max_static_frames",
                              "other_studies", "image"}  # fmt: skip
        if unknown:
            from lung_cls.errors import UserError

            raise UserError(f"gate: unknown key(s) {sorted(unknown)}")
        other = cfg.get("other_studies")
        return cls(
            modalities=tuple(str(m).upper() for m in (cfg.get("modalities") or ("NM",))),
            require_view=bool(cfg.get("require_view", True)),
            max_aspect=float(cfg.get("max_aspect", 1.6)),
            max_static_frames=int(cfg.get("max_static_frames", 8)),
            other_studies=(
                {str(k): tuple(str(w) for w in v or ()) for k, v in other.items()}
                if other is not None
                else dict(DEFAULT_OTHER_STUDIES)
            ),
            frame_index=frame_index,
        )


@dataclass
class HeaderFacts:
    """What the gate reads from a header; the row's ``modality``, ``sop_class`` and ``view``."""

    modality: str = ""
    sop_class_uid: str = ""
    sop_class: str = ""
    image_type: tuple[str, ...] = ()
    n_frames: int = 1
    rows: int = 0
    columns: int = 0
    has_pixels: bool = True
    views: list[str | None] = field(default_factory=list)
    attributes: tuple[str, ...] = ()
    texts: dict[str, str] = field(default_factory=dict)
    body_part: str = ""

    @property
    def view(self) -> str | None:
        """The anterior view's name if one frame has it, else the first named view."""
        anterior = [v for v in self.views if _is_anterior(v)]
        if anterior:
            return anterior[0]
        named = [v for v in self.views if v]
        return named[0] if named else None


@dataclass(frozen=True)
class GateResult:
    """``status`` None: passed. Otherwise ``rejected: <reason>`` and the check that decided."""

    status: str | None
    gate: str = "header"

    @property
    def passed(self) -> bool:
        return self.status is None


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _sop_name(uid: str) -> str:
    if not uid:
        return ""
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        return name if name != uid else uid
    except Exception:  # noqa: BLE001 - a malformed UID is shown as it is
        return uid


def header_facts(ds: Any, texts: Mapping[str, str] | None = None) -> HeaderFacts:
    """A pydicom Dataset (pixels not needed) -> the facts the gate checks."""
    meta = getattr(ds, "file_meta", None)
    uid = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
    image_type = ds.get("ImageType")
    if image_type is None:
        types: tuple[str, ...] = ()
    elif isinstance(image_type, str):
        types = tuple(t.strip().upper() for t in image_type.split("\\"))
    else:
        types = tuple(str(t).strip().upper() for t in image_type)
    n_frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    try:
        views = _frame_views(ds, n_frames)
    except Exception:  # noqa: BLE001 - a malformed detector sequence names no view
        views = [None] * n_frames
    if not any(views):
        for key in ("SeriesDescription", "ProtocolName"):  # "LUNG PERF ANT"
            text = str(ds.get(key) or "")
            if _is_anterior(text) or any(_is_anterior(w) for w in re.split(r"[\s_/-]+", text)):
                views = [text] + [None] * (n_frames - 1)
                break
    present = tuple(k for k, _ in NON_PLANAR_ATTRIBUTES if ds.get(k) not in (None, "", []))
    return HeaderFacts(
        modality=str(ds.get("Modality") or "").strip().upper(),
        sop_class_uid=uid,
        sop_class=_sop_name(uid),
        image_type=types,
        n_frames=n_frames,
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        has_pixels=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        views=list(views),
        attributes=present,
        texts=dict(texts or {}),
        body_part=str(ds.get("BodyPartExamined") or "").strip().upper(),
    )


def _words_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    parts = [
        r"[\s_/.-]*".join(re.escape(w) for w in re.split(r"[\s_/.-]+", str(word).strip()) if w)
        for word in words
        if str(word).strip()
    ]
    if not parts:
        return None
    return re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(parts) + r")(?![A-Za-z0-9])", re.I)


def other_study(
    texts: Mapping[str, str], body_part: str, other_studies: Mapping[str, Sequence[str]]
) -> str | None:
    """``"thyroid (series_description: THYROID ANT)"`` when the header names another study."""
    if body_part and body_part not in LUNG_BODY_PARTS:
        return f"body part {body_part}"
    for kind, words in other_studies.items():
        pattern = _words_pattern(words)
        if pattern is None:
            continue
        for name, text in texts.items():
            if name == "patient_id" or not text:
                continue
            hit = pattern.search(str(text))
            if hit:
                return f"a {kind} study ({name}: {str(text).strip()[:60]})"
    return None


def acquisition(facts: HeaderFacts, settings: GateSettings) -> str | None:
    """Why the acquisition is not planar, or None."""
    for t in facts.image_type[2:3]:
        if t in NON_PLANAR_TYPES:
            return f"{NON_PLANAR_TYPES[t]} acquisition (Image Type {'/'.join(facts.image_type)})"
    for key, kind in NON_PLANAR_ATTRIBUTES:
        if key in facts.attributes:
            return f"{kind} acquisition ({key} in the header)"
    if facts.rows and facts.columns:
        aspect = max(facts.rows, facts.columns) / min(facts.rows, facts.columns)
        if aspect > settings.max_aspect:
            return (
                f"{facts.rows} x {facts.columns} matrix (aspect {aspect:.1f}): a whole-body or "
                "spot strip, not a planar chest view"
            )
    distinct = len({str(v).strip().upper() for v in facts.views if v})
    if facts.n_frames > settings.max_static_frames and distinct < facts.n_frames:
        return (
            f"{facts.n_frames} frames with {distinct} distinct view(s): a dynamic or gated series"
        )
    return None


def header_gate(facts: HeaderFacts, settings: GateSettings | None = None) -> GateResult:
    """The checks of the module docstring, in order; the first that fails decides."""
    s = settings or GateSettings()
    if not facts.modality:
        return GateResult("rejected: no Modality in the header")
    if facts.modality not in s.modalities:
        return GateResult(f"rejected: Modality {facts.modality}, not {'/'.join(s.modalities)}")
    if not facts.sop_class_uid:
        return GateResult("rejected: no SOP class in the header")
    is_image = facts.sop_class_uid in NM_IMAGE_STORAGE or "Image Storage" in facts.sop_class
    if not is_image:
        return GateResult(f"rejected: {facts.sop_class} is not an image SOP class")
    if not facts.has_pixels:
        return GateResult(f"rejected: no pixel data ({facts.sop_class})")
    why = acquisition(facts, s)
    if why:
        return GateResult(f"rejected: {why}, not a planar lung view")
    other = other_study(facts.texts, facts.body_part, s.other_studies)
    if other:
        return GateResult(f"rejected: the header names {other}, not a lung V/Q study")
    named = [v for v in facts.views if v]
    if any(_is_anterior(v) for v in named):
        return GateResult(None)
    if named:
        shown = ", ".join(sorted({str(v) for v in named}))[:80]
        return GateResult(f"rejected: no anterior view (views: {shown})")
    if facts.n_frames > 1 and s.frame_index is None:
        return GateResult(
            f"rejected: {facts.n_frames} frames and no view naming the anterior one "
            "(set frame_index to pick it)"
        )
    if facts.n_frames == 1 and s.require_view:
        return GateResult(
            "rejected: no view in the header (ViewCodeSequence, ImageID, ViewPosition); "
            "set gate.require_view=false to accept unnamed views"
        )
    return GateResult(None)


def gate_dataset(
    ds: Any, settings: GateSettings | None = None, texts: Mapping[str, str] | None = None
) -> tuple[GateResult, HeaderFacts]:
    """A received pydicom Dataset -> (the header gate's result, the facts it read)."""
    if texts is None:
        from lung_cls.qa.declared import dataset_texts

        texts = dataset_texts(ds)
    facts = header_facts(ds, texts)
    return header_gate(facts, settings), facts


def facts_columns(facts: HeaderFacts | None) -> dict[str, Any]:
    """The row columns the header fills: ``modality``, ``sop_class``, ``view``."""
    if facts is None:
        return {}
    return {
        "modality": facts.modality or None,
        "sop_class": facts.sop_class or None,
        "view": facts.view,
    }
