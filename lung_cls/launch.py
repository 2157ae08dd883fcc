"""Where and how a training job runs: launcher plugins, DDP inside a sweep, machine limits.

The training itself (``lung_cls.training``) does not care whether it runs alone, as one job of a
joblib or SLURM sweep, or as rank 0 of a DDP group. Three things do, and they live here:

- a launcher picked on the command line whose Hydra plugin is not installed (checked before Hydra
  composes the config, whose own message would not say what to install);
- Lightning's DDP starts ranks 1..N-1 by re-running rank 0's command line, which a sweep job does
  not have: such a job runs as a single-run subprocess of itself;
- settings that cannot work on this machine (SyncBatchNorm on CPU) are turned off with a warning;
- on SLURM (and submitit's local executor), a job that the scheduler kills leaves no result: the
  launchers here record it as failed in its run dir, so the sweep still ends with its report.

See docs/cluster.md for the launchers and what stays identical under DDP.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lung_cls.errors import UserError
from lung_cls.runs import Status, is_complete, read_metrics, run_status, write_metrics

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


# --------------------------------------------------------------------------- SLURM resources
def _on_gpu(accelerator: Any) -> bool:
    """Whether ``trainer.accelerator`` runs on GPUs; "auto" counts (a GPU cluster's usual case),
    "cpu" does not."""
    return str(accelerator).lower() not in ("cpu",)


def slurm_gpus(accelerator: Any, devices: Any) -> int | None:
    """GPUs per node for a SLURM job: ``trainer.devices`` on GPUs, none (no --gpus at all) on CPU.

    Why: a cluster without GPUs refuses any GPU request ("Invalid generic resource"), and
    ``trainer=cpu`` still says ``devices: 1``. Where the count is left to the machine ("auto"), one.
    """
    if not _on_gpu(accelerator):
        return None
    n = device_count(devices)
    return 1 if n is None or n == 0 else n


def slurm_tasks(devices: Any) -> int:
    """Tasks per node: one per device (Lightning's SLURM DDP), at least one."""
    return device_count(devices) or 1


def slurm_cpus(accelerator: Any, per_gpu_job: Any) -> int | None:
    """CPUs per task: ``per_gpu_job`` for a GPU job, the cluster's default (None) for a CPU job,
    whose node may have fewer cores than a GPU node."""
    return int(per_gpu_job) if _on_gpu(accelerator) else None


def register_resolvers() -> None:
    """The resolvers ``conf/hydra/launcher/slurm.yaml`` uses (registered when this module loads)."""
    for name, fn in (
        ("lung_cls.slurm_gpus", slurm_gpus),
        ("lung_cls.slurm_tasks", slurm_tasks),
        ("lung_cls.slurm_cpus", slurm_cpus),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


# --------------------------------------------------------------------------- submitit launchers
#: SLURM states of a job that is not over yet (sacct/squeue); any other state means it ended.
SLURM_NOT_OVER = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "PREEMPTED",
}  # fmt: skip


def slurm_queue_state(job_id: str) -> str | None:
    """The job's state as slurmctld holds it (``squeue -t all``), None when it no longer knows it.

    Why: without accounting sacct knows no job, but slurmctld keeps an ended one for MinJobAge."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    states = [line.strip() for line in out.splitlines() if line.strip()]
    return states[0] if states else None


def slurm_accounting(job_id: str) -> tuple[bool, str]:
    """Whether ``sacct`` answers on this cluster (SLURM accounting is on), and if not, why."""
    try:
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-j", job_id, "-o", "State"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"sacct: {err}"
    if proc.returncode != 0:
        return False, f"sacct: {proc.stderr.strip()[:200] or f'exit code {proc.returncode}'}"
    return True, ""


class RecordingLauncher:
    """What both submitit launchers add: every job's result is collected on its own.

    Hydra's submitit launcher waits for the jobs one after the other and raises at the first one
    without a result, so one job that the scheduler killed loses the report, and (without SLURM
    accounting) may be waited for forever. Here a job without a result is recorded as failed in
    its run dir, with the scheduler's reason; the others are kept; the sweep ends as one with a
    failed job does: report, then exit 1. With ``skip_completed=true`` a job whose run dir is
    complete is not submitted at all.
    """

    _EXECUTOR = "abstract"

    def __init__(self, poll_s: float = 10.0, unknown_wait_s: float = 120.0, **params: Any) -> None:
        self.poll_s = float(poll_s)
        self.unknown_wait_s = float(unknown_wait_s)
        super().__init__(**params)  # type: ignore[call-arg]

    # ----------------------------------------------------------------- submit
    def _executor(self) -> Any:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        params = dict(self.params)  # type: ignore[attr-defined]
        folder = params.pop("submitit_folder")
        init = {}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{(k if k in shared else f"{self._EXECUTOR}_{k}"): v for k, v in params.items()}
        )
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        config = self.config  # type: ignore[attr-defined]
        assert config is not None and len(job_overrides) > 0
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
        log.info("Submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)

        results: list[Any] = [None] * len(job_overrides)
        jobs: dict[int, Any] = {}
        to_submit: list[tuple[int, tuple]] = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            done = self._skipped(list(overrides))
            if done is not None:
                results[i] = done
                continue
            args = (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}")
            to_submit.append((i, (*args, Singleton.get_state())))
        if to_submit:
            submitted = self._executor().map_array(
                self, *zip(*(a for _, a in to_submit), strict=True)
            )
            jobs = {i: job for (i, _), job in zip(to_submit, submitted, strict=True)}
            for i, job in jobs.items():
                log.info("\t#%d : job %s", initial_job_idx + i, job.job_id)
        self._collect(jobs, job_overrides, results)
        return results

    # ----------------------------------------------------------------- per job
    def _sweep_config(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)  # type: ignore[attr-defined]

    @staticmethod
    def _run_dir(sweep_config: DictConfig) -> Path:
        """The job's run dir, as Hydra's run_job will name it (sweep dir / subdir)."""
        hydra_cfg = sweep_config.hydra
        return Path(str(hydra_cfg.sweep.dir)) / str(hydra_cfg.sweep.subdir)

    def _job_return(self, sweep_config: DictConfig, overrides: list[str], run_dir: Path,
                    value: Any) -> Any:  # fmt: skip
        from hydra.core.utils import JobReturn, JobStatus

        return JobReturn(
            overrides=overrides, cfg=sweep_config, hydra_cfg=None, working_dir=str(run_dir),
            task_name=str(sweep_config.hydra.job.name), status=JobStatus.COMPLETED,
            _return_value=value,
        )  # fmt: skip

    def _skipped(self, overrides: list[str]) -> Any | None:
        """A finished job's result without submitting it again (``skip_completed=true``)."""
        if not self.config.get("skip_completed"):  # type: ignore[attr-defined]
            return None  # (given on the command line, not swept: the main config has it)
        sweep_config = self._sweep_config(overrides)
        if not sweep_config.get("skip_completed") or sweep_config.get("overwrite"):
            return None
        run_dir = self._run_dir(sweep_config)
        if not is_complete(run_dir):
            return None
        log.info("Skipping %s: already complete (not submitted)", run_dir)
        metric = (read_metrics(run_dir) or {}).get(sweep_config.get("optimized_metric", ""))
        return self._job_return(sweep_config, overrides, run_dir, metric)

    def _ended(self, job: Any, first_unknown: dict[str, float]) -> str | None:
        """The scheduler's state for a job that ended without a result; None while it runs."""
        return job.state if job.done() else None

    def _refresh(self, jobs: Sequence[Any]) -> None:
        """Bring the jobs' states up to date (one scheduler query per poll)."""

    def _collect(self, jobs: dict[int, Any], job_overrides: Sequence[Sequence[str]],
                 results: list[Any]) -> None:  # fmt: skip
        """Wait for every job; record each one that ended without a result as failed."""
        pending = dict(jobs)
        first_unknown: dict[str, float] = {}
        while pending:
            self._refresh(list(pending.values()))
            for i, job in list(pending.items()):
                if job.paths.result_pickle.exists():
                    state = "has a result"
                else:
                    state = self._ended(job, first_unknown)
                    if state is None:
                        continue
                del pending[i]
                results[i] = self._result_or_failure(job, list(job_overrides[i]), state)
            if pending:
                time.sleep(self.poll_s)

    #: Seconds a job that ended is given for its result file to appear (slow shared filesystems).
    result_grace_s = 15.0

    def _result_or_failure(self, job: Any, overrides: list[str], state: str) -> Any:
        """The job's JobReturn; a job without one is recorded as failed and returns NaN.

        submitit's own ``job.results()`` is called only once the result file is there: without
        SLURM accounting it waits for a job without one forever (its state stays UNKNOWN)."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        end = time.monotonic() + self.result_grace_s
        while not job.paths.result_pickle.exists() and time.monotonic() < end:
            time.sleep(1.0)
        why = f"{self._EXECUTOR} job {job.job_id} ended without a result (state: {state})"
        if job.paths.result_pickle.exists():
            try:
                return job.results()[0]
            except UncompletedJobError:
                pass
            except FailedJobError as err:  # raised outside the training (which records its own)
                why = f"{self._EXECUTOR} job {job.job_id} failed outside the training: {err}"
        sweep_config = self._sweep_config(overrides)
        run_dir = self._run_dir(sweep_config)
        record_lost_job(run_dir, sweep_config, why, job)
        return self._job_return(sweep_config, overrides, run_dir, math.nan)


def record_lost_job(run_dir: Path, cfg: DictConfig, why: str, job: Any = None) -> None:
    """Write ``status: failed`` with ``why`` into the run dir of a job that left no result.

    A complete run dir is kept (the job was killed after it had written its result)."""
    if run_status(run_dir) == Status.OK:
        log.warning("%s, but %s is complete: kept", why, run_dir)
        return
    logs = {}
    if job is not None:
        logs = {"stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(
        run_dir,
        {
            "status": str(Status.FAILED),
            "error": why,
            "model": str(OmegaConf.select(cfg, "model.name", default=None)),
            "backbone": str(OmegaConf.select(cfg, "model.backbone", default=None)),
            "seed": OmegaConf.select(cfg, "seed", default=None),
            "job_id": None if job is None else str(job.job_id),
            **logs,
        },
    )
    log.error("%s; recorded as failed in %s (job logs: %s)", why, run_dir, logs.get("stderr"))


__all__ = [
    "adapt_trainer_cfg",
    "ddp_relaunches_script",
    "device_count",
    "is_multirun",
    "RecordingLauncher",
    "missing_launcher_plugin",
    "record_lost_job",
    "register_resolvers",
    "require_launcher_plugin",
    "runs_on_cpu",
    "slurm_accounting",
    "slurm_queue_state",
    "train_in_subprocess",
]
