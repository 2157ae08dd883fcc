"""A sweep survives a failing job: the other runs keep their results, the report lists the failure
with its error, and re-running the sweep with skip_completed=true runs only what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BAD = "nonexistent_net"


def _sweep(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        sys.executable, "-m", "lung_cls.train", "-m", "debug=tiny", "model=timm",
        f"model.backbone=test_resnet,{BAD}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _runs(sweep: Path) -> dict[str, Path]:
    """backbone -> run dir (dirs are named by their overrides)."""
    out = {}
    for d in sweep.iterdir():
        if d.is_dir() and "model.backbone=" in d.name:
            out["good" if "test_resnet" in d.name else "bad"] = d
    return out


@pytest.mark.slow
def test_failed_job_is_reported_and_rerun_skips_completed(tmp_path):
    sweep = tmp_path / "sweep"
    first = _sweep(tmp_path)
    # Every job runs and the report is built, then the sweep exits 1 because a job failed (for
    # scripts); `+hydra.callbacks.report.fail_on_failed_runs=false` keeps it at 0.
    assert first.returncode == 1, first.stderr[-3000:]
    assert "did not finish" in first.stderr + first.stdout
    runs = _runs(sweep)
    assert sorted(runs) == ["bad", "good"], sorted(p.name for p in sweep.iterdir())
    good = json.loads((runs["good"] / "metrics.json").read_text())
    bad = json.loads((runs["bad"] / "metrics.json").read_text())
    assert good["status"] == "ok"
    for name in ("predictions.csv", "cams.npz", "checkpoints/best.ckpt"):
        assert (runs["good"] / name).is_file(), name
    assert bad["status"] == "failed" and BAD in bad["error"]

    report = json.loads((sweep / "report" / "report.json").read_text())
    by_run = {r["run"]: r for r in report["runs"]}
    assert by_run[runs["bad"].name]["status"] == "failed"
    assert BAD in by_run[runs["bad"].name]["error"]
    assert by_run[runs["good"].name]["status"] == "ok"
    html = (sweep / "report" / "report.html").read_text()
    assert runs["bad"].name in html and BAD in html

    good_stamp = (runs["good"] / "metrics.json").stat().st_mtime_ns
    good_bytes = (runs["good"] / "metrics.json").read_bytes()
    good_ckpt = (runs["good"] / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    bad_stamp = (runs["bad"] / "metrics.json").stat().st_mtime_ns

    second = _sweep(tmp_path, "skip_completed=true")
    assert second.returncode == 1, second.stderr[-3000:]
    assert _runs(sweep) == runs  # same run dirs: skip_completed is not part of their names
    # The completed run was skipped: not one of its files was touched ...
    assert (runs["good"] / "metrics.json").stat().st_mtime_ns == good_stamp
    assert (runs["good"] / "metrics.json").read_bytes() == good_bytes
    assert (runs["good"] / "checkpoints" / "best.ckpt").stat().st_mtime_ns == good_ckpt
    # ... and the failed one was tried again (and failed again, with the same error).
    assert (runs["bad"] / "metrics.json").stat().st_mtime_ns > bad_stamp
    again = json.loads((runs["bad"] / "metrics.json").read_text())
    assert again["status"] == "failed" and BAD in again["error"]
    log = second.stdout + second.stderr
    assert "already complete" in log
