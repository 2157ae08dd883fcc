"""One training job: fit, keep the best validation epoch, test it once, write the run dir.

:func:`train` is the job itself (data module, model, trainer, fit, test; ``RunArtifacts`` writes
the result files). :func:`run` wraps it with the run-dir policy that makes sweeps safe to re-run:
a completed run dir is never replaced silently, a failed job records ``status: failed`` and its
error (and, in a sweep, lets the other jobs go on), and W&B is always closed. The file names and
the ``metrics.json`` contract are ``lung_cls.runs``'s; the door is ``python -m lung_cls.train``.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lung_cls.errors import UserError, close_loggers, expected_cause
from lung_cls.launch import (
    adapt_trainer_cfg,
    ddp_relaunches_script,
    is_multirun,
    train_in_subprocess,
)
from lung_cls.runs import RunFile, Status, read_metrics, run_file, write_metrics
from lung_cls.utils.io import atomic_write_text, to_plain

log = logging.getLogger("lung_cls.train")


# --------------------------------------------------------------------------- building blocks
def _instantiate_list(section: DictConfig | None) -> list[Any]:
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c and "_target_" in c]


def wandb_offline_default(loggers_cfg: DictConfig | None) -> None:
    """`offline: null` -> offline unless W&B credentials are configured on this machine."""
    if (
        not loggers_cfg
        or "wandb" not in loggers_cfg
        or loggers_cfg.wandb.get("offline") is not None
    ):
        return
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        netrc = Path.home() / ".netrc"
        has_key = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    offline = not has_key or os.environ.get("WANDB_MODE") in ("offline", "disabled")
    with open_dict(loggers_cfg):
        loggers_cfg.wandb.offline = offline
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")


def resolve_ckpt_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to continue from: ``resume=true`` / ``ckpt_path=last`` / a path, or None."""
    ckpt = cfg.get("ckpt_path")
    last = run_file(run_dir, RunFile.LAST_CKPT)
    if cfg.get("resume") and not ckpt:
        if last.is_file():
            return str(last)
        # resume=true means "continue what is there": re-running a sweep with it resumes the
        # killed jobs and starts the ones that never got going (ckpt_path=last insists instead).
        log.warning("%s: no last.ckpt to resume from; starting this run from scratch", run_dir)
        return None
    if not ckpt:
        return None
    if str(ckpt) == "last":
        if not last.is_file():
            raise UserError(
                f"{last}: nothing to resume (runs keep a last.ckpt only with resumable=true)"
            )
        return str(last)
    if not Path(str(ckpt)).is_file():
        raise UserError(f"{ckpt}: ckpt_path points to no file")
    return str(ckpt)


def keep_logs_before_resume(run_dir: Path) -> None:
    """Move the CSV metric logs of the interrupted attempt aside before a resume.

    Why: Lightning's CSV logger rewrites ``metrics.csv`` from what it logged itself, so a resumed
    run would otherwise drop the epochs logged before the crash. They stay as ``metrics.partN.csv``.
    """
    for path in sorted(run_dir.rglob("metrics.csv")):
        n = 1
        while path.with_name(f"metrics.part{n}.csv").exists():
            n += 1
        path.rename(path.with_name(f"metrics.part{n}.csv"))
        log.info("Resuming: kept the earlier log %s as %s", path, f"metrics.part{n}.csv")


