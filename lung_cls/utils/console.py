"""The console a user reads: each log record once, library chatter off unless ``verbose=true``.

What a training job printed before (issue 18): every Lightning INFO line twice (Lightning's own
handler and Hydra's), the ``srun`` hint and the "litlogger" tip per job, a model summary and a
test-metric table per job, W&B's banner per run, and a deprecation warning from inside Lightning.
None of it is something the user can act on; the full log in the run dir (``<task>.log``, Hydra's
file handler) still holds every record, so nothing is lost, only kept off the console.

:func:`quiet_console` does it in the process that runs the job (a joblib or SLURM worker is its own
process); :class:`ConsoleCallback` (a Hydra callback, ``conf/hydra/default.yaml``) calls it at the
start of every job and says "job k of n started/finished" in a sweep.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lung_cls.train")

_LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")

# Warnings that say nothing the user of this project can act on, filtered by their exact text.
POINTLESS_WARNINGS = (
    # Lightning sees an `srun` binary and suggests prefixing the command with it; this project's
    # SLURM launcher starts the tasks itself, and a local run must not use srun.
    r"The `srun` command is available on your system but is not used",
    # Raised inside Lightning's own _pytree helper with recent torch; nothing to change here.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _QuietLibraries(logging.Filter):
    """Console only: Lightning's INFO records (seed set, GPU/TPU available, tips) stay in the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(_LIBRARY_LOGGERS)


class _DropRepeats(logging.Filter):
    """Console only: an INFO record whose text this process already showed is not shown again.

    A job sets its data up for fitting and again for testing, and a worker process runs several
    jobs: "Prepared data loaded from cache ... (530 images)" would be printed once per setup.
    Warnings and errors are always shown.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def _console_handlers() -> list[logging.Handler]:
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


def one_handler_per_record() -> None:
    """Lightning adds its own console handler at import; where the root logger has handlers
    (Hydra's console + file), drop Lightning's so each record is printed once and also reaches
    the run's log file."""
    if not logging.getLogger().handlers:
        return
    import lightning  # noqa: F401 - its import adds the handler that is removed here

    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def filter_pointless_warnings() -> None:
    for pattern in POINTLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def quiet_console(verbose: bool = False) -> None:
    """Set up this process's console for a training job; idempotent."""
    one_handler_per_record()
    if verbose:
        return
    filter_pointless_warnings()
    for handler in _console_handlers():
        for kind in (_QuietLibraries, _DropRepeats):
            if not any(isinstance(f, kind) for f in handler.filters):
                handler.addFilter(kind())
    # W&B's banner ("Tracking run...", "Run data is saved locally...", "wandb sync ...") per run.
    # Only offline: an online run's URL is worth a line.
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        os.environ.setdefault("WANDB_SILENT", "true")


def wandb_is_offline() -> bool:
    """Whether W&B will run offline here: asked to, or no credentials (``WANDB_API_KEY`` or a
    ``wandb login`` entry in ``~/.netrc``), the rule of ``conf/logger/wandb.yaml``'s ``offline``."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    try:
        return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
    except OSError:
        return True


# --------------------------------------------------------------------------- sweep job counter
_N_JOBS_ENV = "LUNG_CLS_SWEEP_JOBS"


def count_sweep_jobs(config: DictConfig) -> int | None:
    """How many jobs the basic sweeper will launch for this multirun config; None if unknown.

    The command line's sweeps (``model=a,b seed=0,1``) and ``hydra.sweeper.params`` (the
    experiment configs' sweeps) multiply, as in Hydra's basic sweeper; a key on the command line
    replaces the same key in the params.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        args = [f"{k}={v}" for k, v in params.items()]
        args += list(OmegaConf.select(config, "hydra.overrides.task") or [])
        by_key: dict[str, int] = {}
        for override in OverridesParser.create().parse_overrides(args):
            if override.is_sweep_override():
                by_key[override.get_key_element()] = len(list(override.sweep_string_iterator()))
            else:
                by_key[override.get_key_element()] = 1
    except Exception:  # noqa: BLE001 - an interval() or glob sweep: no count, no "of n"
        return None
    n = 1
    for count in by_key.values():
        n *= count
    return n


def _job_label(config: DictConfig) -> str:
    from lung_cls.utils.hydra import sweep_subdir

    return sweep_subdir(OmegaConf.select(config, "hydra.overrides.task"))


def _job_number(config: DictConfig) -> str:
    num = OmegaConf.select(config, "hydra.job.num")
    total = os.environ.get(_N_JOBS_ENV)
    k = int(num) + 1 if num is not None else "?"
    return f"job {k} of {total}" if total else f"job {k}"


def _minutes(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class ConsoleCallback(Callback):
    """Hydra callback: a quiet console in every job's process; "job k of n" lines in a sweep.

    ``on_multirun_start`` runs in the launching process, before any worker exists, so the job
    count it leaves in the environment reaches joblib's and submitit's workers.
    """

    def __init__(self) -> None:
        self._started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        n = count_sweep_jobs(config)
        if n is not None:
            os.environ[_N_JOBS_ENV] = str(n)
        # The sweep report logs to W&B from this process; offline, its banner is noise too.
        if not OmegaConf.select(config, "verbose", default=False) and wandb_is_offline():
            os.environ.setdefault("WANDB_SILENT", "true")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        quiet_console(bool(OmegaConf.select(config, "verbose", default=False)))
        self._started = time.monotonic()
        if _is_multirun(config):
            log.info("%s started: %s", _job_number(config), _job_label(config))

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        value = getattr(job_return, "_return_value", None)
        status = getattr(getattr(job_return, "status", None), "name", "")
        failed = status == "FAILED" or (isinstance(value, float) and value != value)
        outcome = "failed" if failed else "finished"
        metric = OmegaConf.select(config, "optimized_metric", default="val/acc_best")
        extra = f", {metric} {value:.3f}" if isinstance(value, float) and not failed else ""
        log.info(
            "%s %s: %s (%s%s)",
            _job_number(config),
            outcome,
            _job_label(config),
            _minutes(time.monotonic() - self._started),
            extra,
        )


def _is_multirun(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.mode", default="")) in (
        "MULTIRUN",
        "RunMode.MULTIRUN",
    )


__all__ = [
    "POINTLESS_WARNINGS",
    "ConsoleCallback",
    "count_sweep_jobs",
    "filter_pointless_warnings",
    "one_handler_per_record",
    "quiet_console",
]
