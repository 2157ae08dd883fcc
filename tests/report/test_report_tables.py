"""The report's pure table functions on a few hand-made rows, with the expected cells worked out
by hand (as MONAI's tests/metrics/test_compute_roc_auc.py does): no files, no figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lung_cls.evaluation.metrics import binary_metrics
from lung_cls.report.cams import ModelCams
from lung_cls.report.discover import RunRecord
from lung_cls.report.tables import (
    cam_statistics_table,
    compare_pair,
    comparison_display,
    confusion_table,
    groundtruth_display,
    groundtruth_table,
    inference_unit,
    model_comparison,
    per_image,
    pooled_metrics,
    roc_curves,
    table1,
    table1_display,
    table1_pooled_display,
)

LABELS = (1, 1, 0, 0)  # ids a, b perfusion; c, d ventilation
IDS = ("a", "b", "c", "d")


def _run(
    model: str, seed: int, probs, labels=LABELS, ids=IDS, preds=None, with_rows: bool = True
) -> RunRecord:
    """A finished run as discover_runs gives it: its test rows and the metrics from them."""
    probs = np.asarray(probs, dtype=float)
    preds = (probs >= 0.5).astype(int) if preds is None else np.asarray(preds)
    test = pd.DataFrame({"id": ids, "label": labels, "prob_perfusion": probs, "pred": preds})
    return RunRecord(
        name=f"model={model},seed={seed}",
        path=Path("."),
        model=model,
        seed=seed,
        status="ok",
        test=test if with_rows else None,
        test_metrics=binary_metrics(np.asarray(labels), probs, pred=preds),
        metrics_source="predictions.csv" if with_rows else "metrics.json",
    )


# Three seeds of resnet18 on the same 4 test images (a, b perfusion; c, d ventilation):
#   seed 0: 0.9 0.6 | 0.4 0.1 -> all right: acc = sens = spec = F1 = 1; AUC 1
#   seed 1: 0.9 0.4 | 0.6 0.1 -> b and c wrong: acc = sens = spec = F1 = 0.5;
#           AUC: pairs (.9>.6, .9>.1, .4<.6, .4>.1) = 3/4
#   seed 2: 0.8 0.7 | 0.2 0.3 -> all right; AUC 1
# Mean acc (1 + .5 + 1) / 3 = 5/6; sample SD sqrt(((1/6)^2 * 2 + (1/3)^2) / 2) = sqrt(1/12).
# Mean AUC 2.75 / 3 = 11/12; SD sqrt(((1/12)^2 * 2 + (1/6)^2) / 2) = sqrt(1/48).
# Pooled (12 rows, 4 distinct images): TP 5, FN 1, TN 5, FP 1 -> acc 10/12, sens = spec = 5/6,
# F1 = 10 / (10 + 1 + 1); AUC over 6 x 6 pairs: perfusion scores .9 .6 .9 .4 .8 .7 beat the
# ventilation scores .4 .1 .6 .1 .2 .3 in 6 + 5.5 + 6 + 4.5 + 6 + 6 = 34 of 36 pairs (ties 1/2).
SEEDS = {0: (0.9, 0.6, 0.4, 0.1), 1: (0.9, 0.4, 0.6, 0.1), 2: (0.8, 0.7, 0.2, 0.3)}


@pytest.fixture
def by_model() -> dict[str, list[RunRecord]]:
    resnet = [_run("resnet18", s, p) for s, p in SEEDS.items()]
    # A model the paper does not have: one run with rows, one known from metrics.json only.
    other = [_run("mystery", 0, SEEDS[0]), _run("mystery", 1, SEEDS[1], with_rows=False)]
    return {"resnet18": resnet, "mystery": other}


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("acc_pct_mean", 100 * 5 / 6),
        ("acc_pct_sd", 100 * math.sqrt(1 / 12)),
        ("sensitivity_pct_mean", 100 * 5 / 6),
        ("specificity_pct_sd", 100 * math.sqrt(1 / 12)),
        ("f1_pct_mean", 100 * 5 / 6),
        ("auc_mean", 11 / 12),
        ("auc_sd", math.sqrt(1 / 48)),
        ("paper_acc_pct", 92.0),
        ("paper_auc", 0.98),
        ("n_runs", 3),
        ("pooled_n", 12),
        ("pooled_unique_images", 4),
        ("pooled_acc_pct", 100 * 10 / 12),
        ("pooled_sensitivity_pct", 100 * 5 / 6),
        ("pooled_f1_pct", 100 * 10 / 12),
        ("pooled_auc", 34 / 36),
    ],
)
def test_table1_cells_by_hand(by_model, column: str, expected: float) -> None:
    t1, _ = table1(by_model, n_boot=0, seed=0)
    row = t1.set_index("model").loc["resnet18"]
    assert row[column] == pytest.approx(expected)


def test_table1_metrics_json_runs_count_for_the_mean_but_are_never_pooled(by_model) -> None:
    t1, details = table1(by_model, n_boot=0, seed=0)
    assert list(t1["model"]) == ["resnet18", "mystery"]  # the order given
    row = t1.set_index("model").loc["mystery"]
    assert row["n_runs"] == 2 and row["seeds"] == "0 1"
    assert row["acc_pct_mean"] == pytest.approx(75.0)  # (100 + 50) / 2: both runs
    assert row["pooled_n"] == 4  # only the run with per-image rows
    assert row["pooled_acc_pct"] == pytest.approx(100.0)
    assert row["paper_model"] == "" and math.isnan(row["paper_acc_pct"])
    assert details["mystery"]["pooled"]["n_runs"] == 1
    assert [r["source"] for r in details["mystery"]["runs"]] == ["predictions.csv", "metrics.json"]
    # Summed confusion matrix [[tn, fp], [fn, tp]] over the three resnet18 seeds.
    assert details["resnet18"]["confusion_matrix_sum"] == [[5, 1], [1, 5]]
    assert "notes" not in details["resnet18"]["pooled"]


def test_table1_bootstrap_brackets_the_pooled_value(by_model) -> None:
    t1, details = table1(by_model, n_boot=200, seed=0)
    row = t1.set_index("model").loc["resnet18"]
    for key in ("acc_pct", "sensitivity_pct", "auc"):
        assert row[f"pooled_{key}_lo"] <= row[f"pooled_{key}"] <= row[f"pooled_{key}_hi"], key
    assert set(details["resnet18"]["pooled"]["ci95"]) >= {"acc", "auc"}
    no_ci, _ = table1(by_model, n_boot=0, seed=0)
    assert math.isnan(no_ci.loc[0, "pooled_acc_pct_lo"])  # n_boot = 0: no interval


def test_pooled_ci_resamples_images_not_rows() -> None:
    """Five identical seeds give the CI of one seed (the unit is the image, not the row)."""
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(30)]
    labels = [1] * 15 + [0] * 15
    probs = np.clip(np.array(labels) * 0.4 + 0.3 + 0.25 * rng.normal(size=30), 0, 1)
    one = pooled_metrics([_run("m", 0, probs, labels, ids)], n_boot=400, seed=1)
    five = pooled_metrics([_run("m", s, probs, labels, ids) for s in range(5)], 400, 1)
    assert five["n"] == 150 and five["n_units"] == one["n_units"] == 30
    assert five["ci_unit"] == "image"
    assert five["acc"] == one["acc"]  # the point estimate does not change
    for key in ("acc", "auc", "sensitivity"):
        assert five["ci95"][key] == pytest.approx(one["ci95"][key]), key
    # ... and the interval is the 95 % one of the image bootstrap (not another level).
    from lung_cls.evaluation.stats import cluster_bootstrap_ci

    ref = cluster_bootstrap_ci(labels, probs, ids, pred=(probs >= 0.5), n_boot=400, seed=1)
    assert one["ci95"]["acc"] == ref["acc"]


def test_pooled_ci_resamples_patients_that_hold_several_images() -> None:
    run = _run("m", 0, (0.9, 0.6, 0.4, 0.1))
    run.test["patient_id"] = ["p1", "p2", "p1", "p2"]  # two V/Q pairs
    assert inference_unit(run.test)[0] == "patient"
    pooled = pooled_metrics([run], n_boot=50, seed=0)
    assert pooled["ci_unit"] == "patient" and pooled["n_units"] == 2
    run.test["patient_id"] = ["p1", "p2", "p3", "p4"]
    assert inference_unit(run.test)[0] == "image"


def test_table1_display_cells(by_model) -> None:
    t1, details = table1(by_model, n_boot=0, seed=0)
    shown = table1_display(t1).set_index("Model")
    assert shown.loc["resnet18", "Accuracy (%)"] == "83.3 ± 28.9"
    assert shown.loc["resnet18", "AUC"] == "0.917 ± 0.144"
    assert shown.loc["resnet18", "paper acc"] == "92.0"
    assert shown.loc["resnet18", "paper auc"] == "0.98"
    assert shown.loc["mystery", "paper acc"] == "-"
    pooled = table1_pooled_display(t1, details).set_index("Model")
    assert pooled.loc["resnet18", "Rows (distinct images)"] == "12 (4)"
    assert pooled.loc["resnet18", "Runs pooled"] == 3
    assert pooled.loc["resnet18", "Accuracy (%) [95% CI]"] == "83.3 [-, -]"
    single, _ = table1({"vgg16": [_run("vgg16", 0, SEEDS[0])]}, n_boot=0, seed=0)
    assert table1_display(single).loc[0, "F1 (%)"] == "100.0 ± -"  # one seed: no SD


def test_confusion_table_rows() -> None:
    details = {
        "a": {"confusion_matrix_sum": [[5, 1], [2, 4]]},
        "b": {"confusion_matrix_sum": None},  # no run had a matrix: no row
    }
    cm = confusion_table(details)
    assert cm.to_dict("records") == [{"model": "a", "TN": 5, "FP": 1, "FN": 2, "TP": 4}]


def test_roc_curves_per_seed_and_pooled(by_model) -> None:
    curves, pooled, info = roc_curves(by_model)
    assert info["resnet18"]["auc_per_seed"] == pytest.approx([1.0, 0.75, 1.0])
    assert info["resnet18"]["auc_pooled"] == pytest.approx(34 / 36)
    fpr, tpr, auc = pooled["resnet18"]
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert auc == pytest.approx(34 / 36)
    # The metrics.json-only run of "mystery" stored no curve: only the other seed is drawn.
    assert len(curves["mystery"]) == 1 and info["mystery"]["auc_per_seed"] == [1.0]


def test_roc_curve_falls_back_to_the_stored_curve() -> None:
    run = _run("vgg16", 0, SEEDS[1], with_rows=False)
    run.metrics = {"test": {"roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 1.0, 1.0]}}}
    curves, pooled, info = roc_curves({"vgg16": [run]})
    assert curves["vgg16"] == [([0.0, 0.5, 1.0], [0.0, 1.0, 1.0], 0.75)]
    assert pooled == {} and info["vgg16"]["auc_pooled"] is None


# --------------------------------------------------------------------------- per image
@pytest.mark.parametrize(
    ("preds", "probs", "expected_pred"),
    [
        ((1, 0), (0.6, 0.3), 0),  # vote tie 1/2 -> mean probability 0.45 < 0.5
        ((1, 0), (0.8, 0.3), 1),  # vote tie -> mean probability 0.55
        ((1, 1, 0), (0.1, 0.1, 0.1), 1),  # majority perfusion, whatever the probabilities
        ((0, 0, 1), (0.9, 0.9, 0.9), 0),  # majority ventilation
    ],
)
def test_per_image_majority_vote(preds, probs, expected_pred) -> None:
    runs = [
        _run("m", i, [p], labels=(1,), ids=("x",), preds=[v])
        for i, (v, p) in enumerate(zip(preds, probs, strict=True))
    ]
    out = per_image(runs)
    assert out.loc["x", "pred"] == expected_pred
    assert out.loc["x", "prob"] == pytest.approx(np.mean(probs))
    assert out.loc["x", "n_runs"] == len(preds)


def test_per_image_flags_inconsistent_labels_and_needs_rows() -> None:
    runs = [
        _run("m", 0, [0.9], labels=(1,), ids=("x",)),
        _run("m", 1, [0.9], labels=(0,), ids=("x",)),
    ]
    assert not per_image(runs).loc["x", "label_consistent"]
    assert per_image([_run("m", 0, [0.9], labels=(1,), ids=("x",), with_rows=False)]) is None


def _images(ids, labels, preds, probs) -> pd.DataFrame:
    return pd.DataFrame(
        {"label": labels, "label_consistent": True, "prob": probs, "pred": preds},
        index=pd.Index(ids, name="id"),
    )


IDS6 = list("abcdef")
Y6 = [1, 1, 1, 0, 0, 0]


def test_compare_pair_counts_discordant_images() -> None:
    a = _images(IDS6, Y6, [1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    # B is wrong on a (perfusion called ventilation) and d (ventilation called perfusion).
    b = _images(IDS6, Y6, [0, 1, 1, 1, 0, 0], [0.4, 0.8, 0.7, 0.6, 0.2, 0.1])
    row = compare_pair(a, b)
    assert row["n_images"] == 6 and row["note"] == ""
    assert (row["acc_a"], row["acc_b"]) == (1.0, pytest.approx(4 / 6))
    assert (row["mcnemar_b"], row["mcnemar_c"]) == (2, 0)  # A right & B wrong: 2; reverse: 0
    assert row["mcnemar_p"] == pytest.approx(0.5)  # exact: 2 * P[Bin(2, 1/2) <= 0]
    assert row["auc_a"] == pytest.approx(1.0)
    # B's AUC: perfusion .4 .8 .7 vs ventilation .6 .2 .1 -> 8 of 9 pairs.
    assert row["auc_b"] == pytest.approx(8 / 9)
    assert row["auc_diff"] == pytest.approx(1.0 - 8 / 9)


@pytest.mark.parametrize(
    ("ids_b", "labels_b", "note"),
    [
        (list("cdefgh"), [1, 0, 0, 0, 1, 0], "compared on the 4 common ids (of 6 / 6)"),
        (list("uvwxyz"), Y6, "no common test image ids; not compared"),
        (IDS6, [0, 1, 1, 0, 0, 0], "labels of the same ids disagree between runs; not compared"),
    ],
)
def test_compare_pair_says_what_it_left_out(ids_b, labels_b, note) -> None:
    a = _images(IDS6, Y6, [1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    b = _images(ids_b, labels_b, [1, 0, 0, 0, 1, 0], [0.9, 0.2, 0.3, 0.1, 0.8, 0.2])
    row = compare_pair(a, b)
    assert note in row["note"]
    if "not compared" in note:
        assert set(row) == {"note"}
    else:
        assert row["n_images"] == 4


def test_model_comparison_every_pair_with_holm(by_model) -> None:
    by_model = {**by_model, "vgg16": [_run("vgg16", 0, (0.4, 0.6, 0.7, 0.2))]}
    cmp, notes = model_comparison(by_model)
    assert [(r.model_a, r.model_b) for r in cmp.itertuples()] == [
        ("resnet18", "mystery"),
        ("resnet18", "vgg16"),
        ("mystery", "vgg16"),
    ]
    assert notes == []
    p = cmp["mcnemar_p"].to_numpy()
    # Holm over 3 pairs: the smallest p times 3, the next times 2, made monotone, capped at 1.
    order = np.argsort(p)
    expected = np.minimum(1, np.maximum.accumulate(p[order] * np.array([3, 2, 1])))
    np.testing.assert_allclose(cmp["mcnemar_p_holm"].to_numpy()[order], expected)
    shown = comparison_display(cmp)
    assert shown.loc[0, "models"] == "resnet18 vs mystery"
    assert shown.loc[1, "acc a / b"] == "100.0 / 50.0"  # resnet18's seed vote vs vgg16


def test_model_comparison_without_rows_is_a_note() -> None:
    cmp, _ = model_comparison(
        {"a": [_run("a", 0, SEEDS[0])], "b": [_run("b", 0, SEEDS[0], with_rows=False)]}
    )
    assert cmp.loc[0, "note"] == "no per-image predictions for one model"
    assert math.isnan(cmp.loc[0, "delong_p_holm"])
    shown = comparison_display(cmp)
    assert shown.loc[0, "DeLong p (Holm)"] == "- (-)" and shown.loc[0, "McNemar b/c"] == "-"


# --------------------------------------------------------------------------- CAM tables
def _gt_cams() -> ModelCams:
    """One ventilation and one perfusion CAM (4 x 4) with their truth masks.

    Ventilation: trachea = the top-left 2 x 2 block (chance 4/16); the CAM is 1 on two pixels
    inside it and two outside -> energy share 1/2 (ratio 2), half its peak pixels inside.
    Perfusion: heart = the bottom row (chance 4/16); the CAM is flat -> share 1/4 (ratio 1),
    pointing 4/16 (every pixel is a peak).
    """
    cams = np.zeros((2, 4, 4))
    cams[0, 0, 0] = cams[0, 1, 1] = cams[0, 3, 2] = cams[0, 2, 3] = 1.0
    cams[1] = 1.0
    trachea = np.zeros((2, 4, 4), bool)
    trachea[0, :2, :2] = True
    heart = np.zeros((2, 4, 4), bool)
    heart[1, 3, :] = True
    return ModelCams(
        cams=cams,
        labels=np.array([0, 1]),
        ids=np.array(["v", "p"]),
        images=None,
        masks={"trachea": trachea, "heart": heart},
        n_runs=1,
    )


def test_groundtruth_table_by_hand() -> None:
    no_masks = ModelCams(np.ones((1, 4, 4)), np.array([1]), np.array(["x"]), None, {}, 1)
    gt, details = groundtruth_table({"m": _gt_cams(), "bare": no_masks})
    assert set(gt["model"]) == {"m"} and set(details) == {"m"}  # no masks: left out
    rows = gt.set_index("class")
    vent, perf = rows.loc["ventilation"], rows.loc["perfusion"]
    assert vent["targets"] == "trachea" and perf["targets"] == "heart"
    assert vent["energy_share"] == pytest.approx(0.5) and vent["chance_share"] == 0.25
    assert vent["energy_ratio"] == pytest.approx(2.0)
    assert vent["pointing_hit_rate"] == pytest.approx(0.5)
    assert perf["energy_ratio"] == pytest.approx(1.0)
    assert perf["pointing_hit_rate"] == pytest.approx(0.25)
    shown = groundtruth_display(gt).set_index("class")
    assert shown.loc["ventilation", "energy_share"] == "50.0%"
    assert shown.loc["ventilation", "energy_ratio"] == "2.00"
    assert groundtruth_table({"bare": no_masks})[0].empty


def test_groundtruth_pointing_grants_half_a_cam_cell_as_the_neck_table_does() -> None:
    """A peak 2 px beside the trachea misses with no CAM grid known; with a 2 x 2 map at 8 px
    (cells of 4 px, tolerance 2 px) it hits, and the chance level is the grown mask's share."""
    cams = np.zeros((1, 8, 8))
    cams[0, 0, 3] = 1.0
    trachea = np.zeros((1, 8, 8), bool)
    trachea[0, :2, :2] = True
    mc = ModelCams(cams, np.array([0]), np.array(["v"]), None, {"trachea": trachea}, 1)
    plain = groundtruth_table({"m": mc})[0].set_index("class").loc["ventilation"]
    assert plain["pointing_tolerance_px"] == 0.0 and plain["pointing_hit_rate"] == 0.0
    assert plain["pointing_chance"] == pytest.approx(4 / 64)
    grown, details = groundtruth_table({"m": mc}, {"m": (2, 2)})
    row = grown.set_index("class").loc["ventilation"]
    assert row["pointing_tolerance_px"] == 2.0 and row["pointing_hit_rate"] == 1.0
    assert row["pointing_chance"] > 4 / 64
    assert row["energy_share"] == plain["energy_share"] == 0.0  # energy: the masks as drawn
    assert details["m"]["pointing_tolerance_px"] == 2.0


