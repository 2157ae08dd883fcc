"""A callback for test_resume's killed run, in a module of its own: the run is a subprocess that
imports it by name, and must not need the test suite's conftest to do so."""

from __future__ import annotations

import time

import lightning as L

KILL_AFTER_EPOCH = 1  # the last.ckpt of this epoch exists when the run is killed


class SlowAfterEpoch(L.Callback):
    """Sleeps at the start of the later epochs, so a test can kill the run between epochs
    reliably on a loaded machine. Changes nothing in the numbers (no randomness, no state)."""

    def __init__(self, from_epoch: int = KILL_AFTER_EPOCH + 1, seconds: float = 300.0) -> None:
        self.from_epoch, self.seconds = from_epoch, seconds

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.from_epoch:
            time.sleep(self.seconds)
