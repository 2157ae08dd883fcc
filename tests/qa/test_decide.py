"""The QA decision on plain numbers: band edges, ensemble spread, rounding, summary counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lung_cls.errors import UserError
from lung_cls.qa.decide import (
    STATUSES,
    UNCERTAIN,
    check_review_band,
    decide,
    decide_batch,
    summarise,
)
from lung_cls.qa.declared import AMBIGUOUS, PERFUSION, UNKNOWN, VENTILATION

BAND = (0.2, 0.8)
below = math.nextafter  # the float next to x, towards y


@pytest.mark.parametrize(
    ("prob", "declared", "expected"),
    [
        # The band is inclusive at both edges ...
        (0.2, PERFUSION, (UNCERTAIN, False, "review")),
        (0.8, VENTILATION, (UNCERTAIN, False, "review")),
        (0.5, PERFUSION, (UNCERTAIN, False, "review")),
        # ... and the next float outside it is a confident answer.
        (below(0.2, 0.0), PERFUSION, (VENTILATION, True, "mismatch")),
        (below(0.2, 0.0), VENTILATION, (VENTILATION, False, "ok")),
        (below(0.8, 1.0), VENTILATION, (PERFUSION, True, "mismatch")),
        (below(0.8, 1.0), PERFUSION, (PERFUSION, False, "ok")),
        # Nothing declared: nothing to contradict. A self-contradicting header: review.
        (0.0, UNKNOWN, (VENTILATION, False, "ok")),
        (1.0, UNKNOWN, (PERFUSION, False, "ok")),
        (1.0, AMBIGUOUS, (PERFUSION, False, "review")),
        (0.0, AMBIGUOUS, (VENTILATION, False, "review")),
    ],
)
def test_decide_at_the_band_edges(prob, declared, expected):
    assert decide(prob, declared, BAND) == expected


def test_without_a_band_the_class_flips_at_one_half():
    assert decide(0.5, VENTILATION, None) == (PERFUSION, True, "mismatch")
    assert decide(below(0.5, 0.0), PERFUSION, None) == (VENTILATION, True, "mismatch")
    assert decide(0.5, PERFUSION, None) == (PERFUSION, False, "ok")


def test_review_sd_is_strict_and_beats_a_confident_mean():
    assert decide(0.95, VENTILATION, BAND, sd=0.21, review_sd=0.2) == (UNCERTAIN, False, "review")
    assert decide(0.95, VENTILATION, BAND, sd=0.2, review_sd=0.2) == (PERFUSION, True, "mismatch")
    assert decide(0.95, VENTILATION, BAND, sd=0.9, review_sd=None)[2] == "mismatch"


def test_ensemble_spread_sends_disagreeing_members_to_review():
    # Two members per study: both sure (study 0), one sure and one lukewarm (study 1).
    probs = np.array([[0.99, 0.99], [0.97, 0.81]])
    rows = decide_batch(probs, [VENTILATION, VENTILATION], BAND, review_sd=0.05)
    assert rows[0]["status"] == "mismatch" and rows[0]["prob_sd"] == pytest.approx(0.01)
    assert rows[1]["prob_perfusion"] == pytest.approx(0.9)
    assert rows[1]["prob_sd"] == pytest.approx(0.09)  # population SD: |a - b| / 2
    assert (rows[1]["prob_min"], rows[1]["prob_max"]) == (0.81, 0.99)
    assert rows[1]["status"] == "review" and rows[1]["predicted"] == UNCERTAIN
    # Without review_sd the same mean is a confident mismatch.
    assert decide_batch(probs, [VENTILATION] * 2, BAND)[1]["status"] == "mismatch"


def test_single_member_has_no_spread_and_rounding_never_moves_a_decision():
    # 0.8000004 shows as 0.8 in the table, but the decision is taken on the value itself.
    (row,) = decide_batch(np.array([[0.8000004]]), [VENTILATION], BAND, review_sd=0.0)
    assert row["prob_perfusion"] == 0.8 and row["prob_sd"] == 0.0
    assert row["status"] == "mismatch" and row["mismatch"] is True
    with pytest.raises(ValueError, match="members"):
        decide_batch(np.array([0.1, 0.2]), [VENTILATION, PERFUSION])
    with pytest.raises(ValueError, match="members"):
        decide_batch(np.array([[0.1, 0.2]]), [VENTILATION])


def test_review_band_validation():
    assert check_review_band([0.1, 0.9]) == (0.1, 0.9)
    assert check_review_band([0.5, 0.5]) == (0.5, 0.5)
    assert check_review_band([0, 1]) == (0.0, 1.0)
    assert check_review_band(None) is None
    for bad in ([0.6, 0.9], [0.1, 0.4], [0.1], [0.2, 1.2], [-0.1, 0.8]):
        with pytest.raises(UserError, match="review_band"):
            check_review_band(bad)


def test_summary_counts_add_up_and_list_the_files():
    statuses = ["ok", "ok", "review", "mismatch", "error: bad file", "error: other", "mismatch",
                "rejected: Modality MR, not NM", "review: lungs not found"]  # fmt: skip
    rows = [{"file": f"f{i}", "status": s} for i, s in enumerate(statuses)]
    summary = summarise(rows)
    assert summary["n"] == len(rows) == sum(summary["counts"].values())
    assert summary["counts"] == {"ok": 2, "review": 2, "mismatch": 2, "rejected": 1, "error": 2}
    assert summary["mismatches"] == ["f3", "f6"]
    assert summary["review"] == ["f2", "f8"]
    assert summary["rejected"] == ["f7"]
    assert summary["errors"] == ["f4", "f5"]
    assert tuple(summarise([])["counts"]) == STATUSES  # every status shown, even at zero
