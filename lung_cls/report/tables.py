"""The report's tables as pure functions: runs (or pooled CAMs) in, data frames and dicts out.

Nothing here reads or writes a file, so each table can be checked on a few hand-made rows
(``tests/report/test_report_tables.py``). Every number is recomputed from the runs' per-image test
predictions with the functions of :mod:`lung_cls.evaluation`; a run whose ``predictions.csv``
was unusable contributes its ``metrics.json`` numbers to the per-seed summary only, never to
anything that pools images.

Two kinds of frame per table: the full one (``table1.csv``, ``model_comparison.csv``,
``cam_groundtruth.csv``: every number, plain floats, nan where undefined) and a display one for
markdown and HTML (formatted strings, ``-`` where undefined).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lung_cls.report.fmt import finite, fmt, fmt_p
from lung_cls.report.paper import (
    METRIC_LABEL,
    PAPER_TABLE1,
    PCT_METRICS,
    TABLE_METRICS,
    column,
    digits,
    scale,
)

if TYPE_CHECKING:
    from lung_cls.report.cams import ModelCams
    from lung_cls.report.discover import RunRecord

#: Truth masks that carry each class's evidence (label -> names); absent names are skipped.
GT_FEATURE_MAP: dict[int, list[str]] = {
    0: ["trachea", "hotspots", "oropharynx", "esophagus", "stomach"],
    1: ["heart", "lungs"],
}

RunsByModel = Mapping[str, Sequence["RunRecord"]]


# --------------------------------------------------------------------------- Table 1
def seed_summary(runs: Sequence[RunRecord]) -> dict[str, tuple[float, float]]:
    """Mean and sample SD over the runs (seeds) of each Table 1 metric, PPV and NPV.

    A metric a run does not have, or has as a non-number, counts as nan for that run (and so
    makes the mean nan): an undefined value is not averaged away.
    """
    from lung_cls.evaluation.metrics import summarise_seeds

    per_run = [
        {k: r.test_metrics.get(k, math.nan) for k in (*TABLE_METRICS, "ppv", "npv")} for r in runs
    ]
    per_run = [{k: (float(v) if finite(v) else math.nan) for k, v in d.items()} for d in per_run]
    return summarise_seeds(per_run)


def inference_unit(df: pd.DataFrame) -> tuple[str, np.ndarray]:
    """The independent unit of pooled test rows and each row's cluster: ``("patient", ids)`` when
    some patient holds more than one distinct test image, else ``("image", ids)``.

    Seeds of one split test the same images, so an image's rows are never independent of each
    other; a patient's V and Q images are not independent either.
    """
    ids = df["id"].astype(str).to_numpy()
    if "patient_id" in df.columns and df["patient_id"].notna().all():
        per_patient = df.groupby(df["patient_id"].astype(str))["id"].nunique()
        if (per_patient > 1).any():
            return "patient", df["patient_id"].astype(str).to_numpy()
    return "image", ids


def pooled_metrics(runs: Sequence[RunRecord], n_boot: int, seed: int) -> dict[str, Any]:
    """The test predictions of all seeds concatenated and scored once, with 95% CIs (``ci95``)
    from a bootstrap that resamples images - or patients, when a patient holds several test
    images - with all their seed rows, stratified by class (:func:`cluster_bootstrap_ci`);
    {} when no run has per-image predictions.

    ``ci_unit`` names the unit, ``n_units`` how many there are, ``n_unique_images`` how many
    distinct images; ``n`` counts rows (images x seeds). Under cross-validation
    (``data.split.fold`` swept) the folds' test rows are pooled the same way, so every image
    counts once per seed, and ``n_folds`` says how many folds there were.
    """
    from lung_cls.evaluation.metrics import binary_metrics
    from lung_cls.evaluation.stats import cluster_bootstrap_ci

    pooled_runs = [r for r in runs if r.test is not None]
    if not pooled_runs:
        return {}
    df = pd.concat([r.test for r in pooled_runs], ignore_index=True)
    y = df["label"].to_numpy()
    p = df["prob_perfusion"].to_numpy()
    pred = df["pred"].to_numpy()
    pooled = binary_metrics(y, p, pred=pred)
    unit, clusters = inference_unit(df)
    if len(np.unique(y)) == 2 and n_boot > 0:
        ci = cluster_bootstrap_ci(y, p, clusters, pred=pred, n_boot=n_boot, seed=seed)
        pooled["ci95"] = {k: v for k, v in ci.items() if k != "n_clusters"}
    pooled["ci_unit"] = unit
    pooled["n_units"] = int(len(np.unique(clusters)))
    pooled["n_runs"] = len(pooled_runs)
    pooled["n_unique_images"] = int(df["id"].nunique())
    folds = {r.overrides.get("data.split.fold") for r in pooled_runs} - {None}
    if folds:  # cross-validation: the folds' test sets together hold every image once
        pooled["n_folds"] = len(folds)
    return pooled


def _table1_row(
    model: str,
    runs: Sequence[RunRecord],
    summary: Mapping[str, tuple[float, float]],
    pooled: Mapping[str, Any],
) -> dict[str, Any]:
    """One row of ``table1.csv``: mean/SD over seeds next to the paper, then the pooled numbers."""
    paper = PAPER_TABLE1.get(model, {})
    row: dict[str, Any] = {
        "model": model,
        "paper_model": paper.get("label", ""),
        "n_runs": len(runs),
        "seeds": " ".join(str(r.seed) for r in runs),
    }
    for key in TABLE_METRICS:
        col = column(key)
        mean, sd = summary.get(key, (math.nan, math.nan))
        row[f"{col}_mean"] = mean * scale(key)
        row[f"{col}_sd"] = sd * scale(key)
        row[f"paper_{col}"] = paper.get(key, math.nan)
    row["pooled_n"] = pooled.get("n", 0)
    row["pooled_unique_images"] = pooled.get("n_unique_images", 0)
    for key in TABLE_METRICS:
        col = column(key)
        lo, hi = (pooled.get("ci95") or {}).get(key, [math.nan, math.nan])
        row[f"pooled_{col}"] = pooled.get(key, math.nan) * scale(key) if pooled else math.nan
        row[f"pooled_{col}_lo"] = lo * scale(key) if finite(lo) else math.nan
        row[f"pooled_{col}_hi"] = hi * scale(key) if finite(hi) else math.nan
    return row


def _table1_details(
    model: str,
    runs: Sequence[RunRecord],
    summary: Mapping[str, tuple[float, float]],
    pooled: Mapping[str, Any],
) -> dict[str, Any]:
    """``report.json["table1"][model]``: per run, mean/SD, pooled, summed confusion matrix."""
    from lung_cls.evaluation.metrics import pool_confusion

    cms = [r.test_metrics for r in runs if isinstance(r.test_metrics.get("confusion_matrix"), list)]
    return {
        "runs": [
            {
                "run": r.name,
                "seed": r.seed,
                "source": r.metrics_source,
                **{
                    k: r.test_metrics.get(k)
                    for k in (*TABLE_METRICS, "ppv", "npv", "n", "confusion_matrix")
                },
            }
            for r in runs
        ],
        "mean_sd": {k: list(v) for k, v in summary.items()},
        "pooled": {k: v for k, v in pooled.items() if k != "notes"},
        "confusion_matrix_sum": pool_confusion(cms) if cms else None,
        "paper": PAPER_TABLE1.get(model, {}),
    }


def table1(
    runs_by_model: RunsByModel, n_boot: int, seed: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Paper Table 1 per model: mean ± SD over seeds, the paper's values, pooled metrics with
    bootstrap CIs (``table1.csv``), and the details behind it (``report.json["table1"]``)."""
    rows, details = [], {}
    for model, runs in runs_by_model.items():
        summary = seed_summary(runs)
        pooled = pooled_metrics(runs, n_boot, seed)
        rows.append(_table1_row(model, runs, summary, pooled))
        details[model] = _table1_details(model, runs, summary, pooled)
    return pd.DataFrame(rows), details


