"""Where a training run's wall time goes: waiting for batches, computing on them, validating, testing.

Why a callback: the data module hands Lightning device-resident batches (no DataLoader workers), and
the claim that data loading then costs almost nothing must be measured inside the real training
loop, not argued. Lightning fetches the next batch (slice + on-device augmentation + transfer)
between one ``on_train_batch_end`` and the next ``on_train_batch_start``, so the gaps between those
hooks are the time the step waited for data; the time inside them is the step's compute (forward,
backward, optimiser). The first gap of an epoch also holds the iterator's creation.

On a GPU the work is asynchronous: without ``sync_cuda`` the gaps measure host time only (which is
what a stall costs when the GPU queue runs dry); with ``sync_cuda=True`` every hook synchronises,
which is exact but slows the run down, so leave it off in real sweeps.

The summary is plain numbers (json-able), written to ``<out>`` (default
``<trainer.default_root_dir>/step_timing.json``) when fitting ends, and kept on ``self.summary``.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lung_cls.runs import RunFile, run_file
from lung_cls.utils.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["StepTimer", "stall_fraction"]


def stall_fraction(data_seconds: float, compute_seconds: float) -> float:
    """Share of the training-step time spent waiting for data: ``data / (data + compute)``."""
    if data_seconds < 0 or compute_seconds < 0:
        raise ValueError(
            f"stall_fraction: times must be >= 0, got data={data_seconds}, compute={compute_seconds}"
        )
    total = data_seconds + compute_seconds
    return data_seconds / total if total > 0 else 0.0


class StepTimer(L.Callback):
    """Per-epoch data-wait vs compute time of the training loop, plus validation/test/fit totals.

    Args:
        out: JSON file for the summary; None = ``<trainer.default_root_dir>/step_timing.json``;
            ``""`` = keep it in memory only (``self.summary``).
        sync_cuda: synchronise the CUDA device at every hook (exact, but perturbs the run).
    """

    def __init__(self, out: str | None = None, sync_cuda: bool = False) -> None:
        self.out = out
        self.sync_cuda = sync_cuda
        self.epochs: list[dict[str, float]] = []
        self.val_seconds: list[float] = []
        self.summary: dict[str, Any] = {}
        self._mark = 0.0
        self._epoch: dict[str, float] = {}
        self._fit_start = 0.0
        self._val_start = 0.0
        self._test_start = 0.0
        self.test_seconds = 0.0

    # ------------------------------------------------------------------ clock
    def _now(self, pl_module: L.LightningModule) -> float:
        if self.sync_cuda and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = self._now(pl_module)
        self.epochs, self.val_seconds = [], []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        t = self._now(pl_module)
        self._mark = t
        self._epoch = {"start": t, "data": 0.0, "compute": 0.0, "batches": 0, "samples": 0}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        t = self._now(pl_module)
        self._epoch["data"] += t - self._mark
        self._mark = t

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        t = self._now(pl_module)
        self._epoch["compute"] += t - self._mark
        self._epoch["batches"] += 1
        if isinstance(batch, list | tuple) and batch and hasattr(batch[0], "shape"):
            self._epoch["samples"] += int(batch[0].shape[0])
        self._mark = t

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        t = self._now(pl_module)
        e = self._epoch
        self.epochs.append(
            {
                "epoch": int(trainer.current_epoch),
                "seconds": t - e["start"],
                "data": e["data"],
                "compute": e["compute"],
                "batches": int(e["batches"]),
                "samples": int(e["samples"]),
            }
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = self._now(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_seconds.append(self._now(pl_module) - self._val_start)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_seconds = self._now(pl_module) - self._fit_start
        self.summary = self.summarise(fit_seconds)
        self._write(trainer)

    # ------------------------------------------------------------------ test
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_start = self._now(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_seconds = self._now(pl_module) - self._test_start
        if self.summary:
            self.summary["test_seconds"] = round(self.test_seconds, 4)
            self._write(trainer)

    # ------------------------------------------------------------------ summary
    def summarise(self, fit_seconds: float | None = None) -> dict[str, Any]:
        """Totals and medians; the first epoch is reported apart (warm-up, cudnn autotuning)."""
        later = self.epochs[1:] or self.epochs
        data = sum(e["data"] for e in self.epochs)
        compute = sum(e["compute"] for e in self.epochs)
        later_data = sum(e["data"] for e in later)
        later_compute = sum(e["compute"] for e in later)
        samples = sum(e["samples"] for e in later)
        train_seconds = sum(e["seconds"] for e in later)
        out: dict[str, Any] = {
            "epochs": len(self.epochs),
            "train_seconds": round(sum(e["seconds"] for e in self.epochs), 4),
            "data_seconds": round(data, 4),
            "compute_seconds": round(compute, 4),
            "stall_fraction": round(stall_fraction(data, compute), 5),
            "stall_fraction_after_first_epoch": round(stall_fraction(later_data, later_compute), 5),
            "first_epoch_seconds": round(self.epochs[0]["seconds"], 4) if self.epochs else None,
            "median_epoch_seconds": (
                round(statistics.median(e["seconds"] for e in later), 4) if later else None
            ),
            "train_images_per_second": round(samples / train_seconds, 2) if train_seconds else None,
            "val_seconds": round(sum(self.val_seconds), 4),
            "median_val_seconds": (
                round(statistics.median(self.val_seconds), 4) if self.val_seconds else None
            ),
            "test_seconds": round(self.test_seconds, 4) if self.test_seconds else None,
        }
        if fit_seconds is not None:
            out["fit_seconds"] = round(fit_seconds, 4)
        return out

    def _write(self, trainer: L.Trainer) -> None:
        if self.out == "" or not trainer.is_global_zero:
            return
        default = run_file(trainer.default_root_dir, RunFile.STEP_TIMING)
        path = Path(self.out) if self.out else default
        try:
            atomic_write_json(path, {**self.summary, "per_epoch": self.epochs})
        except OSError as err:  # timing is diagnostics: never fail a run over it
            log.warning("Could not write %s: %s", path, err)
