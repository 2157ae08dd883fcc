"""On a real SLURM: the README's cluster command, and a job that SLURM cancels.

Needs a running cluster: ``.ci/slurm-up.sh`` starts a one-node one on localhost (as root) and
prints the ``SLURM_CONF`` to export; ``.ci/run`` does both and sets LUNG_CLS_REQUIRE_SLURM=1, so
that there a missing cluster fails instead of skipping. The partition is ``debug``
(LUNG_CLS_SLURM_PARTITION to change it). Tiny jobs: 2 x 1 epoch at 32 px, about a minute each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

PARTITION = os.environ.get("LUNG_CLS_SLURM_PARTITION", "debug")


def _why_no_slurm() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo/sbatch) on PATH; start a cluster with .ci/slurm-up.sh"
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is not set; .ci/slurm-up.sh prints the line to export"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%T"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        return f"sinfo does not answer ({err})"
    if proc.returncode != 0:
        return f"sinfo fails: {proc.stderr.strip()[:300]}"
    if not re.search(r"idle|mixed|allocated", proc.stdout):
        return f"no usable node in partition {PARTITION!r} (sinfo: {proc.stdout.strip()!r})"
    return None


NO_SLURM = _why_no_slurm()
if NO_SLURM and os.environ.get("LUNG_CLS_REQUIRE_SLURM") == "1":
    pytest.fail(f"LUNG_CLS_REQUIRE_SLURM=1 but {NO_SLURM}", pytrace=False)
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(NO_SLURM is not None, reason=NO_SLURM or "")]

# The README's command (docs/cluster.md), made tiny: debug=tiny (32 px, 50 images), 1 epoch.
README = ("hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "experiment=demo",
          "model=resnet18", "seed=0,1")  # fmt: skip
TINY = ("debug=tiny", "trainer.max_epochs=1", "n_boot=50")


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "PROJECT_ROOT": str(root)}  # fmt: skip


def _cmd(sweep: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lung_cls.train", "-m", *README, *TINY,
            f"hydra.sweep.dir={sweep}", *extra]  # fmt: skip


def _runs(sweep: Path) -> dict[int, Path]:
    """seed -> run dir."""
    return {
        int(re.search(r"seed=(\d+)", d.name).group(1)): d
        for d in sweep.iterdir()
        if d.is_dir() and "seed=" in d.name
    }


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _slurm_jobs(sweep: Path) -> set[str]:
    """The SLURM jobs that ran for the sweep: submitit's folders under .submitit/ that hold a job
    log (<array>_<task>, or <id> for a sweep of one job, which submitit submits as a plain job;
    an array's own folder holds only its sbatch script)."""
    return {p.name for p in (sweep / ".submitit").iterdir() if any(p.glob("*_log.out"))}


def _sacct_states(job_ids: set[str]) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", *(f"-j{j}" for j in job_ids)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def test_readme_command_runs_on_slurm(tmp_path):
    """2 jobs of a SLURM array, both complete, report built by the submitting command."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        _cmd(sweep), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    runs = _runs(sweep)
    assert sorted(runs) == [0, 1]
    for run in runs.values():
        assert _metrics(run)["status"] == "ok"
        for name in ("predictions.csv", "cams.npz", "checkpoints/best.ckpt"):
            assert (run / name).is_file(), name
    jobs = _slurm_jobs(sweep)
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1  # one array
    # SLURM itself ran them (accounting knows them), and the report came after the last one.
    assert set(_sacct_states(jobs).values()) == {"COMPLETED"}, _sacct_states(jobs)
    report = json.loads((sweep / "report" / "report.json").read_text())
    assert sorted(r["status"] for r in report["runs"]) == ["ok", "ok"]
    last = max((r / "metrics.json").stat().st_mtime for r in runs.values())
    assert (sweep / "report" / "report.json").stat().st_mtime >= last


def _wait_for_task(name: str, task: str, proc: subprocess.Popen, timeout: float = 300) -> str:
    """The job id ``<array>_<task>`` of the sweep called ``name`` once SLURM runs it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the sweep ended before its job was running"
        out = subprocess.run(
            ["squeue", "-h", "-n", name, "-o", "%i %T"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout  # fmt: skip
        for line in out.splitlines():
            job_id, state = line.split()
            if job_id.endswith(f"_{task}") and state == "RUNNING":
                return job_id
        time.sleep(0.5)
    raise AssertionError(f"task {task} of {name} was not running within {timeout} s")


def test_cancelled_job_is_recorded_and_rerun(tmp_path):
    """scancel one job: recorded failed with SLURM's reason, the other kept, report built and
    listing it, exit 1; skip_completed=true then submits and runs only the cancelled one."""
    sweep = tmp_path / "sweep"
    name = f"lung_cls-test-{os.getpid()}-{time.monotonic_ns()}"
    cmd = _cmd(sweep, f"hydra.launcher.name={name}")
    with subprocess.Popen(
        cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    ) as proc:  # fmt: skip
        try:
            job_id = _wait_for_task(name, "1", proc)
            subprocess.run(["scancel", job_id], check=True, timeout=30)
            log, _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                subprocess.run(["scancel", "-n", name], check=False, timeout=30)
    assert proc.returncode == 1, log[-4000:]
    assert "did not finish" in log
    runs = _runs(sweep)
    assert sorted(runs) == [0, 1], log[-3000:]
    kept, cancelled = _metrics(runs[0]), _metrics(runs[1])
    assert kept["status"] == "ok"
    assert (runs[0] / "checkpoints" / "best.ckpt").is_file()
    assert cancelled["status"] == "failed"
    assert job_id in cancelled["error"] and "CANCELLED" in cancelled["error"], cancelled
    assert cancelled["seed"] == 1 and cancelled["model"] == "resnet18"
    report = json.loads((sweep / "report" / "report.json").read_text())
    by_run = {r["run"]: r for r in report["runs"]}
    assert by_run[runs[0].name]["status"] == "ok"
    assert by_run[runs[1].name]["status"] == "failed"
    assert "CANCELLED" in by_run[runs[1].name]["error"]
    assert runs[1].name in (sweep / "report" / "report.html").read_text()

    kept_bytes = (runs[0] / "metrics.json").read_bytes()
    kept_stamp = (runs[0] / "metrics.json").stat().st_mtime_ns
    jobs_before = _slurm_jobs(sweep)
    again = subprocess.run(
        _cmd(sweep, "skip_completed=true"), cwd=ROOT, env=_env(tmp_path),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert "already complete (not submitted)" in log
    new_jobs = _slurm_jobs(sweep) - jobs_before
    assert len(new_jobs) == 1, new_jobs  # only the cancelled job went to SLURM again
    assert (runs[0] / "metrics.json").stat().st_mtime_ns == kept_stamp
    assert (runs[0] / "metrics.json").read_bytes() == kept_bytes
    assert _metrics(runs[1])["status"] == "ok"
    report = json.loads((sweep / "report" / "report.json").read_text())
    assert sorted(r["status"] for r in report["runs"]) == ["ok", "ok"]
