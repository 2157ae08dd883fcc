"""Hydra callback: build the sweep report when a multirun ends.

Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``. Why a callback rather than a
step in ``train.py``: only Hydra knows when the *last* job of a sweep has finished (with any
launcher: local, joblib or SLURM via submitit), and the report needs all of them. The report must
never turn a finished sweep into a failed one, so every error is logged, not raised.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ReportOnMultirunEnd(Callback):
    """Run :func:`lung_cls.report.build_report` on ``hydra.sweep.dir`` after the last job.

    Args:
        enabled: set ``+hydra.callbacks.report.enabled=false`` to skip the report.
        n_boot: bootstrap resamples; None = the sweep config's ``n_boot`` (else 2000).
        n_perm, seed, log_wandb: passed to :func:`~lung_cls.report.build_report`.
    """

    def __init__(
        self,
        enabled: bool = True,
        n_boot: int | None = None,
        n_perm: int = 1000,
        seed: int = 0,
        log_wandb: bool | None = None,
        fail_on_failed_runs: bool = True,
    ) -> None:
        self.enabled = enabled
        self.fail_on_failed_runs = fail_on_failed_runs
        self.n_boot = n_boot
        self.n_perm = n_perm
        self.seed = seed
        self.log_wandb = log_wandb

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            sweep_dir = config.hydra.sweep.dir
            from lung_cls.report import build_report

            n_boot = self.n_boot if self.n_boot is not None else int(config.get("n_boot", 2000))
            out = build_report(
                sweep_dir,
                n_boot=n_boot,
                n_perm=self.n_perm,
                seed=self.seed,
                log_wandb=self.log_wandb,
            )
            log.info("Sweep report: %s", out / "report.html")
        except Exception:  # noqa: BLE001 - the report must never crash the sweep
            log.exception("Could not build the sweep report (the sweep itself is unaffected)")
        self._exit_status(config)

    def _exit_status(self, config: DictConfig) -> None:
        """Exit 1 after the report when any job did not finish, so scripts notice; every result
        is kept. A job dir without ``metrics.json`` (killed, or it never started) counts too."""
        if not self.fail_on_failed_runs:
            return
        import sys

        from lung_cls.errors import EXIT_PROBLEMS
        from lung_cls.runs import Status, find_run_dirs, run_status

        sweep_dir = str(config.hydra.sweep.dir)
        bad = []
        for run_dir in find_run_dirs(sweep_dir):
            status = run_status(run_dir)
            if status != Status.OK:
                bad.append(f"{run_dir.relative_to(sweep_dir)} ({status})")
        if bad:
            log.error("%d job(s) of the sweep did not finish: %s", len(bad), ", ".join(bad))
            sys.exit(EXIT_PROBLEMS)
