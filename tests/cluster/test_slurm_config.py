"""The SLURM and local (submitit) launchers as configured: what a job asks the cluster for.

No SLURM needed: the sbatch script is rendered by submitit itself, as it would be submitted. The
same command is submitted to a real cluster in test_slurm_cluster.py; what is checked only here is
what a one-node CPU cluster cannot run: GPU and multi-task (DDP) jobs, and an account.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CONF
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

import lung_cls.launch  # noqa: E402,F401 - registers the launchers' configs and resolvers


def compose_hydra(overrides: list[str]):
    """The real config, hydra node included (what the launcher is built from)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lung_cls.utils.hydra  # noqa: F401 - registers resolvers

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def sbatch_script(overrides: list[str], tmp_path: Path, monkeypatch) -> str:
    """The sbatch script that ``hydra/launcher=slurm`` with these overrides would submit."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    if not any(p and (Path(p) / "srun").exists() for p in os.environ["PATH"].split(os.pathsep)):
        fake_bin = tmp_path / "bin"  # submitit looks for srun to tell SLURM is there
        fake_bin.mkdir(exist_ok=True)
        (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
        (fake_bin / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_hydra(
        ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    )
    HydraConfig.instance().set_config(cfg)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    executor = launcher._executor()
    return executor._executor._make_submission_file_text("CMD", "uid")


def sbatch_options(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            out[key] = value
    return out


# ------------------------------------------------------------------- defect 1: launcher keys
@pytest.mark.parametrize(
    "launcher, target",
    [
        ("slurm", "hydra_plugins.lung_cls_launcher.SlurmLauncher"),
        ("local", "hydra_plugins.lung_cls_launcher.LocalLauncher"),
        ("parallel", "JoblibLauncher"),
    ],
)
def test_demo_composes_with_every_launcher(launcher, target):
    """experiment=demo sets no launcher-specific key, so it goes with any launcher."""
    extra = ["hydra.launcher.partition=debug"] if launcher == "slurm" else []
    cfg = compose_hydra(["experiment=demo", f"hydra/launcher={launcher}", *extra])
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.trainer.accelerator == "cpu"  # the experiment's own trainer is kept


def test_make_demo_still_runs_two_jobs_at_a_time():
    cfg = compose_hydra(["experiment=demo"])  # what `make demo` runs
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2


def test_no_experiment_sets_launcher_keys():
    for path in (CONF / "experiment").glob("*.yaml"):
        cfg = OmegaConf.load(path)
        assert OmegaConf.select(cfg, "hydra.launcher") is None, f"{path}: sets hydra.launcher.*"


# ------------------------------------------------------------------- defects 2 and 3: resources
def test_cpu_job_asks_for_no_gpu_and_leaves_memory_to_the_cluster(tmp_path, monkeypatch):
    """The README's command: experiment=demo (trainer=cpu) with only the partition given."""
    opts = sbatch_options(
        sbatch_script(["experiment=demo", "hydra.launcher.partition=debug"], tmp_path, monkeypatch)
    )
    assert opts["partition"] == "debug"
    assert not {k for k in opts if "gpu" in k or k == "gres"}, opts  # "Invalid gres"
    assert "mem" not in opts, opts  # "Memory specification can not be satisfied"
    assert "cpus-per-task" not in opts, opts  # the cluster's default, not a GPU node's 8
    assert opts["ntasks-per-node"] == "1" and opts["nodes"] == "1"


