"""Resume after a crash: a run killed with SIGKILL continues from its last epoch and ends with the
same metrics.json, byte for byte, as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose
from resume_slow import KILL_AFTER_EPOCH

from lung_cls.errors import UserError
from lung_cls.training import resolve_ckpt_path, run

TESTS = Path(__file__).resolve().parent
MAX_EPOCHS = 4


EPOCHS_TRAINED: list[int] = []


class EpochRecorder(L.Callback):
    """Records which epochs a (resumed) run actually trains."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        EPOCHS_TRAINED.append(int(trainer.current_epoch))


def _overrides(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "debug=tiny", "model=timm", "model.backbone=test_resnet", f"trainer.max_epochs={MAX_EPOCHS}",
        "resumable=true", "seed=0", f"paths.output_dir={tmp_path / name}",
        f"paths.cache_dir={tmp_path / 'cache'}", *extra,
    ]  # fmt: skip


def _ckpt_epoch(path: Path) -> int | None:
    """The epoch stored in a checkpoint, or None while it is missing or still being written."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - absent, half-written: try again later
        return None


def _start_and_kill(tmp_path: Path, name: str, result: dict) -> None:
    """Start a CLI run, SIGKILL it once last.ckpt of epoch >= KILL_AFTER_EPOCH exists."""
    # The subprocess imports the callback from this folder; it is its own module because this
    # test module imports conftest, which is not on the subprocess's path.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "lung_cls.train", *_overrides(tmp_path, name),
           "+callbacks.slow._target_=resume_slow.SlowAfterEpoch"]  # fmt: skip
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    last = tmp_path / name / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            epoch = _ckpt_epoch(last)
            if epoch is not None and epoch >= KILL_AFTER_EPOCH:
                proc.send_signal(signal.SIGKILL)
                result[name] = {"epoch": epoch, "returncode": proc.wait()}
                return
            time.sleep(0.2)
        result[name] = {"error": f"not killed: exit {proc.poll()}"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    # The run to kill starts in a subprocess (a thread watches it); meanwhile the reference run,
    # same config and seed, never interrupted, runs in-process.
    killed: dict[str, dict] = {}
    watcher = threading.Thread(target=_start_and_kill, args=(tmp_path, "killed", killed))
    watcher.start()
    run(compose(_overrides(tmp_path, "reference")))
    watcher.join()
    reference = tmp_path / "reference"
    assert json.loads((reference / "metrics.json").read_text())["status"] == "ok"

    info = killed["killed"]
    assert "error" not in info, (info, (tmp_path / "killed.log").read_text()[-3000:])
    assert info["returncode"] == -signal.SIGKILL
    assert info["epoch"] == KILL_AFTER_EPOCH < MAX_EPOCHS - 1  # really killed mid-way
    run_dir = tmp_path / "killed"
    assert not (run_dir / "metrics.json").exists()  # a killed run leaves no result behind
    csv_before = (run_dir / "csv" / "metrics.csv").read_text()
    # Keep the killed state, so both ways of resuming start from the same point (and the same
    # absolute path, which Lightning's checkpoint callbacks remember).
    shutil.copytree(run_dir, tmp_path / "killed_state", symlinks=True)

    for how in ("resume=true", "ckpt_path=last"):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        shutil.copytree(tmp_path / "killed_state", run_dir, symlinks=True)
        EPOCHS_TRAINED.clear()
        run(
            compose(
                _overrides(
                    tmp_path, "killed", how, "+callbacks.rec._target_=test_resume.EpochRecorder"
                )
            )
        )
        # It continued after the last saved epoch instead of starting again ...
        assert EPOCHS_TRAINED == list(range(KILL_AFTER_EPOCH + 1, MAX_EPOCHS)), (
            how,
            EPOCHS_TRAINED,
        )
        # ... and ended exactly where the uninterrupted run ended.
        for name in ("metrics.json", "predictions.csv"):
            assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), (how, name)
        final = torch.load(
            run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )
        ref_final = torch.load(
            reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )
        assert final["epoch"] == ref_final["epoch"]
        for key, value in ref_final["state_dict"].items():
            assert torch.equal(final["state_dict"][key], value), (how, key)
        # The epochs logged before the kill are kept next to the resumed run's log.
        assert (run_dir / "csv" / "metrics.part1.csv").read_text() == csv_before


def test_resume_flags_resolve_to_last_ckpt(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    cfg = compose(["debug=tiny", f"paths.output_dir={tmp_path}", "resume=true"])
    # resume=true and nothing to resume: start from scratch (re-running a sweep that had jobs
    # that never started).
    assert resolve_ckpt_path(cfg, tmp_path) is None
    # ckpt_path=last insists.
    cfg_last = compose(["debug=tiny", f"paths.output_dir={tmp_path}", "ckpt_path=last"])
    with pytest.raises(UserError, match="nothing to resume"):
        resolve_ckpt_path(cfg_last, tmp_path)
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    assert resolve_ckpt_path(cfg, tmp_path) == str(last)
    assert resolve_ckpt_path(cfg_last, tmp_path) == str(last)
    cfg_path = compose(
        ["debug=tiny", f"paths.output_dir={tmp_path}", f"ckpt_path={tmp_path / 'no.ckpt'}"]
    )
    with pytest.raises(UserError, match="points to no file"):
        resolve_ckpt_path(cfg_path, tmp_path)
