"""Train one model, keep its best validation epoch, test it once, write the run dir.

    python -m lung_cls.train                                   # one run, paper settings
    python -m lung_cls.train -m model=vgg16,resnet18,inception_resnet_v2,seresnext101 seed=0,1,2,3,4
    python -m lung_cls.train -m experiment=demo                # the CPU-sized demo (make demo)
    python -m lung_cls.train --cfg job                         # the whole resolved config

In a multirun a failing job writes ``metrics.json`` with ``status: failed`` and its error, and the
sweep goes on; the report lists the failure.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lung_cls.utils.hydra import (
    UserError,
    clean_errors,
    quote_path_overrides,
    to_container,
    unwrap_expected,
)
from lung_cls.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("lung_cls.train")


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not under Hydra (called from Python)
        return False


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _instantiate_list(section: DictConfig | None) -> list[Any]:
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c and "_target_" in c]


def _wandb_offline_default(loggers_cfg: DictConfig | None) -> None:
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


def open_dict(cfg: DictConfig):
    from omegaconf import open_dict as _open_dict

    return _open_dict(cfg)


def _resolve_ckpt_path(cfg: DictConfig, run_dir: Path) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if cfg.get("resume") and not ckpt:
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        # resume=true means "continue what is there": re-running a sweep with it resumes the
        # killed jobs and starts the ones that never got going (ckpt_path=last insists instead).
        log.warning("%s: no last.ckpt to resume from; starting this run from scratch", run_dir)
        return None
    if not ckpt:
        return None
    if str(ckpt) == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise UserError(
                f"{last}: nothing to resume (runs keep a last.ckpt only with resumable=true)"
            )
        return str(last)
    if not Path(str(ckpt)).is_file():
        raise UserError(f"{ckpt}: ckpt_path points to no file")
    return str(ckpt)


# Strategies with which Lightning starts ranks 1..N-1 by re-running the command line of rank 0.
_SCRIPT_DDP = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def _device_count(devices: Any) -> int | None:
    """Devices per node as Lightning reads ``trainer.devices``; None where the machine decides."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices >= 0 else None
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([p for p in text.split(",") if p.strip()])
    try:
        n = int(text)
    except ValueError:  # "auto"
        return None
    return n if n >= 0 else None


def _ddp_relaunches_script(trainer_cfg: DictConfig) -> bool:
    """Whether Lightning would start the other DDP ranks by re-running this command line.

    It does so for ``strategy=ddp`` unless a scheduler already started one process per device
    (SLURM with ``tasks_per_node`` = devices, torchrun, LSF). That works for a single run (Lightning
    hands rank 0's run dir to the others) but not inside a sweep job, whose process is the sweep's
    own (or a joblib/submitit worker). When the answer is unsure, say yes: running the job as a
    single-run subprocess is always correct.
    """
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, str):
        if strategy not in _SCRIPT_DDP:
            return False
    elif not (
        OmegaConf.is_dict(strategy)
        and str(strategy.get("_target_", "")).endswith("DDPStrategy")
        and strategy.get("start_method", "popen") == "popen"
    ):
        return False
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    if "LOCAL_RANK" in os.environ or any(
        env.detect() for env in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment)
    ):
        return False
    n_devices = _device_count(trainer_cfg.get("devices", 1))
    return n_devices != 1 or int(trainer_cfg.get("num_nodes", 1)) != 1


def _runs_on_cpu(trainer_cfg: DictConfig) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    return not torch.cuda.is_available()


def _adapt_trainer_cfg(cfg: DictConfig) -> None:
    """Settings that cannot work on this machine, turned off with a warning rather than a crash.

    PyTorch's SyncBatchNorm has no CPU kernel, so ``trainer=ddp trainer.accelerator=cpu`` (gloo)
    keeps BatchNorm statistics per process; see docs/cluster.md for what stays identical then.
    """
    if cfg.trainer.get("sync_batchnorm") and _runs_on_cpu(cfg.trainer):
        if os.environ.get("LOCAL_RANK", "0") == "0":  # say it once, not once per DDP process
            log.warning(
                "trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm has no CPU "
                "kernel); turned off: on CPU each DDP process normalises with its own batch "
                "statistics"
            )
        with open_dict(cfg.trainer):
            cfg.trainer.sync_batchnorm = False


def _hydra_quote(value: str) -> str:
    """A value as a quoted Hydra override string (sweep dirs hold ``=`` and ``,``)."""
    return "'" + value.replace("'", "\\'") + "'"


