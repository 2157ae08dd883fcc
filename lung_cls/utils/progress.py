"""Progress a user can see: a rich bar on a terminal, one line per epoch everywhere else.

A sweep's jobs run in worker processes (joblib, SLURM) whose output is a pipe or a log file, where a
progress bar either draws nothing or floods the file with redraws; the demo turns the bar off for
that reason and then printed nothing for minutes. :class:`EpochLine` prints one line per epoch when
no bar is drawn (not a terminal, or the bar is off):

    [model=resnet18,seed=0] epoch 3/6  train loss 0.412  val acc 0.875  41 s/epoch  ETA 2 min 03 s

:class:`TerminalRichProgressBar` is Lightning's rich bar that stands aside when stdout is not a
terminal, so the two never both print.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from lightning.pytorch.callbacks import Callback, RichProgressBar

log = logging.getLogger("lung_cls.progress")


def stdout_is_terminal() -> bool:
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _metric(trainer: Any, *names: str) -> float | None:
    for name in names:
        value = trainer.callback_metrics.get(name)
        if value is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
    return None


def _job_name() -> str:
    """The sweep job's run-dir name (``model=resnet18,seed=0``); "" outside a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig

        from lung_cls.utils.hydra import sweep_subdir

        cfg = HydraConfig.get()
        if str(cfg.mode).endswith("MULTIRUN"):
            return sweep_subdir(cfg.overrides.task)
    except Exception:  # noqa: BLE001 - not under Hydra (called from Python)
        pass
    return ""


def epoch_line(
    job: str,
    epoch: int,
    max_epochs: int,
    train_loss: float | None,
    val_acc: float | None,
    seconds_per_epoch: float,
) -> str:
    """One epoch's progress line; ``epoch`` counts from 1."""
    parts = [f"[{job}] epoch {epoch}/{max_epochs}" if max_epochs > 0 else f"[{job}] epoch {epoch}"]
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.3f}")
    if val_acc is not None:
        parts.append(f"val acc {val_acc:.3f}")
    parts.append(f"{_duration(seconds_per_epoch)}/epoch")
    if max_epochs > 0:
        parts.append(f"ETA {_duration(seconds_per_epoch * max(0, max_epochs - epoch))}")
    return "  ".join(parts)


class EpochLine(Callback):
    """One log line per training epoch when no progress bar is drawn.

    Args:
        always: print the line even when a rich bar is drawn on a terminal.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always
        self._fit_start = 0.0
        self._first_epoch = 0
        self._job = "run"

    def _active(self, trainer: Any) -> bool:
        if not trainer.is_global_zero:
            return False
        if self.always:
            return True
        bar = trainer.progress_bar_callback
        return bar is None or not bar.is_enabled or not stdout_is_terminal()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_start = time.monotonic()
        self._first_epoch = int(trainer.current_epoch)  # > 0 when resumed
        self._job = _job_name() or str(getattr(pl_module, "hparams", {}).get("name") or "run")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self._active(trainer):
            return
        done = int(trainer.current_epoch) + 1  # epochs finished, resumed ones included
        per_epoch = (time.monotonic() - self._fit_start) / max(1, done - self._first_epoch)
        log.info(
            epoch_line(
                self._job,
                done,
                int(trainer.max_epochs or -1),
                _metric(trainer, "train/loss_epoch", "train/loss"),
                _metric(trainer, "val/acc"),
                per_epoch,
            )
        )


class TerminalRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, drawn only when stdout is a terminal (else EpochLine speaks)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not stdout_is_terminal():
            self.disable()
        super().setup(trainer, pl_module, stage)


__all__ = ["EpochLine", "TerminalRichProgressBar", "epoch_line", "stdout_is_terminal"]
