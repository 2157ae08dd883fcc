"""Check one received series: is it a lung V/Q series, which image is the anterior one, and what
the QA check says about it.

The node never decides anything about the image itself: it picks the image and its header texts
and asks the QA library through `check_one`, which runs the QA gate of ``lung_cls.qa`` (the
header gate on the instance's dataset, then the image gate and the classifier). `verdict_of` turns the QA row into the node's series status:

    ok / review      forwarded (review is flagged in the audit log)
    mismatch         the confident prediction contradicts the declared class
    rejected         a lung series whose image the check refused (unreadable, no anterior view ...)
    passed           not a lung V/Q series (other modality, no lung keyword): not checked
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lung_cls.qa.declared import dataset_texts

if TYPE_CHECKING:
    from lung_cls.qa.backends import Ensemble
    from lung_cls.qa.batch import PredictOptions

log = logging.getLogger("lung_cls.node")

PASSED, REJECTED, REPORT = "passed", "rejected", "report"
#: Series statuses the node can give (``received`` before the check).
SERIES_STATUSES = ("ok", "review", "mismatch", REJECTED, PASSED)

DEFAULT_LUNG_KEYWORDS: tuple[str, ...] = (
    "lung", "lungs", "pulmonary", "V/Q", "VQ", "V-Q", "Q/V", "ventilation/perfusion",
)  # fmt: skip


def check_one(
    ens: Ensemble,
    pixels: Any,
    header: Mapping[str, Any],
    name: str,
    options: PredictOptions | None = None,
    dataset: Any = None,
) -> dict[str, Any]:
    """The adapter to the QA library: one image in memory and its header texts -> the QA row.
    With ``dataset`` (the instance, pixels included) the header gate runs on it first."""
    from lung_cls.qa.batch import check_image

    return check_image(ens, pixels, header, name, options, dataset=dataset)


@dataclass
class Verdict:
    """The node's answer for one series."""

    status: str
    declared: str | None = None
    predicted: str | None = None
    prob_perfusion: float | None = None
    review: bool = False
    reason: str | None = None
    """Why it is held or rejected (one line), or why it was passed."""
    image: str | None = None
    """The SOP instance the check used."""
    row: dict[str, Any] = field(default_factory=dict)


def verdict_of(row: Mapping[str, Any]) -> Verdict:
    """A QA row -> the series verdict (``error: <reason>`` -> ``rejected``)."""
    status = str(row.get("status") or "")
    prob = row.get("prob_perfusion")
    common = {
        "declared": row.get("declared"),
        "predicted": row.get("predicted"),
        "prob_perfusion": None if prob in (None, "") else float(prob),
        "row": dict(row),
    }
    if status.startswith("error") or status == REJECTED or status.startswith("reject"):
        reason = status.split(":", 1)[1].strip() if ":" in status else status
        return Verdict(REJECTED, reason=f"rejected: {reason}", **common)
    if status == "mismatch":
        p = common["prob_perfusion"]
        return Verdict(
            "mismatch",
            reason=f"declared {row.get('declared')}, model says {row.get('predicted')} "
            f"(P(perfusion)={p:.3f})",
            **common,
        )
    if status == "review":
        return Verdict("review", review=True, **common)
    return Verdict(status or "ok", **common)


class LungRule:
    """Which series the node checks: an allowed modality and a lung keyword in any header text."""

    def __init__(
        self, keywords: Sequence[str] | None = None, modalities: Sequence[str] | None = ("NM",)
    ) -> None:
        from lung_cls.qa.declared import _keyword_pattern

        words = list(DEFAULT_LUNG_KEYWORDS if keywords is None else keywords)
        self.pattern = re.compile("|".join(_keyword_pattern(w) for w in words)) if words else None
        self.modalities = {m.upper() for m in modalities} if modalities else None

    def why_not(self, ds: Any, texts: Mapping[str, str]) -> str | None:
        """None for a lung V/Q series; else why it passes unchecked."""
        modality = str(ds.get("Modality", "") or "").upper()
        if self.modalities is not None and modality not in self.modalities:
            return f"modality {modality or 'unknown'} is not checked"
        if self.pattern is None:
            return None
        for text in texts.values():
            if self.pattern.search(str(text).lower().replace("_", " ")):
                return None
        return "no lung keyword in the header"


def _views(ds: Any) -> list[str | None]:
    from lung_cls.data.sources import _frame_views

    n = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        return _frame_views(ds, n)
    except Exception:  # noqa: BLE001 - a header that says nothing usable names no view
        return [None] * n


def is_anterior(ds: Any) -> bool:
    from lung_cls.data.sources import _is_anterior

    return any(_is_anterior(v) for v in _views(ds) if v)


def check_series(
    ens: Ensemble,
    files: Sequence[tuple[str, Path]],
    rule: LungRule,
    options: PredictOptions | None = None,
) -> Verdict:
    """``files``: (SOP instance UID, spool file) of one series -> its verdict.

    Reads headers only, then the pixels of the one image it checks: the anterior view (an
    instance whose view says so, or the anterior frame of a multi-frame instance); a series of
    one instance is checked on that instance, whose reader picks its anterior frame or refuses.
    """
    import pydicom

    from lung_cls.data.sources import read_image
    from lung_cls.errors import DataError

    headers = []
    for sop, path in files:
        try:
            headers.append((sop, path, pydicom.dcmread(path, stop_before_pixels=True)))
        except Exception as err:  # noqa: BLE001 - it was parsed once already on receipt
            log.warning("%s: header unreadable in the spool (%s)", path, err)
    if not headers:
        return Verdict(REJECTED, reason="rejected: no readable instance in the series")
    sop0, _, ds0 = headers[0]
    texts = dataset_texts(ds0)
    why = rule.why_not(ds0, texts)
    if why is not None:
        return Verdict(PASSED, reason=why)
    chosen = [h for h in headers if is_anterior(h[2])]
    if not chosen and len(headers) == 1:
        chosen = headers
    if not chosen:
        return Verdict(
            REJECTED,
            reason=f"rejected: no anterior view among the {len(headers)} instances of the series",
        )
    sop, path, ds = chosen[0]
    frame_index = options.frame_index if options is not None else None
    try:
        pixels, _ = read_image(path, frame_index=frame_index)
    except DataError as err:
        verdict = Verdict(REJECTED, reason=f"rejected: {err.reason}", image=sop)
        from lung_cls.qa.declared import KeywordMatcher, declared_from_texts

        read = options.read_options() if options is not None else None
        verdict.declared = declared_from_texts(
            dataset_texts(ds),
            read.matcher if read is not None else KeywordMatcher(),
        ).cls
        return verdict
    try:  # the whole instance, for the header gate (the headers above stop before the pixels)
        full = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - read_image just read it; say what changed
        return Verdict(REJECTED, reason=f"rejected: unreadable in the spool ({err})", image=sop)
    verdict = verdict_of(check_one(ens, pixels, dataset_texts(full), sop, options, dataset=full))
    verdict.image = sop
    return verdict