def table1_display(t1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as shown: ``mean ± SD`` per metric next to the paper's value (``-`` if none)."""
    rows = []
    for row in t1.to_dict("records"):
        shown: dict[str, Any] = {"Model": row["model"], "Runs": row["n_runs"]}
        for key in TABLE_METRICS:
            col = column(key)
            shown[METRIC_LABEL[key]] = (
                f"{fmt(row[f'{col}_mean'], digits(key))} ± {fmt(row[f'{col}_sd'], digits(key))}"
            )
            shown[f"paper {key}"] = fmt(row[f"paper_{col}"], 1 if key in PCT_METRICS else 2)
        rows.append(shown)
    return pd.DataFrame(rows)


def table1_pooled_display(t1: pd.DataFrame, details: Mapping[str, Any]) -> pd.DataFrame:
    """The pooled-over-seeds numbers as shown: ``value [lo, hi]`` per metric."""
    rows = []
    for row in t1.to_dict("records"):
        model = row["model"]
        shown: dict[str, Any] = {
            "Model": model,
            "Runs pooled": details[model]["pooled"].get("n_runs", 0),
            "Rows (distinct images)": f"{row['pooled_n']} ({row['pooled_unique_images']})",
        }
        for key in TABLE_METRICS:
            col, d = f"pooled_{column(key)}", digits(key)
            shown[f"{METRIC_LABEL[key]} [95% CI]"] = (
                f"{fmt(row[col], d)} [{fmt(row[f'{col}_lo'], d)}, {fmt(row[f'{col}_hi'], d)}]"
            )
        rows.append(shown)
    return pd.DataFrame(rows)


def confusion_table(details: Mapping[str, Any]) -> pd.DataFrame:
    """Confusion matrices summed over seeds (the paper's "over 5 repetitions"), one row per model."""
    return pd.DataFrame(
        [
            {
                "model": m,
                "TN": d["confusion_matrix_sum"][0][0],
                "FP": d["confusion_matrix_sum"][0][1],
                "FN": d["confusion_matrix_sum"][1][0],
                "TP": d["confusion_matrix_sum"][1][1],
            }
            for m, d in details.items()
            if d["confusion_matrix_sum"]
        ]
    )


# --------------------------------------------------------------------------- ROC
Curve = tuple[list[float], list[float], float]


def _seed_curve(run: RunRecord) -> Curve | None:
    """One run's test ROC: from its predictions, else the curve stored in metrics.json."""
    from lung_cls.evaluation.metrics import auc_score, roc_points

    if run.test is not None and run.test["label"].nunique() == 2:
        y, p = run.test["label"].to_numpy(), run.test["prob_perfusion"].to_numpy()
        roc, auc = roc_points(y, p), auc_score(y, p)
    else:
        roc = (run.metrics or {}).get("test", {}).get("roc")
        auc = run.test_metrics.get("auc", math.nan)
        if not isinstance(roc, Mapping) or "fpr" not in roc:
            return None
    return list(roc["fpr"]), list(roc["tpr"]), float(auc) if finite(auc) else math.nan


def roc_curves(
    runs_by_model: RunsByModel,
) -> tuple[dict[str, list[Curve]], dict[str, Curve], dict[str, Any]]:
    """Per model the ROC of each seed, the ROC of the pooled predictions, and their AUCs
    (``report.json["roc"]``). Models without a drawable curve are absent from the first two."""
    from lung_cls.evaluation.metrics import auc_score, roc_points

    curves: dict[str, list[Curve]] = {}
    pooled: dict[str, Curve] = {}
    info: dict[str, Any] = {}
    for model, runs in runs_by_model.items():
        per_seed = [c for c in (_seed_curve(r) for r in runs) if c is not None]
        if per_seed:
            curves[model] = per_seed
        frames = [r.test for r in runs if r.test is not None]
        if frames:
            df = pd.concat(frames, ignore_index=True)
            if df["label"].nunique() == 2:
                y, p = df["label"].to_numpy(), df["prob_perfusion"].to_numpy()
                roc = roc_points(y, p)
                pooled[model] = (roc["fpr"], roc["tpr"], auc_score(y, p))
        info[model] = {
            "auc_per_seed": [c[2] for c in per_seed],
            "auc_pooled": pooled[model][2] if model in pooled else None,
        }
    return curves, pooled, info


# --------------------------------------------------------------------------- model comparison
def per_image(runs: Sequence[RunRecord]) -> pd.DataFrame | None:
    """Mean-over-seeds probability and majority-vote prediction per test image id.

    The image is the unit: seeds of one split test the same images, so they are pooled per
    image before any paired test. An exact tie of the vote goes to the mean probability.
    """
    frames = [r.test[["id", "label", "prob_perfusion", "pred"]] for r in runs if r.test is not None]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    g = df.groupby("id", sort=True)
    out = pd.DataFrame(
        {
            "label": g["label"].first(),
            "label_consistent": g["label"].nunique() == 1,
            "prob": g["prob_perfusion"].mean(),
            "vote": g["pred"].mean(),
            "n_runs": g.size(),
        }
    )
    out["pred"] = np.where(
        out["vote"] > 0.5, 1, np.where(out["vote"] < 0.5, 0, (out["prob"] >= 0.5).astype(int))
    )
    return out


def compare_pair(da: pd.DataFrame, db: pd.DataFrame) -> dict[str, Any]:
    """DeLong (AUC) and McNemar (errors) of two models on their common test image ids.

    ``da``/``db`` come from :func:`per_image`. A ``note`` says what was left out or why the
    pair was not compared (no common ids, labels that disagree).
    """
    from lung_cls.evaluation.stats import delong_test, mcnemar_test

    row: dict[str, Any] = {}
    common = da.index.intersection(db.index)
    note = []
    if len(common) != len(da) or len(common) != len(db):
        note.append(
            f"test sets differ: compared on the {len(common)} common ids (of {len(da)} / {len(db)})"
        )
    if len(common) == 0:
        return {"note": "test sets differ: no common test image ids; not compared"}
    ja, jb = da.loc[common], db.loc[common]
    if not (ja["label"].to_numpy() == jb["label"].to_numpy()).all() or not (
        ja["label_consistent"].all() and jb["label_consistent"].all()
    ):
        return {"note": "labels of the same ids disagree between runs; not compared"}
    y = ja["label"].to_numpy().astype(int)
    row["n_images"] = int(len(common))
    try:
        d = delong_test(y, ja["prob"].to_numpy(), jb["prob"].to_numpy())
        row.update(
            auc_a=d["auc_a"],
            auc_b=d["auc_b"],
            auc_diff=d["diff"],
            auc_diff_lo=d["ci95"][0],
            auc_diff_hi=d["ci95"][1],
            delong_z=d["z"],
            delong_p=d["p"],
        )
    except ValueError as err:
        note.append(f"DeLong not computed: {err}")
    m = mcnemar_test(y, ja["pred"].to_numpy().astype(int), jb["pred"].to_numpy().astype(int))
    row.update(
        acc_a=float((ja["pred"].to_numpy() == y).mean()),
        acc_b=float((jb["pred"].to_numpy() == y).mean()),
        mcnemar_b=m["b"],
        mcnemar_c=m["c"],
        mcnemar_stat=m["statistic"],
        mcnemar_p=m["p"],
        mcnemar_method=m["method"],
    )
    row["note"] = "; ".join(note)
    return row


def _holm_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``delong_p_holm`` and ``mcnemar_p_holm``: Holm-adjusted over the pairs that have a p."""
    from lung_cls.evaluation.stats import holm

    for col in ("delong_p", "mcnemar_p"):
        if col not in df.columns:
            df[col] = np.nan
        ok = df[col].apply(finite)
        adj = pd.Series(np.nan, index=df.index)
        if ok.any():
            adj[ok] = holm(df.loc[ok, col].astype(float).to_numpy())
        df[f"{col}_holm"] = adj
    return df


def model_comparison(runs_by_model: RunsByModel) -> tuple[pd.DataFrame, list[str]]:
    """Every pair of models, in the given order: ``model_comparison.csv`` and notes."""
    notes: list[str] = []
    images = {m: per_image(rs) for m, rs in runs_by_model.items()}
    rows: list[dict[str, Any]] = []
    for a, b in itertools.combinations(list(runs_by_model), 2):
        row: dict[str, Any] = {"model_a": a, "model_b": b}
        if images[a] is None or images[b] is None:
            row["note"] = "no per-image predictions for one model"
        else:
            row.update(compare_pair(images[a], images[b]))
        rows.append(row)
    df = _holm_columns(pd.DataFrame(rows))
    if len(runs_by_model) < 2:
        notes.append("only one model: no pairwise comparison")
    return df, notes


def comparison_display(cmp: pd.DataFrame) -> pd.DataFrame:
    """The model comparison as shown: AUCs, their difference with CI, p (Holm), accuracies."""

    def pct(x: Any) -> Any:
        return 100 * x if finite(x) else None

    return pd.DataFrame(
        [
            {
                "models": f"{r['model_a']} vs {r['model_b']}",
                "n": r.get("n_images", "-"),
                "AUC a / b": f"{fmt(r.get('auc_a'), 3)} / {fmt(r.get('auc_b'), 3)}",
                "AUC diff [95% CI]": f"{fmt(r.get('auc_diff'), 3)} "
                f"[{fmt(r.get('auc_diff_lo'), 3)}, {fmt(r.get('auc_diff_hi'), 3)}]",
                "DeLong p (Holm)": f"{fmt_p(r.get('delong_p'))} ({fmt_p(r.get('delong_p_holm'))})",
                "acc a / b": f"{fmt(pct(r.get('acc_a')))} / {fmt(pct(r.get('acc_b')))}",
                "McNemar b/c": f"{r.get('mcnemar_b', '-')}/{r.get('mcnemar_c', '-')}"
                if finite(r.get("mcnemar_p"))
                else "-",
                "McNemar p (Holm)": f"{fmt_p(r.get('mcnemar_p'))} "
                f"({fmt_p(r.get('mcnemar_p_holm'))})",
                "note": r.get("note") if isinstance(r.get("note"), str) else "",
            }
            for r in cmp.to_dict("records")
        ]
    )


# --------------------------------------------------------------------------- CAMs
def cam_statistics_table(stat_info: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per model: test images (the unit) per class, CAM maps pooled into them, and the share of
    significant pixels under each correction."""
    return pd.DataFrame(
        [
            {
                "model": m,
                "perfusion images": i["n_perfusion"],
                "ventilation images": i["n_ventilation"],
                "maps (images x seeds)": i.get("n_maps", "-"),
                "pixels tested": i.get("n_tests", "-"),
                "CAM scale": i.get("cam_scale", "-"),
                **{
                    f"significant {k}": f"{100 * v:.1f}%"
                    for k, v in (i.get("significant_fraction") or {}).items()
                    if k != "n_pixels"
                },
                "note": i.get("note", ""),
            }
            for m, i in stat_info.items()
        ]
    )


def groundtruth_table(
    model_cams: Mapping[str, ModelCams],
    grids: Mapping[str, tuple[int, int] | None] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """CAMs against the phantom's truth masks (:data:`GT_FEATURE_MAP`): energy share inside the
    class's masks vs chance (their area), pointing-game hit rate vs its chance level.

    The pointing game grants the same tolerance as the neck table: half a CAM cell (``grids``:
    model -> the CAM's native map size), because a map of stride s cannot place its peak finer
    than its cell; its chance level is the grown masks' area share. Energy uses the masks as
    drawn. Models without truth masks are left out; an empty frame means no model had any.
    """
    from lung_cls.evaluation.groundtruth import cell_tolerance_px, score_cams

    rows, details = [], {}
    for model, mc in model_cams.items():
        if not mc.masks:
            continue
        grid = (grids or {}).get(model)
        tol = cell_tolerance_px(int(mc.cams.shape[-1]), min(grid) if grid else None)
        scores = score_cams(mc.cams, mc.labels, mc.masks, GT_FEATURE_MAP, tolerance_px=tol)
        details[model] = {**scores, "pointing_tolerance_px": tol}
        for cls, s in scores.items():
            share, chance = s.get("energy_share"), s.get("chance_share")
            rows.append(
                {
                    "model": model,
                    "class": cls,
                    "targets": "+".join(s.get("targets", [])),
                    "n_images": s.get("n_images"),
                    "n_with_target": s.get("n_with_target"),
                    "energy_share": share,
                    "chance_share": chance,
                    "energy_ratio": share / chance
                    if finite(share) and finite(chance) and chance > 0
                    else math.nan,
                    "pointing_tolerance_px": tol,
                    "pointing_hit_rate": s.get("pointing_hit_rate"),
                    "pointing_chance": s.get("pointing_chance"),
                }
            )
    return pd.DataFrame(rows), details


def groundtruth_display(gt: pd.DataFrame) -> pd.DataFrame:
    """The CAM-vs-truth table as shown: shares in percent, the energy ratio with two decimals."""
    shown = gt.copy()
    for col in ("energy_share", "chance_share", "pointing_hit_rate", "pointing_chance"):
        shown[col] = shown[col].map(lambda v: fmt(100 * v) + "%" if finite(v) else "-")
    shown["energy_ratio"] = shown["energy_ratio"].map(lambda v: fmt(v, 2))
    if "pointing_tolerance_px" in shown:
        shown["pointing_tolerance_px"] = shown["pointing_tolerance_px"].map(lambda v: fmt(v, 1))
    return shown
