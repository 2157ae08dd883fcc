"""Scaling out: submitit launchers (SLURM config, local executor sweep) and Lightning DDP.

What must hold: a cluster sweep makes the same run dirs and report as a local one, and a DDP run
on N processes trains, evaluates and writes its run dir exactly like a one-process run on the same
data (up to float rounding). The slow tests run the real command line in subprocesses.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, ROOT
from omegaconf import OmegaConf

from lung_cls.data.augment import BatchAugment
from lung_cls.data.datamodule import TensorBatches
from lung_cls.errors import DataSetupError
from lung_cls.launch import ddp_relaunches_script, missing_launcher_plugin

PLUGIN = pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def _compose_with_hydra(overrides: list[str]):
    """The real config, hydra node included (what the launcher is built from)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lung_cls.utils.hydra  # noqa: F401 - registers resolvers

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


# ---------------------------------------------------------------------------------- launchers
# The sbatch script itself (resources per trainer): tests/cluster/test_slurm_config.py.
def test_slurm_defaults_fit_one_gpu_job(tmp_path):
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "trainer=gpu"])
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg.gpus_per_node == launcher_cfg.tasks_per_node == launcher_cfg.nodes == 1
    assert launcher_cfg.partition is None and launcher_cfg.account is None
    assert launcher_cfg.timeout_min == 60 and launcher_cfg.array_parallelism == 20


