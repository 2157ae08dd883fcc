"""Checks beyond Table 1: calibration, the neck subgroups, and the CAM randomisation test.

* **Calibration** (per model, test rows of ``predictions.csv`` pooled over seeds): expected
  calibration error (15 equal-width bins, torchmetrics) and Brier score, and the reliability
  diagram's points. A QA tool's "P(perfusion) = 0.9" means what it says only when these are small.
* **Subgroups** (the ``data.subgroup`` column each run stored in ``predictions.csv``: a manifest
  column, or the phantom's truth - a study shows neck activity when its trachea mask is not
  empty; runs without it: the phantom's ``mask_trachea`` in ``cams.npz``): per subgroup value the
  share of ventilation studies recognised (the specificity, perfusion being positive), the
  accuracy over all perfusion studies plus that subgroup's ventilation studies, and the accuracy
  within the subgroup over both classes, with Wilson 95 % CIs over distinct images (each image's
  prediction: the majority of the seeds). The paper's own limitation: a model that learned the
  neck shadow calls neck-free ventilation studies perfusion.
* **CAM randomisation** (Adebayo et al. 2018): per model, the Spearman similarity of each test
  CAM to the CAM of the same model with randomised weights (``cams.npz["cam_randomised_similarity"]``).
  CAMs that survive randomisation explain image edges, not what the model learned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from lung_cls.data import subgroups
from lung_cls.report.discover import RunRecord
from lung_cls.report.fmt import finite, fmt
from lung_cls.runs import read_cams

N_BINS = 15


# --------------------------------------------------------------------------- calibration
def calibration(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE (torchmetrics, L1, equal-width bins), Brier score and the reliability points."""
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    y = np.array(y, dtype=np.int64)  # copies: torch wants writable arrays
    p = np.clip(np.array(p, dtype=np.float64), 0.0, 1.0)
    if not len(y):
        return {"n": 0, "ece": math.nan, "brier": math.nan, "bins": []}
    ece = float(
        binary_calibration_error(torch.from_numpy(p).float(), torch.from_numpy(y), n_bins=n_bins)
    )
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    bins = [
        {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "n": int((idx == b).sum()),
            "mean_p": float(p[idx == b].mean()),
            "frac_pos": float(y[idx == b].mean()),
        }
        for b in range(n_bins)
        if (idx == b).any()
    ]
    return {"n": int(len(y)), "ece": ece, "brier": float(np.mean((p - y) ** 2)), "bins": bins}


