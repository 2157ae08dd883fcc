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
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lung_cls.utils.hydra import UserError, clean_errors, expected_errors, to_container
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
    if not loggers_cfg or "wandb" not in loggers_cfg or loggers_cfg.wandb.get("offline") is not None:
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
        ckpt = "last"
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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write the run dir. Returns the metrics.json contents."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lung_cls.data.datamodule import LungScanDataModule
    from lung_cls.evaluation.callbacks import RunArtifacts

    run_dir = Path(cfg.paths.output_dir)
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
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(run_dir / "checkpoints"),
                filename="last",
                save_top_k=0,
                save_last=True,
                save_weights_only=False,
                enable_version_counter=False,
            )
        )
    artifacts = RunArtifacts(
        str(run_dir), run_info, cams=bool(cfg.get("cams", True)), n_boot=int(cfg.get("n_boot", 2000))
    )
    callbacks.append(artifacts)
    _wandb_offline_default(cfg.get("logger"))
    loggers = _instantiate_list(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
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


def run(cfg: DictConfig) -> float | None:
    """Task wrapper: guards the run dir, records failures, always closes W&B."""
    run_dir = Path(cfg.paths.output_dir)
    metric_name = cfg.get("optimized_metric", "val/acc_best")
    previous = _read_metrics(run_dir)
    if cfg.get("skip_completed") and previous and previous.get("status") == "ok":
        log.info("Skipping %s: already complete (skip_completed=true)", run_dir)
        return previous.get(metric_name)
    resuming = bool(cfg.get("resume") or cfg.get("ckpt_path"))
    if previous and not (resuming or cfg.get("overwrite") or cfg.get("skip_completed")):
        if previous.get("status") == "ok":
            raise UserError(
                f"{run_dir}: already holds a completed run; pick another hydra.run.dir, or pass "
                "skip_completed=true (skip it) or overwrite=true (replace it)"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        result = train(cfg)
        return result.get(metric_name)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        atomic_write_json(
            run_dir / "metrics.json",
            {
                "status": status,
                "error": f"{type(err).__name__}: {err}",
                "model": str(cfg.model.get("name")),
                "backbone": str(cfg.model.get("backbone")),
                "seed": cfg.get("seed"),
                "traceback": traceback.format_exc(limit=20),
            },
        )
        if _is_multirun() and isinstance(err, Exception):
            # Keep the sweep going; the report lists this run as failed.
            kind = "expected" if isinstance(err, expected_errors()) else "unexpected"
            log.error("Run %s failed (%s error): %s", run_dir.name, kind, err)
            if kind == "unexpected":
                log.error("%s", traceback.format_exc())
            return math.nan
        raise
    finally:
        _finish_wandb()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@clean_errors
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
