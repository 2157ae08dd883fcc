"""The QA decision, pure: the members' P(perfusion) and the declared class -> a status.

* ``ok``        - the model is confident and agrees with the declared class (or nothing is declared);
* ``review``    - P(perfusion) lies inside the review band (default [0.2, 0.8], inclusive): the
  model is not sure, so the study is neither passed nor flagged; ``predicted`` is ``uncertain``.
  Also an ensemble whose members disagree by more than ``review_sd``, and a confident prediction
  for a study whose header contradicts itself (declared ``ambiguous``: keywords of both classes);
* ``mismatch``  - the model is confident (outside the band) and the declared class is known and
  different: the study is probably mislabelled;
* ``rejected: <reason>`` - not an anterior planar lung V/Q study: the header gate
  (`lung_cls.qa.gate`) or the image gate (`lung_cls.qa.ood`) refused it before any class is given;
* ``error: <reason>`` - the file could not be read or pre-processed (set by the reader, not here).

No model, no files: these functions are the whole policy, so they are tested on plain numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lung_cls.errors import UserError
from lung_cls.qa.declared import AMBIGUOUS, KNOWN_CLASSES, PERFUSION, VENTILATION

UNCERTAIN = "uncertain"
STATUSES = ("ok", "review", "mismatch", "rejected", "error")
DEFAULT_BAND: tuple[float, float] = (0.2, 0.8)


def check_review_band(band: Sequence[float] | None) -> tuple[float, float] | None:
    """Validate ``review_band``: ``[low, high]`` with 0 <= low <= 0.5 <= high <= 1, or None."""
    if band is None:
        return None
    values = list(band)
    if len(values) != 2:
        raise UserError(f"review_band must be [low, high] or null, got {values}")
    lo, hi = float(values[0]), float(values[1])
    if not (0.0 <= lo <= 0.5 <= hi <= 1.0):
        raise UserError(f"review_band must satisfy 0 <= low <= 0.5 <= high <= 1, got [{lo}, {hi}]")
    return lo, hi


def decide(
    prob: float,
    declared: str,
    band: tuple[float, float] | None = DEFAULT_BAND,
    *,
    sd: float = 0.0,
    review_sd: float | None = None,
) -> tuple[str, bool, str]:
    """P(perfusion) and the declared class -> ``(predicted, mismatch, status)``.

    Inside the band (inclusive) the model has no confident answer: ``("uncertain", False,
    "review")`` whatever the header says - flagging a mismatch there would cry wolf, passing it
    would claim a certainty the model does not have. Outside it, a known declared class that
    differs from the prediction is a ``mismatch``. An ``ambiguous`` header (keywords of both
    classes, e.g. "LUNG PERFUSION" with a DTPA radiopharmaceutical) contradicts itself, which is how
    a wrongly picked camera protocol often shows: ``review``, with the model's class. ``unknown``
    (nothing declared) is ``ok``: there is nothing to contradict.
    """
    if band is not None and band[0] <= prob <= band[1]:
        return UNCERTAIN, False, "review"
    if review_sd is not None and sd > review_sd:
        return UNCERTAIN, False, "review"
    predicted = PERFUSION if prob >= 0.5 else VENTILATION
    if declared == AMBIGUOUS:
        return predicted, False, "review"
    mismatch = declared in KNOWN_CLASSES and declared != predicted
    return predicted, mismatch, "mismatch" if mismatch else "ok"


def decide_batch(
    member_probs: np.ndarray,
    declared: Sequence[str],
    band: tuple[float, float] | None = DEFAULT_BAND,
    review_sd: float | None = None,
) -> list[dict[str, Any]]:
    """P(perfusion) per member and study, float (M, N), -> the row fields of each study.

    The ensemble's answer is the members' mean; their spread is the population SD (0 for a single
    member), with min and max. Probabilities are rounded to 6 digits for the table, but the
    decision is taken on the unrounded values.
    """
    probs = np.asarray(member_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(declared):
        raise ValueError(f"member_probs must be (members, {len(declared)}), got {probs.shape}")
    mean = probs.mean(axis=0)
    out = []
    for j, decl in enumerate(declared):
        p, col = float(mean[j]), probs[:, j]
        sd = float(col.std()) if len(probs) > 1 else 0.0
        predicted, mismatch, status = decide(p, decl, band, sd=sd, review_sd=review_sd)
        out.append(
            {
                "prob_perfusion": round(p, 6),
                "prob_sd": round(sd, 6),
                "prob_min": round(float(col.min()), 6),
                "prob_max": round(float(col.max()), 6),
                "predicted": predicted,
                "mismatch": mismatch,
                "status": status,
            }
        )
    return out


def status_kind(status: Any) -> str:
    """``error: <reason>`` -> ``error``, ``rejected: <reason>`` -> ``rejected``, ``review: lungs
    not found`` -> ``review``: the word before the colon."""
    return str(status).split(":", 1)[0].strip()


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts per status (errors pooled) and the files to look at."""
    counts = {s: 0 for s in STATUSES}
    for r in rows:
        key = status_kind(r["status"])
        counts[key] = counts.get(key, 0) + 1
    return {
        "n": len(rows),
        "counts": counts,
        "mismatches": [r["file"] for r in rows if r["status"] == "mismatch"],
        "review": [r["file"] for r in rows if status_kind(r["status"]) == "review"],
        "rejected": [r["file"] for r in rows if status_kind(r["status"]) == "rejected"],
        "errors": [r["file"] for r in rows if status_kind(r["status"]) == "error"],
    }
