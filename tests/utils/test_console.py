"""The console: each record once, Lightning's chatter off it (but in the log file), one progress
line per epoch where no bar is drawn, "job k of n" in a sweep (lung_cls.utils.console/progress)."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from omegaconf import OmegaConf

from lung_cls.utils.console import (
    ConsoleCallback,
    count_sweep_jobs,
    filter_pointless_warnings,
    quiet_console,
)
from lung_cls.utils.progress import epoch_line


@pytest.fixture
def logging_state(tmp_path):
    """A root logger set up as Hydra does (console + file); everything restored afterwards."""
    import lightning  # noqa: F401 - adds its own console handler, as in a real job

    root = logging.getLogger()
    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    saved = (list(root.handlers), root.level, {n: (list(logging.getLogger(n).handlers),
             logging.getLogger(n).propagate) for n in names})  # fmt: skip
    console_stream = io.StringIO()
    console = logging.StreamHandler(console_stream)
    file = logging.FileHandler(tmp_path / "train.log")
    root.handlers = [console, file]
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            yield console_stream, tmp_path / "train.log", file
    finally:
        file.close()
        root.handlers, level, by_name = saved[0], saved[1], saved[2]
        root.setLevel(level)
        for n, (handlers, propagate) in by_name.items():
            logging.getLogger(n).handlers = handlers
            logging.getLogger(n).propagate = propagate


def test_lightning_info_leaves_the_console_but_stays_in_the_file(logging_state):
    console, logfile, file = logging_state
    quiet_console(verbose=False)
    quiet_console(verbose=False)  # idempotent: one filter, not two
    assert not any(
        type(h) is logging.StreamHandler for h in logging.getLogger("lightning").handlers
    )
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("Tip: try litlogger")
    logging.getLogger("lightning.fabric.utilities.seed").warning("a real warning")
    logging.getLogger("lung_cls.progress").info("epoch 1/6")
    for _ in range(2):  # data set up for fit, then for test: the same line twice
        logging.getLogger("lung_cls.data").info("loaded from cache")
        logging.getLogger("lung_cls.data").warning("3 files skipped")
    file.flush()
    shown = console.getvalue().splitlines()
    # Each record once, the tip not at all, a repeated INFO text once; warnings always.
    assert shown == [
        "a real warning",
        "epoch 1/6",
        "loaded from cache",
        "3 files skipped",
        "3 files skipped",
    ]
    kept = logfile.read_text().splitlines()  # the file keeps everything
    assert (
        kept
        == ["Tip: try litlogger", "a real warning", "epoch 1/6"]
        + [
            "loaded from cache",
            "3 files skipped",
        ]
        * 2
    )


def test_verbose_keeps_lightning_on_the_console_once(logging_state):
    console, _, _ = logging_state
    quiet_console(verbose=True)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    assert console.getvalue().splitlines() == ["GPU available: False"]


def test_pointless_warnings_are_filtered_by_their_text():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_pointless_warnings()
        warnings.warn(
            "The `srun` command is available on your system but is not used. HINT",
            UserWarning,
            stacklevel=2,
        )
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...",
            DeprecationWarning,
            stacklevel=2,
        )
        warnings.warn("something the user must see", UserWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["something the user must see"]


def test_sweep_job_count_multiplies_params_and_command_line():
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"model": "resnet18,seresnext26d", "seed": "0,1"}},
                "overrides": {"task": ["experiment=demo", "seed=0,1,2", "trainer.max_epochs=1"]},
            }
        }
    )
    assert count_sweep_jobs(config) == 6  # 2 models x the command line's 3 seeds
    config.hydra.overrides.task = ["seed=range(0,5)"]
    assert count_sweep_jobs(config) == 10


def test_job_k_of_n_lines(monkeypatch, caplog):
    from hydra.core.utils import JobReturn, JobStatus

    monkeypatch.setenv("LUNG_CLS_SWEEP_JOBS", "4")
    config = OmegaConf.create(
        {
            "verbose": True,
            "optimized_metric": "val/acc_best",
            "hydra": {
                "mode": "MULTIRUN",
                "job": {"num": 2},
                "overrides": {"task": ["seed=1", "model=resnet18", "logger=csv"]},
            },
        }
    )
    callback = ConsoleCallback()
    with caplog.at_level(logging.INFO, logger="lung_cls.train"):
        callback.on_job_start(config)
        ok = JobReturn(status=JobStatus.COMPLETED, _return_value=0.925)
        callback.on_job_end(config, job_return=ok)
        callback.on_job_end(
            config, job_return=JobReturn(status=JobStatus.COMPLETED, _return_value=float("nan"))
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "lung_cls.train"]
    assert lines[0] == "job 3 of 4 started: model=resnet18,seed=1"
    assert lines[1].startswith("job 3 of 4 finished: model=resnet18,seed=1 (")
    assert lines[1].endswith(", val/acc_best 0.925)")
    assert lines[2].startswith("job 3 of 4 failed: model=resnet18,seed=1 (")


def test_epoch_line_has_everything_the_user_asked_for():
    line = epoch_line("model=resnet18,seed=0", 3, 6, 0.41234, 0.875, 41.2)
    assert line == (
        "[model=resnet18,seed=0] epoch 3/6  train loss 0.412  val acc 0.875  41 s/epoch  ETA 2 min 04 s"
    )
    assert epoch_line("run", 1, 100, None, None, 7200).endswith(
        "2 h 00 min/epoch  ETA 198 h 00 min"
    )


def test_a_fit_prints_one_line_per_epoch_without_a_terminal(tmp_path, caplog):
    import lightning as L
    import torch

    from lung_cls.utils.progress import EpochLine, TerminalRichProgressBar

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.layer(x), y)
            self.log("train/loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val/acc", (self.layer(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    bar = TerminalRichProgressBar()
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[bar, EpochLine()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    with caplog.at_level(logging.INFO, logger="lung_cls.progress"):
        trainer.fit(Tiny(), loader, loader)
    lines = [r.getMessage() for r in caplog.records if r.name == "lung_cls.progress"]
    assert [line.split("  ")[0] for line in lines] == [
        "[run] epoch 1/3",
        "[run] epoch 2/3",
        "[run] epoch 3/3",
    ]
    assert all("train loss" in line and "val acc" in line and "ETA" in line for line in lines)
    assert not bar.is_enabled  # pytest's stdout is no terminal: the bar stood aside


def test_wandb_logger_is_quiet_offline(tmp_path):
    from lung_cls.utils.loggers import QuietWandbLogger

    quiet = QuietWandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    assert "anonymous" not in quiet._wandb_init
    assert quiet._wandb_init["settings"] == {"silent": True}
    loud = QuietWandbLogger(save_dir=str(tmp_path), offline=True, project="t", quiet=False)
    assert "settings" not in loud._wandb_init