def test_cam_statistics_table_cells() -> None:
    info = {
        "m": {
            "n_perfusion": 6,
            "n_ventilation": 4,
            "significant_fraction": {"n_pixels": 16.0, "uncorrected": 0.125, "fdr": 0.0625},
        },
        "few": {"n_perfusion": 1, "n_ventilation": 0, "note": "fewer than 2 CAMs in a class"},
    }
    table = cam_statistics_table(info).set_index("model")
    assert table.loc["m", "significant uncorrected"] == "12.5%"
    assert table.loc["m", "significant fdr"] == "6.2%"
    assert "significant n_pixels" not in table.columns
    assert table.loc["few", "note"] == "fewer than 2 CAMs in a class"
    assert table.loc["m", "perfusion images"] == 6


def test_pooled_metrics_pool_cross_validation_folds_by_image() -> None:
    """Two folds that test different images: pooled over both, each image is one unit."""
    runs = []
    for fold, ids in enumerate((("a", "b", "c", "d"), ("e", "f", "g", "h"))):
        r = _run("m", 0, (0.9, 0.6, 0.4, 0.1), ids=ids)
        r.overrides = {"data.split.fold": str(fold)}
        runs.append(r)
    pooled = pooled_metrics(runs, n_boot=50, seed=0)
    assert pooled["n_folds"] == 2 and pooled["n_unique_images"] == pooled["n_units"] == 8
    assert pooled["acc"] == 1.0