def _train_in_subprocess(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run this sweep job as a single-run command line in its own run dir and read its result.

    Why: Lightning's DDP starts ranks 1..N-1 by re-running rank 0's command line, and a sweep job
    has none of its own. ``python -m lung_cls.train <this job's overrides> hydra.run.dir=<run dir>``
    is a single run, whose DDP launch Lightning handles; it writes the same run dir.
    """
    import subprocess

    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    cmd = [
        sys.executable,
        "-m",
        "lung_cls.train",
        *hydra_cfg.overrides.task,
        f"hydra.run.dir={_hydra_quote(str(run_dir))}",
        "hydra.output_subdir=null",  # the sweep job already wrote <run_dir>/.hydra
    ]
    log.info("DDP in a sweep job: running it as a single run: %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=hydra_cfg.runtime.cwd, check=False)
    result = _read_metrics(run_dir)
    if proc.returncode != 0 or not result or result.get("status") != "ok":
        reason = (result or {}).get("error") or f"exit code {proc.returncode}"
        raise RuntimeError(f"the DDP run (a subprocess of this sweep job) failed: {reason}")
    return result


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write the run dir. Returns the metrics.json contents."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lung_cls.data.datamodule import LungScanDataModule
    from lung_cls.evaluation.callbacks import RunArtifacts

    run_dir = Path(cfg.paths.output_dir)
    _adapt_trainer_cfg(cfg)
    # `is not None`: seed=0 is a real seed.
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    if cfg.trainer.get("benchmark"):
        torch.backends.cudnn.benchmark = True

    datamodule = LungScanDataModule(cfg.data, cache_dir=cfg.paths.cache_dir, seed=int(cfg.seed))
    model = hydra.utils.instantiate(cfg.model)
    model.run_meta = {
        "model": to_container(cfg.model),
        "data": to_container(cfg.data),
        "seed": int(cfg.seed),
    }
    # Drop the callables (optimizer factories) from the stored model config: plain values only.
    for key in ("optimizer", "scheduler"):
        model.run_meta["model"].pop(key, None)

    run_info = {
        "model": str(cfg.model.name),
        "backbone": str(cfg.model.backbone),
        "seed": int(cfg.seed),
        "split_seed": int(cfg.data.split_seed),
        "image_size": int(cfg.data.preprocess.size),
        "max_epochs": int(cfg.trainer.max_epochs),
        "pretrained": bool(cfg.model.pretrained),
    }
    callbacks = _instantiate_list(cfg.get("callbacks"))
    if cfg.get("resumable"):
        # Full state (optimiser included) after every epoch, only when resuming is asked for.
        # save_top_k=1 without a monitor keeps the newest epoch under one name; (save_top_k=0,
        # save_last=True) would write last.ckpt only when training ends, too late for a crash.
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(run_dir / "checkpoints"),
                filename="last",
                monitor=None,
                save_top_k=1,
                save_last=False,
                save_weights_only=False,
                enable_version_counter=False,
            )
        )
    artifacts = RunArtifacts(
        str(run_dir),
        run_info,
        cams=bool(cfg.get("cams", True)),
        n_boot=int(cfg.get("n_boot", 2000)),
    )
    callbacks.append(artifacts)
    _wandb_offline_default(cfg.get("logger"))
    loggers = _instantiate_list(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    if loggers:
        for lg in loggers:
            lg.log_hyperparams(to_container(cfg))

    ckpt_path = _resolve_ckpt_path(cfg, run_dir)
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if trainer.fast_dev_run:
            best = None  # fast_dev_run writes no checkpoints: test the weights in memory
        elif not best:
            raise RuntimeError("no best checkpoint was written (did validation run?)")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best, weights_only=True)
    if trainer.is_global_zero and artifacts.result is None:
        raise RuntimeError("the test finished but the run-dir artefacts were not written")
    return artifacts.result or {}


def _finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception:  # noqa: BLE001 - closing the logger must never mask the real outcome
        log.debug("wandb.finish failed", exc_info=True)


def _keep_logs_before_resume(run_dir: Path) -> None:
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


def run(cfg: DictConfig) -> float | None:
    """Task wrapper: guards the run dir, records failures, always closes W&B."""
    run_dir = Path(cfg.paths.output_dir)
    metric_name = cfg.get("optimized_metric", "val/acc_best")
    previous = _read_metrics(run_dir)
    completed = bool(previous) and previous.get("status") == "ok"
    if completed and not cfg.get("overwrite"):
        # A finished run is never replaced silently: skip it (skip_completed, or resume=true with
        # nothing left to resume) or refuse; only overwrite=true replaces it.
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
        _keep_logs_before_resume(run_dir)
    _adapt_trainer_cfg(cfg)
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        if _is_multirun() and _ddp_relaunches_script(cfg.trainer):
            result = _train_in_subprocess(cfg, run_dir)
        else:
            result = train(cfg)
        return result.get(metric_name)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        cause = unwrap_expected(err)  # an expected error, also inside Hydra's instantiate wrapper
        shown = cause or err
        atomic_write_json(
            run_dir / "metrics.json",
            {
                "status": status,
                "error": f"{type(shown).__name__}: {shown}",
                "model": str(cfg.model.get("name")),
                "backbone": str(cfg.model.get("backbone")),
                "seed": cfg.get("seed"),
                "traceback": traceback.format_exc(limit=20),
            },
        )
        if _is_multirun() and isinstance(err, Exception):
            # Keep the sweep going; the report lists this run as failed.
            kind = "expected" if cause is not None else "unexpected"
            log.error("Run %s failed (%s error): %s", run_dir.name, kind, shown)
            if kind == "unexpected":
                log.error("%s", traceback.format_exc())
            return math.nan
        raise
    finally:
        _finish_wandb()


# Launchers that come from optional extras: config name -> (plugin module, extra to install).
_PLUGIN_LAUNCHERS = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "parallel"),
}


def missing_launcher_plugin(argv: list[str]) -> str | None:
    """The error to show when the command line picks a launcher whose plugin is not installed.

    Why here: without the plugin Hydra fails while composing the config, with a message about a
    missing config option that does not say which package to install.
    """
    import importlib

    key = "hydra/launcher"
    chosen = [a for a in argv if a.split("=", 1)[0].lstrip("+~").removeprefix("override ") == key]
    if not chosen:
        return None
    name = chosen[-1].split("=", 1)[-1].strip()
    if name not in _PLUGIN_LAUNCHERS:
        return None
    module, extra = _PLUGIN_LAUNCHERS[name]
    try:
        importlib.import_module(module)
        if extra == "slurm":
            importlib.import_module("submitit")
    except ImportError as err:
        return (
            f"{key}={name} needs a Hydra launcher plugin that is not installed ({err}); "
            f'install it with: pip install -e ".[{extra}]"'
        )
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@clean_errors
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])
    if (problem := missing_launcher_plugin(sys.argv[1:])) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
