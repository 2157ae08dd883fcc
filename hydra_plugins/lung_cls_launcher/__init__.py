"""lung_cls's submitit launchers, as Hydra plugins: ``hydra/launcher=slurm`` and ``=local``.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace, so the two classes live
here; what they do is in :class:`lung_cls.launch.RecordingLauncher` (a job that the scheduler
killed is recorded as failed in its run dir; the sweep goes on to its report). Their configs
(``lung_cls_slurm``, ``lung_cls_local``) extend the submitit plugin's with ``poll_s`` and
``unknown_wait_s``; ``conf/hydra/launcher/{slurm,local}.yaml`` build on them. Needs the optional
submitit plugin (``pip install -e ".[slurm]"``); without it this package defines nothing.
No ``from __future__ import annotations``: Hydra imports plugin modules without registering them
in ``sys.modules`` first, and dataclasses then cannot read string annotations.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lung_cls.launch import (
    SLURM_NOT_OVER,
    RecordingLauncher,
    slurm_accounting,
    slurm_queue_state,
)

log = logging.getLogger("lung_cls.launch")

try:
    from hydra.core.config_store import ConfigStore
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        LocalLauncher as _SubmititLocal,
    )
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as _SubmititSlurm,
    )
except ImportError:  # pragma: no cover - lung_cls.launch.missing_launcher_plugin says what to do
    pass
else:

    class LocalLauncher(RecordingLauncher, _SubmititLocal):
        """submitit's local executor (``hydra/launcher=local``), failures recorded per job."""

        _EXECUTOR = "local"

    class SlurmLauncher(RecordingLauncher, _SubmititSlurm):
        """SLURM (``hydra/launcher=slurm``); a job SLURM ended is recorded with SLURM's state."""

        _EXECUTOR = "slurm"

        _accounting: bool | None = None  # found out at the first poll

        def _refresh(self, jobs: Sequence[Any]) -> None:
            if not jobs:
                return
            if self._accounting is None:
                self._accounting, why = slurm_accounting(jobs[0].job_id)
                if not self._accounting:
                    log.warning(
                        "SLURM accounting is off (%s): job states come from squeue, and a job "
                        "that neither sacct nor squeue knows is waited for at most %.0f s",
                        why, self.unknown_wait_s,
                    )  # fmt: skip
            if self._accounting:
                # One sacct call for all the jobs every poll (submitit's own backs off to 10 min).
                jobs[0].watcher.update()

        def _ended(self, job: Any, first_unknown: dict[str, float]) -> str | None:
            state = job.watcher.get_state(job.job_id, mode="cache")
            if state == "UNKNOWN":  # sacct does not know it: no accounting, or not yet
                state = slurm_queue_state(job.job_id) or "UNKNOWN"
            if state.split()[0] in SLURM_NOT_OVER:
                first_unknown.pop(job.job_id, None)
                return None
            if state != "UNKNOWN":
                return state
            since = first_unknown.setdefault(job.job_id, time.monotonic())
            if time.monotonic() - since < self.unknown_wait_s:
                return None
            return (
                f"UNKNOWN: neither sacct nor squeue knew the job for {self.unknown_wait_s:.0f} s "
                "(no SLURM accounting? see docs/cluster.md)"
            )

    @dataclass
    class RecordingSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.lung_cls_launcher.SlurmLauncher"
        poll_s: float = 10.0
        unknown_wait_s: float = 120.0

    @dataclass
    class RecordingLocalConf(LocalQueueConf):
        _target_: str = "hydra_plugins.lung_cls_launcher.LocalLauncher"
        poll_s: float = 1.0
        unknown_wait_s: float = 120.0

    ConfigStore.instance().store(
        group="hydra/launcher", name="lung_cls_slurm", node=RecordingSlurmConf, provider="lung_cls"
    )
    ConfigStore.instance().store(
        group="hydra/launcher", name="lung_cls_local", node=RecordingLocalConf, provider="lung_cls"
    )
