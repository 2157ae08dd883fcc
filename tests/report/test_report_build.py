"""The sweep report on a fake sweep dir written with NumPy (no training, no torch)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lung_cls.errors import UserError
from lung_cls.evaluation.metrics import binary_metrics
from lung_cls.report import build_report, discover_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE = 32
N_TEST = 12  # 6 perfusion, 6 ventilation


# --------------------------------------------------------------------------- fake sweep helpers
def _masks(n: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    heart = (yy - 20) ** 2 + (xx - 18) ** 2 < 16
    lungs = ((np.abs(xx - 10) < 5) | (np.abs(xx - 22) < 5)) & (yy > 8) & (yy < 28)
    trachea = (np.abs(xx - 16) < 2) & (yy < 8)
    hotspots = (yy - 12) ** 2 + (xx - 9) ** 2 < 4
    return {
        name: np.repeat(m[None], n, axis=0)
        for name, m in (
            ("heart", heart),
            ("lungs", lungs),
            ("trachea", trachea),
            ("hotspots", hotspots),
        )
    }


def _write_run(
    sweep: Path,
    model: str,
    seed: int,
    rng: np.random.Generator,
    cams: bool = True,
    skill: float = 1.5,
) -> Path:
    """One run dir as train.py writes it: .hydra/, predictions.csv, cams.npz, metrics.json."""
    run = sweep / f"model={model},seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n- seed={seed}\n")
    (run / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nmodel:\n  name: {model}\nlogger:\n  csv: {{}}\n"
    )
    labels = np.array([1] * (N_TEST // 2) + [0] * (N_TEST // 2))
    ids = np.array([f"case{i:03d}" for i in range(N_TEST)])
    prob = 1.0 / (1.0 + np.exp(-(skill * (2 * labels - 1) + rng.normal(0, 1.2, N_TEST))))
    pred = (prob >= 0.5).astype(int)
    rows = [
        {
            "id": f"val{i}",
            "path": f"phantom://val{i}",
            "patient_id": f"p{i}",
            "split": "val",
            "label": i % 2,
            "prob_perfusion": 0.5,
            "pred": 1,
        }
        for i in range(4)
    ] + [
        {
            "id": ids[i],
            "path": f"phantom://{ids[i]}",
            "patient_id": ids[i],
            "split": "test",
            "label": int(labels[i]),
            "prob_perfusion": round(float(prob[i]), 6),
            "pred": int(pred[i]),
        }
        for i in range(N_TEST)
    ]
    pd.DataFrame(rows).to_csv(run / "predictions.csv", index=False)
    test = binary_metrics(labels, np.round(prob, 6), pred=pred)
    metrics = {
        "status": "ok",
        "error": None,
        "model": model,
        "backbone": model,
        "seed": seed,
        "split_seed": 0,
        "best_epoch": 1,
        "val/acc_best": 0.5,
        "epochs_run": 2,
        "test": test,
    }
    if cams:
        m = _masks(N_TEST)
        noise = rng.uniform(0, 0.2, (N_TEST, SIZE, SIZE))
        maps = np.where(labels[:, None, None] == 1, m["heart"] * 0.8, m["trachea"] * 0.8) + noise
        maps = maps / maps.max(axis=(1, 2), keepdims=True)
        images = (rng.uniform(0, 255, (N_TEST, SIZE, SIZE)) * m["lungs"]).astype(np.uint8)
        np.savez(
            run / "cams.npz",
            cams=maps.astype(np.float16),
            labels=labels,
            ids=ids,
            images=images,
            preds=pred,
            probs=prob.astype(np.float32),
            **{f"mask_{k}": v for k, v in m.items()},
        )
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _metrics_from_csv(run: Path) -> dict[str, float]:
    """Independent recomputation (NumPy + scikit-learn) of one run's test metrics."""
    df = pd.read_csv(run / "predictions.csv")
    df = df[df["split"] == "test"]
    y, p, yhat = df["label"].to_numpy(), df["prob_perfusion"].to_numpy(), df["pred"].to_numpy()
    tp = np.sum((y == 1) & (yhat == 1))
    tn = np.sum((y == 0) & (yhat == 0))
    fp = np.sum((y == 0) & (yhat == 1))
    fn = np.sum((y == 1) & (yhat == 0))
    return {
        "acc": (tp + tn) / len(y),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "auc": roc_auc_score(y, p),
    }


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vgg16 x 2 seeds and resnet18 x 2 seeds; resnet18 seed 1 lost its metrics.json (crashed),
    an extra job failed with an error, and the sweep asked for seed 2 (never ran) of both."""
    sweep = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    for model in ("vgg16", "resnet18"):
        for seed in (0, 1):
            _write_run(sweep, model, seed, rng)
    crashed = sweep / "model=resnet18,seed=1"
    (crashed / "metrics.json").unlink()
    (crashed / "train.log").write_text(
        "[INFO] epoch 3\nTraceback (most recent call last):\n  File x\nRuntimeError: disk quota exceeded\n"
    )
    failed = sweep / "model=seresnext101,seed=0"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- model=seresnext101\n- seed=0\n")
    (failed / "metrics.json").write_text(
        json.dumps(
            {
                "status": "failed",
                "error": "WeightsNotFoundError: no local weights",
                "model": "seresnext101",
                "seed": 0,
            }
        )
    )
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - model=vgg16,resnet18\n    - seed=0,1,2\n"
    )
    return sweep


@pytest.fixture(scope="module")
def report_dir(fake_sweep: Path) -> Path:
    return build_report(fake_sweep, n_boot=200, n_perm=50, seed=0, log_wandb=False)


# --------------------------------------------------------------------------- tests
def test_discover_runs_statuses(fake_sweep: Path) -> None:
    runs = {r.name: r for r in discover_runs(fake_sweep)}
    assert set(runs) == {
        "model=vgg16,seed=0",
        "model=vgg16,seed=1",
        "model=resnet18,seed=0",
        "model=resnet18,seed=1",
        "model=seresnext101,seed=0",
    }
    assert runs["model=resnet18,seed=1"].status == "incomplete"
    assert "disk quota exceeded" in runs["model=resnet18,seed=1"].error
    assert runs["model=resnet18,seed=1"].model == "resnet18"  # from .hydra/overrides.yaml
    assert runs["model=seresnext101,seed=0"].status == "failed"
    assert runs["model=vgg16,seed=0"].status == "ok"
    assert runs["model=vgg16,seed=0"].metrics_source == "predictions.csv"


def test_table1_equals_mean_of_recomputed_metrics(fake_sweep: Path, report_dir: Path) -> None:
    t1 = pd.read_csv(report_dir / "table1.csv").set_index("model")
    assert list(t1.index) == ["vgg16", "resnet18"]  # paper order; failed model absent
    for model, seeds in (("vgg16", (0, 1)), ("resnet18", (0,))):
        per_run = [_metrics_from_csv(fake_sweep / f"model={model},seed={s}") for s in seeds]
        for key in ("acc", "f1", "sensitivity", "specificity"):
            vals = [100 * d[key] for d in per_run]
            assert t1.loc[model, f"{key}_pct_mean"] == pytest.approx(np.mean(vals))
            if len(vals) > 1:
                assert t1.loc[model, f"{key}_pct_sd"] == pytest.approx(np.std(vals, ddof=1))
            else:
                assert math.isnan(t1.loc[model, f"{key}_pct_sd"])
        assert t1.loc[model, "auc_mean"] == pytest.approx(np.mean([d["auc"] for d in per_run]))
        assert t1.loc[model, "n_runs"] == len(seeds)
    assert t1.loc["vgg16", "paper_acc_pct"] == 89.5
    assert t1.loc["resnet18", "paper_auc"] == 0.98
    # Pooled over seeds: 2 x 12 rows of 12 distinct images, CI brackets the point estimate.
    assert t1.loc["vgg16", "pooled_n"] == 2 * N_TEST
    assert t1.loc["vgg16", "pooled_unique_images"] == N_TEST
    lo, hi, mid = (t1.loc["vgg16", f"pooled_acc_pct{s}"] for s in ("_lo", "_hi", ""))
    assert lo <= mid <= hi
    md = (report_dir / "table1.md").read_text()
    assert "± -" in md  # resnet18 has a single finished seed: SD shown as "-"


def test_figures_are_png(report_dir: Path) -> None:
    for name in ("fig2_average_cams.png", "fig3_cam_statistics.png", "fig4_roc.png"):
        data = (report_dir / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name


def test_html_is_self_contained_and_lists_failures(report_dir: Path) -> None:
    text = (report_dir / "report.html").read_text()
    assert text.count("data:image/png;base64,") == 4  # Figs. 2-4 and the reliability diagram
    assert "<img" in text and 'src="fig' not in text  # no links to files next to it
    assert "model=resnet18,seed=1" in text and "disk quota exceeded" in text
    assert "WeightsNotFoundError: no local weights" in text
    assert "model=vgg16,seed=2" in text  # asked for by the sweep, never ran
    for method in ("DeLong", "McNemar", "Holm", "Benjamini-Hochberg", "max-|t|", "bootstrap"):
        assert method in text, method


def test_model_comparison_has_the_pair(report_dir: Path) -> None:
    cmp = pd.read_csv(report_dir / "model_comparison.csv")
    assert len(cmp) == 1
    row = cmp.iloc[0]
    assert (row["model_a"], row["model_b"]) == ("vgg16", "resnet18")
    assert row["n_images"] == N_TEST
    assert 0.0 <= row["delong_p"] <= 1.0 and 0.0 <= row["mcnemar_p"] <= 1.0
    assert row["delong_p_holm"] == pytest.approx(row["delong_p"])  # one pair: Holm changes nothing
    assert "vgg16 vs resnet18" in (report_dir / "model_comparison.md").read_text()


def test_cam_groundtruth_and_statistics(report_dir: Path) -> None:
    gt = pd.read_csv(report_dir / "cam_groundtruth.csv")
    assert set(gt["model"]) == {"vgg16", "resnet18"}
    perf = gt[(gt["model"] == "vgg16") & (gt["class"] == "perfusion")].iloc[0]
    vent = gt[(gt["model"] == "vgg16") & (gt["class"] == "ventilation")].iloc[0]
    assert perf["targets"] == "heart+lungs" and vent["targets"] == "trachea+hotspots"
    # The fake CAMs peak on the heart (perfusion) and the trachea (ventilation).
    assert perf["energy_share"] > perf["chance_share"]
    assert vent["pointing_hit_rate"] == pytest.approx(1.0)
    rep = json.loads((report_dir / "report.json").read_text(), parse_constant=pytest.fail)
    frac = rep["cam_statistics"]["vgg16"]["significant_fraction"]
    assert frac["uncorrected"] >= frac["fdr"] > 0.0  # heart and trachea differ strongly
    assert "maxT" in frac
    stats = rep["cam_statistics"]["vgg16"]
    assert stats["unit"].startswith("image") and stats["cam_scale"] == "minmax"
    assert stats["n_images"] == N_TEST and stats["n_maps"] == N_TEST * stats["n_runs"]
    lungs_or_trachea = _masks(1)["lungs"][0] | _masks(1)["trachea"][0]
    assert stats["n_tests"] == int(lungs_or_trachea.sum()) == frac["n_pixels"]
    assert rep["table1"]["vgg16"]["pooled"]["ci_unit"] == "image"
    assert rep["table1"]["vgg16"]["pooled"]["n_units"] == N_TEST
    assert {r["status"] for r in rep["runs"]} == {"ok", "failed", "incomplete"}
    assert sorted(rep["missing_jobs"]) == ["model=resnet18,seed=2", "model=vgg16,seed=2"]


def test_report_without_cams_single_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _write_run(tmp_path, "resnet18", 0, rng, cams=False)
    out = build_report(tmp_path, n_boot=50, n_perm=10, log_wandb=False)
    assert (out / "table1.csv").exists() and (out / "fig4_roc.png").exists()
    assert not (out / "fig2_average_cams.png").exists()
    assert not (out / "model_comparison.csv").exists()
    text = (out / "report.html").read_text()
    assert "CAM figures skipped" in text and "nothing to compare" in text


def test_report_errors_and_callback(tmp_path: Path, fake_sweep: Path) -> None:
    from omegaconf import OmegaConf

    from lung_cls.evaluation.sweep_callback import ReportOnMultirunEnd

    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope")
    with pytest.raises(UserError, match="no run dirs"):  # a UserError too: one line, exit 2
        build_report(tmp_path)
    cb = ReportOnMultirunEnd(n_boot=20, n_perm=5, log_wandb=False)
    cb.on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nope")}}})
    )  # logs, no raise
    out = tmp_path / "cb_out"
    sweep_copy = tmp_path / "sweep"
    import shutil

    shutil.copytree(fake_sweep / "model=vgg16,seed=0", sweep_copy / "model=vgg16,seed=0")
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_copy)}}}))
    assert (sweep_copy / "report" / "report.html").exists()
    assert not out.exists()


def test_cli_writes_nothing_in_cwd(tmp_path: Path, fake_sweep: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "cli_report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lung_cls.report",
            f"sweep_dir={fake_sweep}",
            f"out_dir={out}",
            "n_boot=20",
            "n_perm=5",
            "log_wandb=false",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "report.html").exists()
    assert list(cwd.iterdir()) == []


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lung_cls.report", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, fake_sweep: Path) -> None:
    """A missing sweep dir and a typed config mistake: one ``error:`` line naming it, exit 2,
    no traceback, nothing written."""
    proc = _cli(f"sweep_dir={tmp_path / 'nope'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'nope'}: sweep dir does not exist"], proc.stderr
    out = tmp_path / "out"
    proc = _cli(f"sweep_dir={fake_sweep}", f"out_dir={out}", "n_boot=many", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: n_boot='many': expected an integer >= 0"], (
        proc.stderr
    )
    assert not out.exists()


def test_evaluation_package_import_is_light() -> None:
    code = (
        "import sys, lung_cls.evaluation as e; "
        "assert 'matplotlib' not in sys.modules and 'pytorch_grad_cam' not in sys.modules; "
        "assert callable(e.binary_metrics) and callable(e.holm); "
        "assert 'pytorch_grad_cam' not in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_figure_helpers(tmp_path: Path) -> None:
    import matplotlib

    from lung_cls.evaluation.figures import DIFF_CMAP, fig_cam_grid, fig_cam_statistics

    # diff = vent - perf: negative (perfusion higher) must be red, positive blue, as in the paper.
    cmap = matplotlib.colormaps[DIFF_CMAP]
    lo, mid, hi = cmap(0.0), cmap(0.5), cmap(1.0)
    assert lo[0] > lo[2] and hi[2] > hi[0] and min(mid[:3]) > 0.9
    rng = np.random.default_rng(0)
    grid = fig_cam_grid(
        rng.uniform(0, 255, (3, 16, 16)),
        rng.uniform(0, 1, (3, 16, 16)),
        tmp_path / "g.png",
        titles=["a", "b", "c"],
    )
    assert grid.read_bytes()[:8] == PNG_MAGIC
    flat = np.zeros((16, 16))  # no difference at all and no masks computed: still draws
    stats = fig_cam_statistics({"m": {"diff": flat, "mean_cam": flat}}, tmp_path / "s.png")
    assert stats.stat().st_size > 1000
    with pytest.raises(ValueError, match="must be"):
        fig_cam_grid(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)), tmp_path / "x.png")


def test_wandb_offline_logging(
    tmp_path: Path, fake_sweep: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep = tmp_path / "sweep"
    shutil.copytree(fake_sweep / "model=vgg16,seed=0", sweep / "model=vgg16,seed=0")
    out = build_report(sweep, n_boot=20, n_perm=5, log_wandb=True)
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("logged to W&B project 'lung_cls' (offline)" in n for n in notes), notes
    assert list((out / "wandb").glob("offline-run-*"))


def test_report_fallbacks_and_unfinished(tmp_path: Path) -> None:
    """metrics.json alone still gives a Table 1 row; a sweep of only unfinished runs still reports."""
    run = _write_run(tmp_path / "a", "resnet18", 0, np.random.default_rng(2), cams=False)
    (run / "predictions.csv").unlink()
    expected = json.loads((run / "metrics.json").read_text())["test"]["acc"]
    out = build_report(tmp_path / "a", n_boot=20, n_perm=5, log_wandb=False)
    t1 = pd.read_csv(out / "table1.csv")
    assert t1.loc[0, "acc_pct_mean"] == pytest.approx(100 * expected)
    assert t1.loc[0, "pooled_n"] == 0  # nothing to pool without per-image predictions
    assert (
        "predictions.csv: missing; using the metrics.json test numbers"
        in (out / "report.html").read_text()
    )

    # A job that Hydra started (it writes .hydra/ first) but that never wrote metrics.json.
    bad = tmp_path / "b" / "model=vgg16,seed=0"
    (bad / ".hydra").mkdir(parents=True)
    (bad / ".hydra" / "overrides.yaml").write_text("- model=vgg16\n- seed=0\n")
    (bad / ".hydra" / "config.yaml").write_text("seed: 0\nmodel:\n  name: vgg16\n")
    out = build_report(tmp_path / "b", log_wandb=False)
    assert not (out / "table1.csv").exists()
    text = (out / "report.html").read_text()
    assert "model=vgg16,seed=0" in text and "did not finish" in text and "No finished run" in text
