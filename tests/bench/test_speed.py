"""Speed machinery, tested for what it computes - never for how fast it is.

Timing callback, compile flag, the parallel launcher (a concurrent sweep gives the same files as a
sequential one), and the pure helpers of the benchmark scripts in experiments/bench.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import ROOT, compose
from omegaconf import OmegaConf

from lung_cls.data.augment import BatchAugment
from lung_cls.data.datamodule import TensorBatches
from lung_cls.evaluation.timing import StepTimer, stall_fraction
from lung_cls.models.classifier import LungClassifier

TINY = "test_resnet"  # timm's test network: a training step takes milliseconds


def _bench(name: str):
    """Import a script from experiments/bench as a module."""
    path = ROOT / "experiments" / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _batches(n: int = 12, size: int = 32, batch: int = 4, augment: bool = True, epoch_fn=lambda: 0):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, size, size, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(n) % 2
    return TensorBatches(
        images, labels, torch.arange(n), batch, shuffle=True,
        augment=BatchAugment() if augment else None, epoch_fn=epoch_fn,
    )  # fmt: skip


class _Data(L.LightningDataModule):
    def train_dataloader(self):
        return _batches(epoch_fn=lambda: self.trainer.current_epoch)


# --------------------------------------------------------------------------- timing callback
def test_stall_fraction():
    assert stall_fraction(1.0, 3.0) == pytest.approx(0.25)
    assert stall_fraction(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="must be >= 0"):
        stall_fraction(-1.0, 1.0)


def test_step_timer_splits_data_and_compute(tmp_path):
    timer = StepTimer(out=str(tmp_path / "timing.json"))
    torch.manual_seed(0)
    model = LungClassifier(backbone=TINY, pretrained=False)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[timer],
    )  # fmt: skip
    trainer.fit(model, datamodule=_Data())
    assert [e["epoch"] for e in timer.epochs] == [0, 1, 2]
    for e in timer.epochs:
        assert e["batches"] == 3 and e["samples"] == 12
        assert e["data"] > 0 and e["compute"] > 0
        assert e["data"] + e["compute"] <= e["seconds"] + 1e-6
    saved = json.loads((tmp_path / "timing.json").read_text())
    assert saved["epochs"] == 3 and len(saved["per_epoch"]) == 3
    assert 0 < saved["stall_fraction"] < 1
    assert saved["fit_seconds"] >= saved["train_seconds"] > 0
    expected = stall_fraction(saved["data_seconds"], saved["compute_seconds"])
    assert saved["stall_fraction"] == pytest.approx(expected, rel=0.02, abs=1e-3)  # inputs rounded


def test_step_timer_in_memory_only(tmp_path):
    timer = StepTimer(out="")
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[timer], default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(LungClassifier(backbone=TINY, pretrained=False), datamodule=_Data())
    assert timer.summary["epochs"] == 1
    assert not (tmp_path / "step_timing.json").exists()


# --------------------------------------------------------------------------- compile flag
def test_compile_flag_keeps_checkpoint_keys():
    eager = LungClassifier(backbone=TINY, pretrained=False, compile=False)
    compiled = LungClassifier(backbone=TINY, pretrained=False, compile=True)
    assert eager._compiled is None and compiled._compiled is not None
    # The compiled wrapper is not a submodule: same parameters, same checkpoint keys.
    assert set(compiled.state_dict()) == set(eager.state_dict())
    assert all(k.startswith(("model.", "val_", "test_")) for k in compiled.state_dict())
    assert len(list(compiled.parameters())) == len(list(eager.parameters()))


def test_channels_last_model_and_input():
    module = LungClassifier(backbone=TINY, pretrained=False, channels_last=True)
    conv = next(
        m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
    )
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert module(torch.rand(2, 1, 32, 32)).shape == (2, 2)


# --------------------------------------------------------------------------- configs
def test_parallel_launcher_config():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(
            config_name="train", return_hydra_config=True,
            overrides=["hydra/launcher=parallel", "hydra.launcher.n_jobs=3"],
        )  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.backend == "loky" and launcher.prefer == "processes"
    assert launcher.n_jobs == 3
    # Run dirs are still named by the job's own overrides.
    assert (
        OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
        == "${lung_cls.sweep_subdir:${hydra.overrides.task}}"
    )


def test_trainer_configs_speed_settings(tmp_path):
    gpu = compose([f"paths.output_dir={tmp_path}", "trainer=gpu"])
    assert gpu.trainer.precision == "bf16-mixed" and gpu.trainer.benchmark is True
    assert gpu.model.channels_last is True and gpu.model.compile is False
    cpu = compose([f"paths.output_dir={tmp_path}", "trainer=cpu"])
    assert cpu.trainer.accelerator == "cpu"
    assert cpu.trainer.precision in ("bf16-mixed", "32-true")


# --------------------------------------------------------------------------- benchmark helpers
def test_overhead_pairs_are_interleaved():
    ob = _bench("overhead")
    args = type(
        "A", (), dict(backbone=TINY, size=32, n=8, batch_size=4, epochs=3, precision="32-true")
    )
    pairs = ob.run(args)
    assert len(pairs) == 2  # epoch 0 is the warm-up
    for p in pairs:
        assert p["lightning_wall"] > 0 and p["plain_wall"] > 0


def test_cpu_fastpath_measures_every_mode():
    fp = _bench("cpu_fastpath")
    r = fp.measure(TINY, 32, 2, 1, fp.MODES)
    assert set(r) == set(fp.MODES)
    assert all(v["wall"] > 0 and v["cpu"] > 0 for v in r.values())


def test_sweep_helpers(tmp_path):
    sg = _bench("sweep_gpu")
    text = "2026/01/01 10:00:00.000, 50, 1000\n2026/01/01 10:00:00.500, 100, 3000\nbad line\n"
    rows = sg.UtilSampler._parse_smi(text)
    assert [(u, m) for _, u, m in rows] == [(50.0, 1000.0), (100.0, 3000.0)]
    sampler = sg.UtilSampler(tmp_path / "u.csv")
    sampler.rows, sampler.source = rows, "nvidia-smi"
    s = sampler.summary(rows[0][0], rows[1][0])
    assert s["samples"] == 2 and s["util_mean"] == 75.0 and s["memory_max_mib"] == 3000.0
    assert sampler.summary(0, 1)["samples"] == 0

    flops = {"m": {"forward_per_image": 2.0, "train_per_image": 6.0}}
    run = {"model": "m", "status": "ok", "epochs_run": 10, "n_train": 100, "n_val": 4, "n_test": 5}
    # train 6*100*10 + eval 2*(4*10 + 5 + 4) + CAMs 6*5
    assert sg.run_flops(run, flops) == 6000 + 98 + 30
    assert sg.run_flops({**run, "status": "failed"}, flops) == 0

    f = sg.count_flops(TINY, 32)
    assert f["forward_per_image"] > 0 and f["train_per_image"] == pytest.approx(
        3 * f["forward_per_image"]
    )

    for name in ("a", "b"):
        (tmp_path / name / "model=x,seed=0").mkdir(parents=True)
        for fname in ("metrics.json", "predictions.csv"):
            (tmp_path / name / "model=x,seed=0" / fname).write_text("same")
    assert sg.metrics_equal(tmp_path / "a", tmp_path / "b")["identical"] == [True]
    (tmp_path / "b" / "model=x,seed=0" / "predictions.csv").write_text("other")
    assert sg.metrics_equal(tmp_path / "a", tmp_path / "b")["identical"] == [False]


def test_sweep_gpu_dry_run_commands(tmp_path):
    sg = _bench("sweep_gpu")
    s = sg.main(["--dry-run", "--out", str(tmp_path)])
    sweep = s["settings"]["commands"]["sweep"]
    assert "experiment=bench_sweep" in sweep and "hydra/launcher=parallel" in sweep
    assert "seed=0,1,2,3,4" in sweep and "hydra.launcher.n_jobs=8" in sweep
    assert "model=seresnext101,vgg16,inception_resnet_v2,resnet18" in sweep
    assert (
        s["settings"]["image_size"] == 224 and s["settings"]["trainer"]["precision"] == "bf16-mixed"
    )
    # The fixed settings live in a generated experiment (over the paper's), not on the command
    # line, so the run dirs keep their `model=...,seed=...` names.
    assert "model.pretrained" not in sweep and "max_epochs" not in sweep
    exp = (tmp_path / "conf" / "experiment" / "bench_sweep.yaml").read_text()
    assert "- paper" in exp and "pretrained: false" in exp and "max_epochs: 100" in exp
    from lung_cls.utils.hydra import sweep_subdir

    args = sweep.split()
    job = [a for a in args if "=" in a and not a.startswith(("model=", "seed="))]
    assert sweep_subdir([*job, "model=vgg16", "seed=3"]) == "model=vgg16,seed=3"


# --------------------------------------------------------------------------- concurrent == sequential
@pytest.mark.slow
def test_parallel_sweep_equals_sequential(tmp_path):
    """Two tiny jobs through hydra/launcher=parallel give byte-identical results to the same jobs
    run one after the other by the basic launcher (same thread count in both)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    common = [
        sys.executable, "-m", "lung_cls.train", "-m", "debug=tiny", "model=timm",
        f"model.backbone={TINY}", "seed=0,1", f"paths.cache_dir={tmp_path / 'cache'}",
        "++hydra.callbacks.report.n_perm=0",
    ]  # fmt: skip
    dirs = {}
    for name, launcher in (
        ("seq", ["hydra/launcher=basic"]),
        ("par", ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]),
    ):
        sweep = tmp_path / name
        proc = subprocess.run(
            [*common, *launcher, f"hydra.sweep.dir={sweep}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        dirs[name] = sweep
    expected = [f"model=timm,model.backbone={TINY},seed={s}" for s in (0, 1)]  # sorted by key
    for sweep in dirs.values():
        runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and "seed=" in p.name)
        assert runs == expected
        assert (sweep / "report" / "report.html").is_file()  # the report callback ran
    for run in expected:
        for fname in ("metrics.json", "predictions.csv"):
            a = (dirs["seq"] / run / fname).read_bytes()
            b = (dirs["par"] / run / fname).read_bytes()
            assert a == b, f"{run}/{fname} differs between the sequential and the parallel sweep"
    # ... and the two seeds differ, so the comparison could fail
    assert (dirs["par"] / expected[0] / "predictions.csv").read_bytes() != (
        dirs["par"] / expected[1] / "predictions.csv"
    ).read_bytes()
