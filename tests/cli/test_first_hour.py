"""A new user's typed mistakes through the real door: one line, exit 2, no traceback, no job run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "WANDB_MODE": "offline",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "lung_cls.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_typed_mistake_and_paper_sweep_without_weights_stop_before_any_job(tmp_path):
    res = _train(tmp_path, "seed=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == "error: seed='abc': expected an integer"
    assert not (tmp_path / "run").exists()

    sweep = tmp_path / "sweep"
    res = _train(
        tmp_path,
        "-m",
        "model=vgg16,resnet18,inception_resnet_v2,seresnext101",
        "seed=0,1,2,3,4",
        f"hydra.sweep.dir={sweep}",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stderr.count("error:") == 1
    first = res.stderr.splitlines()[0]
    assert "4 models" in first and "seresnext101" in first
    assert not sweep.exists()  # no job started, no report of 20 identical failures
