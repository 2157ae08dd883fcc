"""Where and how a training job runs: launcher plugins, DDP inside a sweep, machine limits.

The training itself (``lung_cls.training``) does not care whether it runs alone, as one job of a
joblib or SLURM sweep, or as rank 0 of a DDP group. Three things do, and they live here:

- a launcher picked on the command line whose Hydra plugin is not installed (checked before Hydra
  composes the config, whose own message would not say what to install);
- Lightning's DDP starts ranks 1..N-1 by re-running rank 0's command line, which a sweep job does
  not have: such a job runs as a single-run subprocess of itself;
- settings that cannot work on this machine (SyncBatchNorm on CPU) are turned off with a warning.

See docs/cluster.md for the launchers and what stays identical under DDP.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lung_cls.errors import UserError
from lung_cls.runs import Status, read_metrics

log = logging.getLogger("lung_cls.train")

# Launchers that come from optional extras: config name -> (plugin module, extra to install).
_PLUGIN_LAUNCHERS = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "parallel"),
}

# Strategies with which Lightning starts ranks 1..N-1 by re-running the command line of rank 0.
_SCRIPT_DDP = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


# --------------------------------------------------------------------------- launcher plugins
def missing_launcher_plugin(argv: list[str]) -> str | None:
    """The error to show when the command line picks a launcher whose plugin is not installed.

    Why here: without the plugin Hydra fails while composing the config, with a message about a
    missing config option that does not say which package to install.
    """
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


def require_launcher_plugin(argv: list[str]) -> None:
    """Raise :class:`UserError` (exit 2 through the task wrapper) for a missing launcher plugin."""
    if (problem := missing_launcher_plugin(argv)) is not None:
        raise UserError(problem)


# --------------------------------------------------------------------------- DDP in a sweep
def is_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun (False when called from Python)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not under Hydra (called from Python)
        return False


def device_count(devices: Any) -> int | None:
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


def ddp_relaunches_script(trainer_cfg: DictConfig) -> bool:
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
    n_devices = device_count(trainer_cfg.get("devices", 1))
    return n_devices != 1 or int(trainer_cfg.get("num_nodes", 1)) != 1


def _hydra_quote(value: str) -> str:
    """A value as a quoted Hydra override string (sweep dirs hold ``=`` and ``,``)."""
    return "'" + value.replace("'", "\\'") + "'"


def train_in_subprocess(run_dir: Path) -> dict[str, Any]:
    """Run this sweep job as a single-run command line in its own run dir and read its result.

    Why: Lightning's DDP starts ranks 1..N-1 by re-running rank 0's command line, and a sweep job
    has none of its own. ``python -m lung_cls.train <this job's overrides> hydra.run.dir=<run dir>``
    is a single run, whose DDP launch Lightning handles; it writes the same run dir.
    """
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
    try:
        result = read_metrics(run_dir)
    except ValueError as err:  # a broken metrics.json: the subprocess did not finish writing it
        result = {"error": str(err)}
    if proc.returncode != 0 or not result or result.get("status") != Status.OK:
        reason = (result or {}).get("error") or f"exit code {proc.returncode}"
        raise RuntimeError(f"the DDP run (a subprocess of this sweep job) failed: {reason}")
    return result


# --------------------------------------------------------------------------- machine limits
def runs_on_cpu(trainer_cfg: DictConfig) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    return not torch.cuda.is_available()


def adapt_trainer_cfg(cfg: DictConfig) -> None:
    """Settings that cannot work on this machine, turned off with a warning rather than a crash.

    PyTorch's SyncBatchNorm has no CPU kernel, so ``trainer=ddp trainer.accelerator=cpu`` (gloo)
    keeps BatchNorm statistics per process; see docs/cluster.md for what stays identical then.
    """
    if cfg.trainer.get("sync_batchnorm") and runs_on_cpu(cfg.trainer):
        if os.environ.get("LOCAL_RANK", "0") == "0":  # say it once, not once per DDP process
            log.warning(
                "trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm has no CPU "
                "kernel); turned off: on CPU each DDP process normalises with its own batch "
                "statistics"
            )
        with open_dict(cfg.trainer):
            cfg.trainer.sync_batchnorm = False


__all__ = [
    "adapt_trainer_cfg",
    "ddp_relaunches_script",
    "device_count",
    "is_multirun",
    "missing_launcher_plugin",
    "require_launcher_plugin",
    "runs_on_cpu",
    "train_in_subprocess",
]