def test_local_launcher_is_cpu_only(tmp_path):
    cfg = _compose_with_hydra(["hydra/launcher=local"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 0
    assert cfg.hydra.launcher.tasks_per_node == 1


def test_missing_plugin_gives_the_install_command(monkeypatch):
    assert missing_launcher_plugin(["-m", "seed=0,1"]) is None
    assert missing_launcher_plugin(["hydra/launcher=slurm"]) is None  # installed here
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    msg = missing_launcher_plugin(["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    assert msg is not None and 'pip install -e ".[slurm]"' in msg and "hydra/launcher=slurm" in msg
    assert missing_launcher_plugin(["hydra/launcher=basic"]) is None  # built into Hydra


# ---------------------------------------------------------------------------------- DDP pieces
def test_ddp_relaunch_is_detected(monkeypatch):
    for var in ("LOCAL_RANK", "SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)

    def trainer(**kw):
        return OmegaConf.create({"strategy": "auto", "devices": 1, "num_nodes": 1, **kw})

    assert ddp_relaunches_script(trainer(strategy="ddp", devices=2))
    assert ddp_relaunches_script(trainer(strategy="ddp", devices="auto"))  # unsure: yes
    assert not ddp_relaunches_script(trainer(strategy="ddp", devices=1))
    assert not ddp_relaunches_script(trainer(devices=2))
    assert not ddp_relaunches_script(trainer(strategy="ddp_spawn", devices=2))
    # SLURM started one task per device: Lightning re-launches nothing.
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert not ddp_relaunches_script(trainer(strategy="ddp", devices=2))


def _batches(n, batch, world, shuffle, augment=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 2
    out = []
    for rank in range(world):
        tb = TensorBatches(
            images, labels, torch.arange(n), batch, shuffle=shuffle, augment=augment, seed=5,
            epoch_fn=lambda: 1, rank=rank, world_size=world,
        )  # fmt: skip
        out.append(list(tb))
        assert len(out[-1]) == len(tb)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_share_out_the_global_batch(world):
    """Batch b of all ranks together is batch b of one process: same images, same augmentation."""
    aug = BatchAugment()
    (single,) = _batches(24, 8, 1, True, aug)
    ranks = _batches(24, 8, world, True, aug)
    assert all(len(r) == len(single) for r in ranks)
    for b, (x, _, idx) in enumerate(single):
        assert all(len(r[b][2]) == 8 // world for r in ranks)
        xr = torch.cat([r[b][0] for r in ranks])
        ir = torch.cat([r[b][2] for r in ranks])
        o1, o2 = torch.argsort(idx), torch.argsort(ir)
        assert torch.equal(idx[o1], ir[o2])
        assert torch.equal(x[o1], xr[o2])  # per-image augmentation identical


def test_evaluation_shards_are_disjoint_and_complete():
    ranks = _batches(11, 4, 2, False)
    seen = torch.cat([b[2] for r in ranks for b in r])
    assert sorted(seen.tolist()) == list(range(11))  # no padding, nothing twice


def test_batch_size_must_divide_by_processes():
    with pytest.raises(DataSetupError, match="multiple of trainer.devices"):
        _batches(24, 6, 4, True)


# ---------------------------------------------------------------------------------- real CLI
def _cli(*args: str, root: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real command line. ``root`` is PROJECT_ROOT: the data cache goes to <root>/outputs/cache
    (not a command-line override, which would become part of the sweep's run-dir names)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PROJECT_ROOT": str(root)}
    cmd = [sys.executable, "-m", "lung_cls.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _run_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.rglob("metrics.json") if "report" not in p.parts)


@pytest.mark.slow
def test_local_launcher_sweep_then_report(tmp_path):
    """hydra/launcher=local: 2 models x 2 seeds, report built by the callback after the array."""
    sweep = tmp_path / "sweep"
    proc = _cli(
        "-m", "model=resnet18,seresnext26d", "seed=0,1", "debug=tiny", "trainer.max_epochs=1",
        "hydra/launcher=local", f"hydra.sweep.dir={sweep}", root=tmp_path,
    )  # fmt: skip
    runs = _run_dirs(sweep)
    # Named by the overrides, as in a local sweep (trainer.max_epochs=1 is an override too).
    assert [r.name for r in runs] == [
        f"model={m},seed={s},trainer.max_epochs=1"
        for m in ("resnet18", "seresnext26d")
        for s in (0, 1)
    ]
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit
    last_job = 0.0
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "ok", metrics.get("error")
        assert metrics["epochs_run"] == 1
        for name in ("predictions.csv", "cams.npz", "checkpoints/best.ckpt"):
            assert (run / name).is_file()
        last_job = max(last_job, (run / "metrics.json").stat().st_mtime)
    table = sweep / "report" / "table1.csv"
    assert table.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert table.stat().st_mtime >= last_job  # on_multirun_end: after the last job
    models = {row["model"] for row in csv.DictReader(table.open())}
    assert {"resnet18", "seresnext26d"} <= models

    # ... and by hand, from the run dirs alone.
    out = tmp_path / "by_hand"
    subprocess.run(
        [sys.executable, "-m", "lung_cls.report", f"sweep_dir={sweep}", f"out_dir={out}",
         "n_boot=50", "n_perm=0"],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    assert {row["model"] for row in csv.DictReader((out / "table1.csv").open())} == models


# A BatchNorm-free backbone: on CPU PyTorch has no SyncBatchNorm, so only such a model trains
# identically on 1 and 2 processes here (on GPUs, trainer=ddp syncs BatchNorm).
DDP_TINY = (
    "debug=tiny", "model=timm", "model.backbone=test_convnext", "trainer.max_epochs=1",
)  # fmt: skip
DDP_CPU = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("single")
    _cli(*DDP_TINY, f"paths.output_dir={base / 'run'}", root=base)
    return base / "run"


def _files(run: Path) -> list[str]:
    """Every file of a run dir, except what Hydra itself writes into a sweep job's dir."""
    names = (p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    return sorted(n for n in names if not n.startswith(".hydra/") and not n.endswith(".log"))


def _assert_same_run(a: Path, b: Path) -> None:
    files = ("metrics.json", "predictions.csv", "cams.npz", "checkpoints/best.ckpt")
    for name in files:
        assert (b / name).is_file(), name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert mb["status"] == "ok"
    assert ma["best_epoch"] == mb["best_epoch"]
    assert ma["val/acc_best"] == pytest.approx(mb["val/acc_best"], abs=1e-6)
    for split in ("val", "test"):
        assert ma[split]["n"] == mb[split]["n"]
        for key in ("acc", "sensitivity", "specificity", "f1", "auc"):
            assert ma[split][key] == pytest.approx(mb[split][key], abs=1e-6), (split, key)
    ra, rb = (list(csv.DictReader((d / "predictions.csv").open())) for d in (a, b))
    assert [(r["id"], r["split"]) for r in ra] == [(r["id"], r["split"]) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert float(x["prob_perfusion"]) == pytest.approx(float(y["prob_perfusion"]), abs=1e-5)
    sa, sb = (
        torch.load(d / "checkpoints/best.ckpt", weights_only=True)["state_dict"] for d in (a, b)
    )
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path, single_process_run):
    """trainer=ddp, gloo, 2 processes, augmentation on: same run dir as one process."""
    run = tmp_path / "run"
    _cli(*DDP_TINY, *DDP_CPU, f"paths.output_dir={run}", root=single_process_run.parent)
    _assert_same_run(single_process_run, run)
    # The same files, written once (rank 0 only): no stray logs or checkpoints from rank 1.
    assert _files(run) == _files(single_process_run)


@pytest.mark.slow
def test_ddp_inside_a_sweep_job(tmp_path, single_process_run):
    """-m with trainer=ddp: the job runs as a single-run subprocess; run dir named as usual."""
    sweep = tmp_path / "sweep"
    _cli("-m", *DDP_TINY, *DDP_CPU, "seed=0", f"hydra.sweep.dir={sweep}",
         root=single_process_run.parent)  # fmt: skip
    (run,) = _run_dirs(sweep)
    assert run.parent == sweep and "seed=0" in run.name
    _assert_same_run(single_process_run, run)
    assert _files(run) == _files(single_process_run)
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (sweep / "report" / "table1.csv").is_file()