def _last_checkpoint_callback(run_dir: Path) -> Any:
    """Full state (optimiser included) after every epoch, for ``resumable=true``.

    save_top_k=1 without a monitor keeps the newest epoch under one name; (save_top_k=0,
    save_last=True) would write last.ckpt only when training ends, too late for a crash.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    last = run_file(run_dir, RunFile.LAST_CKPT)
    return ModelCheckpoint(
        dirpath=str(last.parent),
        filename=last.stem,
        monitor=None,
        save_top_k=1,
        save_last=False,
        save_weights_only=False,
        enable_version_counter=False,
    )


def run_info(cfg: DictConfig) -> dict[str, Any]:
    """What ``metrics.json`` says about the job before any result: model, seeds, size, epochs."""
    return {
        "model": str(cfg.model.name),
        "backbone": str(cfg.model.backbone),
        "seed": int(cfg.seed),
        "split_seed": int(cfg.data.split_seed),
        "image_size": int(cfg.data.preprocess.size),
        "max_epochs": int(cfg.trainer.max_epochs),
        "pretrained": bool(cfg.model.pretrained),
    }


def _build_model(cfg: DictConfig) -> Any:
    """The LightningModule, carrying the plain model/data config its checkpoints need."""
    model = hydra.utils.instantiate(cfg.model)
    model.run_meta = {
        "model": to_plain(cfg.model),
        "data": to_plain(cfg.data),
        "seed": int(cfg.seed),
    }
    # Drop the callables (optimizer factories) from the stored model config: plain values only.
    for key in ("optimizer", "scheduler"):
        model.run_meta["model"].pop(key, None)
    return model


# --------------------------------------------------------------------------- the job
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write the run dir. Returns the metrics.json contents."""
    import lightning as L
    import torch

    from lung_cls.data.datamodule import LungScanDataModule
    from lung_cls.evaluation.callbacks import RunArtifacts

    run_dir = Path(cfg.paths.output_dir)
    adapt_trainer_cfg(cfg)
    # `is not None`: seed=0 is a real seed.
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    if cfg.trainer.get("benchmark"):
        torch.backends.cudnn.benchmark = True

    datamodule = LungScanDataModule(cfg.data, cache_dir=cfg.paths.cache_dir, seed=int(cfg.seed))
    model = _build_model(cfg)
    callbacks = _instantiate_list(cfg.get("callbacks"))
    if cfg.get("resumable"):
        callbacks.append(_last_checkpoint_callback(run_dir))
    artifacts = RunArtifacts(
        str(run_dir),
        run_info(cfg),
        cams=bool(cfg.get("cams", True)),
        n_boot=int(cfg.get("n_boot", 2000)),
        temperature_scaling=bool(cfg.get("temperature_scaling", False)),
    )
    callbacks.append(artifacts)
    wandb_offline_default(cfg.get("logger"))
    loggers = _instantiate_list(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    for lg in loggers:
        lg.log_hyperparams(to_plain(cfg))

    ckpt_path = resolve_ckpt_path(cfg, run_dir)
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if trainer.fast_dev_run:
            best = None  # fast_dev_run writes no checkpoints: test the weights in memory
        elif not best:
            raise RuntimeError("no best checkpoint was written (did validation run?)")
        trainer.test(
            model=model,
            datamodule=datamodule,
            ckpt_path=best,
            weights_only=True,
            verbose=bool(cfg.get("verbose", False)),  # the metric table: in metrics.json anyway
        )
    if trainer.is_global_zero and cfg.get("qa_reference", True):
        _attach_qa_reference(trainer, datamodule)
    if trainer.is_global_zero and artifacts.result is None:
        raise RuntimeError("the test finished but the run-dir artefacts were not written")
    return artifacts.result or {}


def _attach_qa_reference(trainer: Any, datamodule: Any) -> None:
    """The QA gate's training-set reference (lung_cls.qa.ood) into the best checkpoint."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file() and not trainer.fast_dev_run:
        from lung_cls.qa.ood import attach_reference

        try:
            attach_reference(best, datamodule)
        except ValueError as err:  # e.g. a validation split too small to calibrate on
            log.warning("No OOD reference stored in %s: %s", best, err)


# --------------------------------------------------------------------------- the run-dir policy
def _previous_result(run_dir: Path) -> dict[str, Any] | None:
    """The run dir's ``metrics.json`` from an earlier attempt; None when there is none (a broken
    one is reported and treated as none: the job runs again)."""
    try:
        return read_metrics(run_dir)
    except ValueError as err:
        log.warning("%s; running the job again", err)
        return None


def _record_failure(cfg: DictConfig, run_dir: Path, err: BaseException) -> BaseException | None:
    """Write ``status: failed | interrupted`` with the error; returns the expected cause, if any.

    The error shown is the expected one (a missing weights file) even when Hydra's ``instantiate``
    wrapped it, so the report names what the user can fix.
    """
    status = Status.INTERRUPTED if isinstance(err, KeyboardInterrupt) else Status.FAILED
    cause = expected_cause(err)
    shown = cause or err
    write_metrics(
        run_dir,
        {
            "status": str(status),
            "error": f"{type(shown).__name__}: {shown}",
            "model": str(cfg.model.get("name")),
            "backbone": str(cfg.model.get("backbone")),
            "seed": cfg.get("seed"),
            "traceback": traceback.format_exc(limit=20),
        },
    )
    return cause


def run(cfg: DictConfig) -> float | None:
    """The job with its run dir guarded; returns ``optimized_metric`` for Hydra's sweepers.

    A completed run dir is skipped (``skip_completed``, or ``resume`` with nothing to resume) or
    refused, unless ``overwrite=true``. A failure is recorded in ``metrics.json``; in a sweep the
    job then returns NaN so the other jobs go on, outside one it raises.
    """
    run_dir = Path(cfg.paths.output_dir)
    metric_name = cfg.get("optimized_metric", "val/acc_best")
    previous = _previous_result(run_dir)
    completed = bool(previous) and previous.get("status") == Status.OK
    if completed and not cfg.get("overwrite"):
        if cfg.get("skip_completed") or (cfg.get("resume") and not cfg.get("ckpt_path")):
            log.info("Skipping %s: already complete", run_dir)
            return previous.get(metric_name)
        raise UserError(
            f"{run_dir}: already holds a completed run; pick another hydra.run.dir, or pass "
            "skip_completed=true (skip it) or overwrite=true (replace it)"
        )
    if previous and not completed:
        log.warning(
            "%s: re-running a run that ended with status %r (%s)",
            run_dir, previous.get("status"), previous.get("error"),
        )  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("resume") or cfg.get("ckpt_path"):
        keep_logs_before_resume(run_dir)
    adapt_trainer_cfg(cfg)
    atomic_write_text(run_file(run_dir, RunFile.CONFIG), OmegaConf.to_yaml(cfg, resolve=True))
    try:
        if is_multirun() and ddp_relaunches_script(cfg.trainer):
            result = train_in_subprocess(run_dir)
        else:
            result = train(cfg)
        return result.get(metric_name)
    except BaseException as err:
        cause = _record_failure(cfg, run_dir, err)
        if is_multirun() and isinstance(err, Exception):
            # Keep the sweep going; the report lists this run as failed.
            kind = "expected" if cause is not None else "unexpected"
            log.error("Run %s failed (%s error): %s", run_dir.name, kind, cause or err)
            if cause is None:
                log.error("%s", traceback.format_exc())
            return math.nan
        raise
    finally:
        close_loggers()


__all__ = [
    "keep_logs_before_resume",
    "resolve_ckpt_path",
    "run",
    "run_info",
    "train",
    "wandb_offline_default",
]
