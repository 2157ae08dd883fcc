"""The node's result as a DICOM Structured Report in the checked series' study (``highdicom``).

A Comprehensive SR, its own series in the same study, that names the series it reports on (as
evidence), the check's status, declared and predicted class, P(perfusion), the model and the
node's version, and a device UID. It says twice that it is not for diagnostic use: in a text item
and in the series description, and ``ContentQualification`` is ``RESEARCH``. Its UIDs are derived
from the checked series' UID, so the report of a series is one SOP instance however often it is
written (a restart after a crash writes the same instance again, never a second report).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from io import BytesIO
from typing import Any

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE: automated label check of the lung V/Q series"
SERIES_DESCRIPTION = "LUNG QA CHECK (not for diagnostic use)"


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["lung_cls node report", *map(str, parts)])


def device_uid(ae_title: str) -> str:
    """A stable UID for this node (its AE title names it)."""
    return _uid("device", ae_title)


def _code(value: str, meaning: str, scheme: str = "99LUNGQA"):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def build_report(
    evidence: Sequence[Any],
    result: Mapping[str, Any],
    model: Mapping[str, Any],
    ae_title: str,
) -> Any:
    """The SR dataset. ``evidence``: datasets (headers are enough) of the checked series;
    ``result``: status, declared, predicted, prob_perfusion, reason; ``model``: name, version."""
    import highdicom as hd
    from highdicom.sr import (
        ContainerContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
        UIDRefContentItem,
    )

    first = evidence[0]
    series_uid = str(first.SeriesInstanceUID)
    has = RelationshipTypeValues.CONTAINS

    def text(value: str, meaning: str, code: str) -> Any:
        return TextContentItem(
            name=_code(code, meaning), value=str(value)[:1024], relationship_type=has
        )

    items = [
        text(NOT_FOR_DIAGNOSIS, "Usage", "USAGE"),
        text(result.get("status", ""), "Check status", "STATUS"),
        text(result.get("declared") or "unknown", "Declared class", "DECLARED"),
        text(result.get("predicted") or "none", "Predicted class", "PREDICTED"),
        UIDRefContentItem(
            name=_code("SERIES", "Checked series"), value=series_uid, relationship_type=has
        ),
        text(model.get("name") or "lung_cls", "Model", "MODEL"),
        text(model.get("version") or "unknown", "Software version", "VERSION"),
        UIDRefContentItem(
            name=_code("DEVICE", "Device UID"), value=device_uid(ae_title), relationship_type=has
        ),
    ]
    if result.get("prob_perfusion") is not None:
        items.append(
            NumContentItem(
                name=_code("PPERF", "Probability of perfusion"),
                value=float(result["prob_perfusion"]),
                unit=_code("1", "no units", "UCUM"),
                relationship_type=has,
            )
        )
    if result.get("reason"):
        items.append(text(result["reason"], "Reason", "REASON"))
    root = ContainerContentItem(name=_code("LUNGQA", "Lung V/Q label check"), template_id=None)
    root.ContentSequence = items
    with warnings.catch_warnings():  # a one-part patient name is what the modality sent
        warnings.simplefilter("ignore", UserWarning)
        sr = _comprehensive_sr(hd, evidence, root, series_uid, model, ae_title)
    sr.ContentQualification = "RESEARCH"
    return sr


def _comprehensive_sr(hd: Any, evidence: Sequence[Any], root: Any, series_uid: str,
                      model: Mapping[str, Any], ae_title: str) -> Any:  # fmt: skip
    return hd.sr.ComprehensiveSR(
        evidence=list(evidence),
        content=root,
        series_instance_uid=_uid(series_uid, "series"),
        series_number=9901,
        sop_instance_uid=_uid(series_uid, "sop"),
        instance_number=1,
        manufacturer="lung_cls",
        manufacturer_model_name="lung_cls QA node",
        software_versions=str(model.get("version") or "unknown"),
        device_serial_number=ae_title,
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def encode(ds: Any) -> bytes:
    """A dataset -> Part 10 file bytes (with preamble and file meta), as the spool stores them."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