def calibration_table(
    by_model: Mapping[str, Sequence[RunRecord]],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows, details = [], {}
    for model, runs in by_model.items():
        tests = [r.test for r in runs if r.test is not None]
        if not tests:
            continue
        df = pd.concat(tests, ignore_index=True)
        c = calibration(df["label"].to_numpy(), df["prob_perfusion"].to_numpy())
        per_seed = [
            calibration(t["label"].to_numpy(), t["prob_perfusion"].to_numpy()) for t in tests
        ]
        details[model] = {**c, "ece_per_seed": [s["ece"] for s in per_seed]}
        eces = np.array([s["ece"] for s in per_seed])
        row = {
            "model": model,
            "runs": len(tests),
            "test rows": c["n"],
            "ECE (pooled)": fmt(c["ece"], 3),
            "ECE per seed (mean ± SD)": fmt(eces.mean(), 3)
            + (f" ± {eces.std(ddof=1):.3f}" if len(eces) > 1 else ""),
            "Brier (pooled)": fmt(c["brier"], 3),
        }
        scaled = _temperature_scaled(runs)
        if scaled is not None:
            t = calibration(scaled[0], scaled[1])
            details[model]["temperature_scaled"] = {**t, "temperatures": scaled[2]}
            row["T (val-fitted)"] = ", ".join(f"{v:.2f}" for v in scaled[2])
            row["ECE after T"] = fmt(t["ece"], 3)
            row["Brier after T"] = fmt(t["brier"], 3)
        rows.append(row)
    return pd.DataFrame(rows), details


def _temperature_scaled(runs: Sequence[RunRecord]) -> tuple[np.ndarray, np.ndarray, list] | None:
    """Pooled test labels and P(perfusion) after each run's own validation-fitted temperature;
    None unless every run with test rows has one (``metrics.json["calibration"]``)."""
    from lung_cls.evaluation.calibration import scale_probs

    ys, ps, temps = [], [], []
    for r in runs:
        if r.test is None:
            continue
        t = ((r.metrics or {}).get("calibration") or {}).get("temperature")
        if not finite(t):
            return None
        ys.append(r.test["label"].to_numpy())
        ps.append(scale_probs(r.test["prob_perfusion"].to_numpy(), float(t)))
        temps.append(float(t))
    if not ys:
        return None
    return np.concatenate(ys), np.concatenate(ps), temps


# --------------------------------------------------------------------------- subgroups
def _wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _votes(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per distinct test image: label, subgroup, majority prediction over seeds (a tie: the mean
    probability at 0.5)."""
    df = pd.concat(parts, ignore_index=True)
    g = df.groupby("id")
    out = g.agg(label=("label", "first"), subgroup=("subgroup", "first"), votes=("pred", "mean"))
    out["prob"] = g["prob"].mean()
    out["pred"] = np.where(out["votes"] == 0.5, out["prob"] >= 0.5, out["votes"] > 0.5).astype(int)
    return out


def _stored(runs: Sequence[RunRecord]) -> tuple[str, str, pd.DataFrame] | None:
    """The subgroup each run stored (``predictions.csv`` ``subgroup``; its column in
    ``metrics.json`` ``data.subgroup.column``): (column, source, votes), or None.

    Runs of one model that stored another column than the first are left out."""
    parts, column, source = [], None, ""
    for r in runs:
        if r.status != "ok" or r.test is None or "subgroup" not in r.test.columns:
            continue
        t = r.test
        values = t["subgroup"].fillna("").astype(str)
        if (values == "").all():
            continue
        info = ((r.metrics or {}).get("data") or {}).get("subgroup") or {}
        col = str(info.get("column") or "subgroup")
        if column is not None and col != column:
            continue
        column = col
        phantom = "path" in t.columns and t["path"].astype(str).str.startswith("phantom://").all()
        source = "phantom truth" if phantom else f"data column '{col}'"
        keep = values != ""
        parts.append(
            pd.DataFrame(
                {
                    "id": t["id"].astype(str)[keep],
                    "label": t["label"].astype(int)[keep],
                    "pred": t["pred"].astype(int)[keep],
                    "prob": t["prob_perfusion"].astype(float)[keep],
                    "subgroup": values[keep],
                }
            )
        )
    if not parts:
        return None
    return str(column), source, _votes(parts)


def _from_trachea(runs: Sequence[RunRecord]) -> tuple[str, str, pd.DataFrame] | None:
    """Runs that stored no subgroup: the phantom's neck truth from ``cams.npz`` ``mask_trachea``."""
    parts = []
    for r in runs:
        if r.status != "ok" or r.cams_path is None:
            continue
        try:
            a = read_cams(r.cams_path)
        except (OSError, ValueError):
            continue
        if "mask_trachea" not in a or "preds" not in a:
            continue
        neck = np.asarray(a["mask_trachea"], bool).any(axis=(1, 2))
        parts.append(
            pd.DataFrame(
                {
                    "id": a["ids"].astype(str) if "ids" in a else np.arange(len(a["labels"])),
                    "label": a["labels"].astype(int),
                    "pred": a["preds"].astype(int),
                    "prob": a["probs"].astype(float) if "probs" in a else np.nan,
                    "subgroup": np.where(neck, subgroups.YES, subgroups.NO),
                }
            )
        )
    if not parts:
        return None
    return subgroups.PHANTOM_COLUMN, "phantom truth", _votes(parts)


def _majority(runs: Sequence[RunRecord]) -> tuple[str, str, pd.DataFrame] | None:
    """(column, where it comes from, per distinct test image: label, subgroup, majority
    prediction): the stored subgroup column, else the phantom's trachea masks, else None."""
    return _stored(runs) or _from_trachea(runs)


def _share(k: int, n: int) -> dict[str, Any]:
    lo, hi = _wilson(k, n)
    return {"k": int(k), "n": int(n), "value": k / n if n else math.nan, "lo": lo, "hi": hi}


def subgroup_table(
    by_model: Mapping[str, Sequence[RunRecord]],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per model and subgroup value: ventilation studies recognised (the specificity), the
    accuracy of those with all perfusion studies (the paper's limitation measured), and the
    accuracy within the subgroup over both classes (its perfusion and ventilation studies); Wilson
    95 % CIs over distinct test images (each image's prediction: the majority of the seeds).

    The subgroup is what the runs stored (``data.subgroup``: a manifest column, or the phantom's
    neck truth), else the phantom's trachea masks in ``cams.npz``. ``details[model][row label]``
    also says the column, the value and where it came from."""
    rows, details = [], {}
    for model, runs in by_model.items():
        found = _majority(runs)
        if found is None:
            continue
        column, source, df = found
        perf = df[df["label"] == 1]
        perf_ok = int((perf["pred"] == 1).sum())
        d: dict[str, Any] = {}
        for value in subgroups.display_order(df["subgroup"].astype(str)):
            name = subgroups.describe(column, value)
            in_group = df["subgroup"].astype(str) == value
            vent = df[(df["label"] == 0) & in_group]
            perf_in = df[(df["label"] == 1) & in_group]
            k = int((vent["pred"] == 0).sum())
            k_perf_in = int((perf_in["pred"] == 1).sum())
            d[name] = {
                "column": column,
                "value": value,
                "source": source,
                "specificity": _share(k, len(vent)),
                "accuracy": _share(k + perf_ok, len(vent) + len(perf)),
                "accuracy_within": _share(k + k_perf_in, len(vent) + len(perf_in)),
                "perfusion_in_subgroup": len(perf_in),
            }
            rows.append(
                {
                    "model": model,
                    "ventilation studies": name,
                    "n": len(vent),
                    "recognised (specificity)": _ci_text(d[name]["specificity"]),
                    "accuracy with all perfusion studies": _ci_text(d[name]["accuracy"]),
                    "perfusion studies": len(perf),
                    "perfusion studies in subgroup": len(perf_in),
                    "accuracy within subgroup (both classes)": _ci_text(d[name]["accuracy_within"]),
                    "column": column,
                    "source": source,
                }
            )
        details[model] = d
    return pd.DataFrame(rows), details


def _ci_text(s: Mapping[str, Any]) -> str:
    if not s["n"]:
        return "-"
    return f"{s['k']}/{s['n']} = {100 * s['value']:.1f}% [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}]"


# --------------------------------------------------------------------------- randomisation
#: Median Spearman similarity of trained and randomised-weight CAMs: below the first the maps
#: depend on the weights; from the second on they mostly follow the image.
RANDOMISATION_PASS, RANDOMISATION_FAIL = 0.3, 0.6


def randomisation_verdict(median: float) -> str:
    """Graded, not pass/fail at one cut: Adebayo et al. asked for similarity that drops
    substantially, and a median of 0.4 is a partial drop that a reader should see as such."""
    m = abs(float(median))
    if m < RANDOMISATION_PASS:
        return "CAMs change with the weights (pass)"
    if m < RANDOMISATION_FAIL:
        return "CAMs partly follow the image (caution)"
    return "CAMs survive randomisation: not explanations"


def randomisation_table(
    by_model: Mapping[str, Sequence[RunRecord]],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows, details = [], {}
    for model, runs in by_model.items():
        sims = []
        for r in runs:
            if r.status != "ok" or r.cams_path is None:
                continue
            try:
                s = read_cams(r.cams_path).get("cam_randomised_similarity")
            except (OSError, ValueError):
                continue
            if s is not None:
                sims.append(np.asarray(s, dtype=np.float64))
        if not sims:
            continue
        v = np.concatenate(sims)
        n_maps = int(v.size)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        med = float(np.median(v))
        # A flat map (Grad-CAM all zero after its ReLU, typical of a randomised network) has no
        # rank correlation: such pairs are counted and left out, never scored as 0.
        details[model] = {
            "n": int(v.size), "n_maps": n_maps, "n_flat": n_maps - int(v.size),
            "median": med, "mean": float(v.mean()),
        }  # fmt: skip
        details[model]["verdict"] = verdict = randomisation_verdict(med)
        rows.append(
            {
                "model": model,
                "CAMs": int(v.size),
                "left out (a flat map)": n_maps - int(v.size),
                "Spearman trained vs randomised: median": fmt(med, 2),
                "IQR": f"{np.percentile(v, 25):.2f} - {np.percentile(v, 75):.2f}",
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows), details


def reliability_points(details: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {m: d["bins"] for m, d in details.items() if d.get("bins")}


__all__ = [
    "calibration",
    "calibration_table",
    "finite",
    "randomisation_table",
    "randomisation_verdict",
    "reliability_points",
    "subgroup_table",
]