def test_job_threads_follow_its_cpus(tmp_path, monkeypatch):
    script = sbatch_script(["experiment=demo"], tmp_path, monkeypatch)
    (setup,) = [line for line in script.splitlines() if "OMP_NUM_THREADS" in line]
    assert script.index(setup) < script.index("srun")  # before the training starts
    # What the line does, in bash, with and without CPUs asked for or threads given.
    for env, threads in (({}, "1"), ({"SLURM_CPUS_PER_TASK": "8"}, "8"),
                         ({"SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "3"}, "3")):  # fmt: skip
        base = {
            k: v
            for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")
        }
        out = subprocess.run(["bash", "-c", f'{setup}; echo "$OMP_NUM_THREADS"'],
                             env={**base, **env}, capture_output=True, text=True, check=True)  # fmt: skip
        assert out.stdout.strip() == threads, (env, out.stdout)


def test_gpu_job_asks_for_its_gpus(tmp_path, monkeypatch):
    opts = sbatch_options(sbatch_script(["trainer=gpu"], tmp_path, monkeypatch))
    assert opts["gpus-per-node"] == "1" and opts["cpus-per-task"] == "8"
    assert "mem" not in opts and "partition" not in opts and "account" not in opts


def test_memory_when_asked_for(tmp_path, monkeypatch):
    opts = sbatch_options(sbatch_script(["hydra.launcher.mem_gb=16"], tmp_path, monkeypatch))
    assert opts["mem"] == "16GB"


def test_ddp_job_on_a_gpu_cluster(tmp_path, monkeypatch):
    """One task and one GPU per device (trainer=ddp), partition/account/time as given."""
    script = sbatch_script(
        [
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=myproj",
            "hydra.launcher.timeout_min=90",
            "trainer=ddp",
            "trainer.devices=4",
        ],
        tmp_path,
        monkeypatch,
    )
    opts = sbatch_options(script)
    expected = {"partition": "gpu", "account": "myproj", "gpus-per-node": "4",
                "ntasks-per-node": "4", "cpus-per-task": "8", "time": "90"}  # fmt: skip
    assert {k: opts.get(k) for k in expected} == expected, script
    assert "mem" not in opts
    # DDP on CPU (gloo): the tasks, no GPU.
    opts = sbatch_options(
        sbatch_script(
            ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path, monkeypatch
        )
    )
    assert opts["ntasks-per-node"] == "2" and "gpus-per-node" not in opts


def test_run_dirs_and_submitit_folder(tmp_path):
    cfg = compose_hydra(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    sweep_cfg = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep_cfg["subdir"] == "${lung_cls.sweep_subdir:${hydra.overrides.task}}"
    assert str(cfg.hydra.launcher.submitit_folder).startswith(str(tmp_path / "sweep" / ".submitit"))
    assert cfg.hydra.launcher.unknown_wait_s > 0 and cfg.hydra.launcher.poll_s > 0


@pytest.mark.parametrize(
    "accelerator, devices, gpus",
    [("cpu", 1, None), ("gpu", 1, 1), ("cuda", "0,1", 2), ("auto", 4, 4), ("gpu", "auto", 1),
     ("gpu", [0, 1, 2], 3), ("cpu", 2, None)],
)  # fmt: skip
def test_slurm_gpus_follow_the_trainer(accelerator, devices, gpus):
    assert lung_cls.launch.slurm_gpus(accelerator, devices) == gpus


# ------------------------------------------------------------------- a job that left no result
class _Watcher:
    def __init__(self, state):
        self.state = state

    def get_state(self, job_id, mode="standard"):
        return self.state


class _Job:
    def __init__(self, state):
        self.job_id = "42_1"
        self.watcher = _Watcher(state)


def _slurm_launcher(unknown_wait_s: float):
    import hydra_plugins.lung_cls_launcher as plugin

    launcher = plugin.SlurmLauncher.__new__(plugin.SlurmLauncher)
    launcher.unknown_wait_s = unknown_wait_s
    return launcher


def test_sacct_state_names_the_end(monkeypatch):
    import hydra_plugins.lung_cls_launcher as plugin

    monkeypatch.setattr(plugin, "slurm_queue_state", lambda job_id: pytest.fail("no squeue"))
    launcher, clock = _slurm_launcher(60), {}
    for running in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"):
        assert launcher._ended(_Job(running), clock) is None
    for ended in ("CANCELLED by 0", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "FAILED"):
        assert launcher._ended(_Job(ended), clock) == ended


def test_without_accounting_squeue_answers_then_the_wait_is_bounded(monkeypatch):
    """sacct knows no job (no accounting): squeue's state while slurmctld holds the job, then at
    most unknown_wait_s of UNKNOWN before it counts as ended - never a wait forever."""
    import hydra_plugins.lung_cls_launcher as plugin

    queue = {"state": "RUNNING"}
    monkeypatch.setattr(plugin, "slurm_queue_state", lambda job_id: queue["state"])
    launcher, clock, job = _slurm_launcher(0.3), {}, _Job("UNKNOWN")
    assert launcher._ended(job, clock) is None  # squeue: still running
    queue["state"] = "CANCELLED"
    assert launcher._ended(job, clock) == "CANCELLED"
    queue["state"] = None  # slurmctld forgot it too (MinJobAge)
    assert launcher._ended(job, clock) is None  # the clock starts
    time.sleep(0.4)
    why = launcher._ended(job, clock)
    assert why is not None and why.startswith("UNKNOWN") and "accounting" in why
    queue["state"] = "RUNNING"  # a job squeue sees again resets the clock
    clock.clear()
    assert launcher._ended(job, clock) is None and not clock


def test_lost_job_is_recorded_and_a_complete_run_kept(tmp_path):
    from lung_cls.launch import record_lost_job
    from lung_cls.runs import read_metrics, write_metrics

    cfg = OmegaConf.create({"model": {"name": "resnet18", "backbone": "rn18"}, "seed": 3})
    never_started = tmp_path / "model=resnet18,seed=3"  # cancelled while pending: no run dir
    record_lost_job(never_started, cfg, "slurm job 7_3 ended without a result (state: TIMEOUT)")
    metrics = read_metrics(never_started)
    assert metrics["status"] == "failed" and "TIMEOUT" in metrics["error"]
    assert metrics["model"] == "resnet18" and metrics["seed"] == 3
    done = tmp_path / "done"
    write_metrics(done, {"status": "ok", "model": "resnet18"})
    record_lost_job(done, cfg, "killed while exiting")
    assert read_metrics(done) == {"status": "ok", "model": "resnet18"}


def test_job_without_result_is_recorded_without_asking_submitit(tmp_path):
    """Without accounting, submitit's own job.results() waits for a job without a result forever
    (its state stays UNKNOWN): the launcher records such a job without calling it."""
    from types import SimpleNamespace

    launcher = _slurm_launcher(0)
    launcher.result_grace_s = 0
    sweep_cfg = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path), "subdir": "model=resnet18,seed=1"},
                   "job": {"name": "train"}},
         "model": {"name": "resnet18", "backbone": "rn18"}, "seed": 1}
    )  # fmt: skip
    launcher._sweep_config = lambda overrides: sweep_cfg
    folder = tmp_path / ".submitit" / "42_1"
    job = SimpleNamespace(
        job_id="42_1",
        paths=SimpleNamespace(result_pickle=folder / "r.pkl", stdout=folder / "o", stderr=folder / "e"),
        results=lambda: pytest.fail("job.results() would wait forever"),
    )  # fmt: skip
    ret = launcher._result_or_failure(job, ["model=resnet18", "seed=1"], "UNKNOWN: gone")
    assert ret.return_value != ret.return_value  # NaN, as a failed sweep job returns
    metrics = json.loads((tmp_path / "model=resnet18,seed=1" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "42_1" in metrics["error"]
    assert "UNKNOWN" in metrics["error"] and metrics["stderr"].endswith("e")


def test_no_sacct_means_no_accounting(monkeypatch, tmp_path):
    from lung_cls.launch import slurm_accounting

    monkeypatch.setenv("PATH", str(tmp_path))  # no sacct at all
    on, why = slurm_accounting("1")
    assert on is False and "sacct" in why
