"""Calibration, neck subgroups and the CAM randomisation check, on numbers worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lung_cls.evaluation.cam import map_similarity, randomisation_check, randomised_copy
from lung_cls.report import build_report, checks
from tests.report.test_report_build import _write_run


def test_calibration_of_a_perfect_and_an_overconfident_model() -> None:
    y = np.array([0, 0, 1, 1])
    perfect = checks.calibration(y, y.astype(float))
    assert perfect["ece"] == pytest.approx(0.0) and perfect["brier"] == pytest.approx(0.0)
    # always 0.9 on a balanced set: 50% perfusion where the model says 90% -> ECE 0.4
    over = checks.calibration(y, np.full(4, 0.9))
    assert over["ece"] == pytest.approx(0.4, abs=1e-6)
    assert over["brier"] == pytest.approx((2 * 0.81 + 2 * 0.01) / 4)
    assert over["bins"] == [
        {
            "lo": pytest.approx(13 / 15),
            "hi": pytest.approx(14 / 15),
            "n": 4,
            "mean_p": pytest.approx(0.9),
            "frac_pos": 0.5,
        }
    ]


def test_subgroups_randomisation_and_calibration_in_the_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    run = _write_run(tmp_path, "resnet18", 0, rng)
    with np.load(run / "cams.npz") as z:
        a = dict(z)
    # 6 ventilation images (labels 0, the last 6): neck in the first 4; the model recognises
    # the 4 with neck and misses the 2 without; every perfusion image right.
    labels = a["labels"]
    vent = np.where(labels == 0)[0]
    a["mask_trachea"][vent[4:]] = False
    a["preds"] = labels.copy()
    a["preds"][vent[4:]] = 1
    a["cam_randomised_similarity"] = np.array([0.1, 0.2, 0.3] * 4, dtype=np.float32)
    a["cam_randomised_similarity"][-1] = np.nan  # a flat map: counted, left out, not a 0
    np.savez(run / "cams.npz", **a)
    out = build_report(tmp_path, n_boot=20, n_perm=5, log_wandb=False)
    rep = json.loads((out / "report.json").read_text())
    sub = rep["subgroups"]["resnet18"]
    assert sub["with neck activity"]["specificity"]["k"] == 4
    assert sub["with neck activity"]["specificity"]["n"] == 4
    assert sub["without neck activity"]["specificity"]["value"] == 0.0
    assert sub["without neck activity"]["accuracy"]["value"] == pytest.approx(6 / 8)
    lo, hi = (
        sub["without neck activity"]["specificity"]["lo"],
        sub["without neck activity"]["specificity"]["hi"],
    )
    assert lo == pytest.approx(0.0, abs=1e-9) and 0.6 < hi < 0.7  # Wilson 0/2
    rnd = rep["cam_randomisation"]["resnet18"]
    assert rnd["median"] == pytest.approx(0.2) and rnd["mean"] == pytest.approx(2.1 / 11)
    assert (rnd["n"], rnd["n_maps"], rnd["n_flat"]) == (11, 12, 1)
    assert rnd["verdict"] == "CAMs change with the weights (pass)"
    assert math.isfinite(rep["calibration"]["resnet18"]["ece"])
    assert (out / "fig5_reliability.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert "without neck activity" in html and "Adebayo" in html and "ECE" in html


def test_randomised_copy_changes_every_weight_and_leaves_the_model() -> None:
    from lung_cls.models.backbone import LungNet, create_backbone

    torch.manual_seed(0)
    net = LungNet(create_backbone("resnet18", pretrained=False)[0], 3, cam_layer="layer2").eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rand = randomised_copy(net, seed=1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    convs = [k for k in before if k.endswith("conv1.weight")]
    assert convs and all(not torch.equal(before[k], rand.state_dict()[k]) for k in convs)
    assert rand.cam_layer == "layer2"
    x = torch.rand(3, 1, 64, 64)
    from lung_cls.evaluation.cam import compute_gradcam

    cams = compute_gradcam(net, x, [0, 1, 0])
    # as RunArtifacts calls it: inside Lightning's test loop, i.e. under inference_mode
    with torch.inference_mode():
        sim = randomisation_check(net, x.clone(), [0, 1, 0], cams)
    assert sim.shape == (3,) and np.all((sim >= -1) | np.isnan(sim))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_map_similarity_is_one_for_equal_maps_and_nan_for_flat() -> None:
    a = np.random.default_rng(0).uniform(size=(2, 8, 8))
    b = a.copy()
    b[1] = 0.5
    s = map_similarity(a, b)
    assert s[0] == pytest.approx(1.0) and math.isnan(s[1])


def test_temperature_fit_softens_an_overconfident_model_and_the_report_uses_it(
    tmp_path: Path,
) -> None:
    from lung_cls.evaluation.calibration import fit_temperature, scale_probs

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    z_true = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.5, 400)
    p_over = 1 / (1 + np.exp(-4 * z_true))  # 4x too confident
    fit = fit_temperature(y, p_over)
    assert 2.5 < fit["temperature"] < 6 and fit["nll_after"] < fit["nll_before"]
    assert np.array_equal(scale_probs(p_over, 3.0) >= 0.5, p_over >= 0.5)  # ranking kept
    assert fit_temperature(np.ones(5), np.full(5, 0.9))["temperature"] == 1.0

    run = _write_run(tmp_path, "resnet18", 0, np.random.default_rng(0), cams=False)
    m = json.loads((run / "metrics.json").read_text())
    m["calibration"] = {"temperature": 2.0}
    (run / "metrics.json").write_text(json.dumps(m))
    out = build_report(tmp_path, n_boot=20, n_perm=5, log_wandb=False)
    cal = json.loads((out / "report.json").read_text())["calibration"]["resnet18"]
    assert cal["temperature_scaled"]["temperatures"] == [2.0]
    assert cal["temperature_scaled"]["brier"] != pytest.approx(cal["brier"])


def test_run_artifacts_store_the_temperature_in_the_checkpoint(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lung_cls.evaluation.callbacks import RunArtifacts

    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, ckpt)
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_path=str(ckpt)))
    y = np.array([0, 1] * 20)
    p = np.where(y == 1, 0.999, 0.001)
    p[:6] = 1 - p[:6]  # confident and sometimes wrong: T > 1
    fit = RunArtifacts(str(tmp_path), {}, temperature_scaling=True)._fit_temperature(trainer, y, p)
    stored = torch.load(ckpt, weights_only=True)
    assert stored["temperature"] == pytest.approx(fit["temperature"]) and fit["temperature"] > 1
    assert stored["epoch"] == 3


def test_subgroup_table_from_a_manifest_column_counts_each_image_once(tmp_path: Path) -> None:
    """Two seeds of a run on manifest data (no truth masks) that stored a 'site' column: the
    table is built from predictions.csv, each distinct test image once."""
    import pandas as pd

    # test rows: 6 perfusion (sites A A A A B B), 6 ventilation (A A B B B B)
    site = ["A"] * 4 + ["B"] * 2 + ["A"] * 2 + ["B"] * 4
    # perfusion: all right but the last B; ventilation: both A recognised, 1 of 4 B
    pred = [1, 1, 1, 1, 1, 0] + [0, 0, 0, 1, 1, 1]
    for seed in (0, 1):
        run = _write_run(tmp_path, "resnet18", seed, np.random.default_rng(seed), cams=False)
        df = pd.read_csv(run / "predictions.csv", dtype=str)
        test = df["split"] == "test"
        df["subgroup"] = ""
        df.loc[test, "subgroup"] = site
        df.loc[test, "pred"] = [str(p) for p in pred]
        df.loc[test, "prob_perfusion"] = ["0.9" if p else "0.1" for p in pred]
        df["path"] = "/data/" + df["id"] + ".dcm"  # not the phantom
        df.to_csv(run / "predictions.csv", index=False)
        m = json.loads((run / "metrics.json").read_text())
        m["data"] = {"subgroup": {"column": "site", "stratify": False}}
        (run / "metrics.json").write_text(json.dumps(m))
    out = build_report(tmp_path, n_boot=20, n_perm=5, log_wandb=False)
    sub = json.loads((out / "report.json").read_text())["subgroups"]["resnet18"]
    assert list(sub) == ["site = A", "site = B"]
    a, b = sub["site = A"], sub["site = B"]
    assert a["column"] == "site" and a["source"] == "data column 'site'" and a["value"] == "A"
    assert (a["specificity"]["k"], a["specificity"]["n"]) == (2, 2)
    assert (a["accuracy"]["k"], a["accuracy"]["n"]) == (7, 8)  # with all 6 perfusion
    assert (a["accuracy_within"]["k"], a["accuracy_within"]["n"]) == (6, 6)
    assert (b["specificity"]["k"], b["specificity"]["n"]) == (1, 4)
    assert (b["accuracy"]["k"], b["accuracy"]["n"]) == (6, 10)
    assert (b["accuracy_within"]["k"], b["accuracy_within"]["n"]) == (2, 6)
    assert b["perfusion_in_subgroup"] == 2
    lo, hi = b["specificity"]["lo"], b["specificity"]["hi"]
    assert 0.04 < lo < 0.05 and 0.69 < hi < 0.70  # Wilson 1/4
    md = (out / "subgroups.md").read_text()
    assert md.startswith("# Subgroups by 'site' (data column 'site')")
    assert "accuracy within subgroup (both classes)" in md
    assert "Subgroups by &#x27;site&#x27;" in (out / "report.html").read_text()  # escaped


def test_runs_without_any_subgroup_skip_the_section(tmp_path: Path) -> None:
    _write_run(tmp_path, "resnet18", 0, np.random.default_rng(0), cams=False)
    out = build_report(tmp_path, n_boot=20, n_perm=5, log_wandb=False)
    assert json.loads((out / "report.json").read_text())["subgroups"] == {}
    assert not (out / "subgroups.md").exists()
    assert "No subgroup (data.subgroup" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("median", "word"),
    [(0.0, "pass"), (-0.29, "pass"), (0.3, "caution"), (0.41, "caution"), (-0.59, "caution"),
     (0.6, "not explanations"), (0.95, "not explanations")],
)  # fmt: skip
def test_randomisation_verdict_is_graded(median: float, word: str) -> None:
    assert word in checks.randomisation_verdict(median)
