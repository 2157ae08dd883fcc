"""Thin Lightning callbacks around the pure evaluation functions.

``RunArtifacts`` runs once, after the test of the best checkpoint, and writes the run dir's
result files: ``predictions.csv`` (val + test), ``cams.npz`` (Grad-CAM of every test image) and
``metrics.json`` last, so a ``metrics.json`` with ``status: ok`` means the run dir is complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lung_cls.evaluation.metrics import binary_metrics, bootstrap_ci, roc_points
from lung_cls.labels import CLASS_NAMES, POSITIVE_CLASS
from lung_cls.models.classifier import predict_probs
from lung_cls.runs import (
    PREDICTION_FIELDS,  # noqa: F401 - re-exported: callbacks.PREDICTION_FIELDS
    RunFile,
    Status,
    run_file,
    write_cams,
    write_metrics,
    write_predictions,
)
from lung_cls.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def split_metrics(y: np.ndarray, prob: np.ndarray, n_boot: int, seed: int, roc: bool) -> dict:
    """Point metrics, stratified-bootstrap 95 % CIs and (for test) the ROC points of one split."""
    out = dict(binary_metrics(y, prob))
    if len(np.unique(y)) == 2 and n_boot > 0:
        out["ci95"] = bootstrap_ci(y, prob, n_boot=n_boot, seed=seed)
    if roc and len(np.unique(y)) == 2:
        out["roc"] = roc_points(y, prob)
    return out


def _best_val_acc(pl_module: L.LightningModule) -> float:
    best = getattr(pl_module, "_best_acc", None)
    if best is not None and getattr(pl_module, "best_epoch", -1) >= 0:
        return float(best)
    return float(pl_module.val_acc_best.compute())


def _git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), or None outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


def environment(device: torch.device) -> dict[str, Any]:
    """Where the run ran, for the report's setup box (kept out of metrics.json: not results)."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    return {
        "device": f"{device.type}: {name}",
        "threads": int(torch.get_num_threads()),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
    }


class RunArtifacts(L.Callback):
    """Write predictions, CAMs and metrics of the best checkpoint into the run dir (rank 0 only)."""

    def __init__(
        self,
        run_dir: str,
        run_info: dict[str, Any],
        cams: bool = True,
        n_boot: int = 2000,
        cam_batch_size: int = 16,
        temperature_scaling: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_info = run_info
        self.cams = cams
        self.n_boot = n_boot
        self.cam_batch_size = cam_batch_size
        self.temperature_scaling = temperature_scaling
        self.result: dict[str, Any] | None = None
        self._t_start: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._t_start is None:  # the first stage (fit, or test alone) starts the clock
            self._t_start = time.perf_counter()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        t0 = time.perf_counter()
        dm = trainer.datamodule
        data = dm.prepared
        net = pl_module.model
        device = pl_module.device

        # Test probabilities come from the test loop (gathered over ranks); val from one forward pass.
        outs = pl_module.test_outputs
        test_idx = outs["idx"].numpy()
        test_prob = outs["prob"].numpy()
        val_idx = dm.split_indices("val")
        with torch.inference_mode(False):
            val_prob = predict_probs(net, dm.images01(val_idx).to(device)).float().cpu().numpy()

        rows = []
        subgroups = getattr(dm, "subgroups", None)  # data.subgroup, one category per image
        for split, idx, prob in (("val", val_idx, val_prob), ("test", test_idx, test_prob)):
            for i, p in zip(idx, prob, strict=True):
                rows.append(
                    {
                        "id": data.ids[i],
                        "path": data.paths[i],
                        "patient_id": data.patient_ids[i],
                        "split": split,
                        "label": int(data.labels[i]),
                        "prob_perfusion": f"{float(p):.6f}",
                        "pred": int(p >= 0.5),
                        "subgroup": "" if subgroups is None else str(subgroups[i]),
                    }
                )
        write_predictions(self.run_dir, rows)

        y_test = np.asarray(data.labels)[test_idx]
        y_val = np.asarray(data.labels)[val_idx]
        seed = int(self.run_info.get("seed", 0))
        metrics = {
            "status": str(Status.OK),
            "error": None,
            **self.run_info,
            "best_epoch": int(getattr(pl_module, "best_epoch", -1)),
            # A plain float: MaxMetric.compute() may synchronise across DDP ranks, and only rank 0
            # runs this hook, so a collective here could wait for ever.
            "val/acc_best": _best_val_acc(pl_module),
            "epochs_run": int(trainer.current_epoch),
            "weights": getattr(pl_module, "weights_origin", None),
            "class_names": list(CLASS_NAMES),
            "positive_class": POSITIVE_CLASS,
            "test": split_metrics(y_test, test_prob, self.n_boot, seed, roc=True),
            "val": split_metrics(y_val, val_prob, self.n_boot, seed, roc=False),
            "data": dm.summary,
        }

        if self.temperature_scaling:
            metrics["calibration"] = self._fit_temperature(trainer, y_val, val_prob)
        if self.cams:
            self._write_cams(pl_module, data, test_idx, test_prob)
        # Timings live apart from metrics.json, so equal runs give byte-identical metrics.json files.
        atomic_write_json(
            run_file(self.run_dir, RunFile.TIMING),
            {
                "artifacts_seconds": round(time.perf_counter() - t0, 3),
                "run_seconds": round(time.perf_counter() - (self._t_start or t0), 3),
                **environment(pl_module.device),
            },
        )
        write_metrics(self.run_dir, metrics)
        self.result = metrics
        self._log_wandb(trainer, metrics, y_test, test_prob)

    def _fit_temperature(self, trainer: L.Trainer, y_val: np.ndarray, val_prob: np.ndarray) -> dict:
        """T fitted on validation, written into the best checkpoint (``temperature`` key)."""
        import os

        from lung_cls.evaluation.calibration import TEMPERATURE_KEY, fit_temperature

        fit = fit_temperature(y_val, val_prob)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best and Path(best).is_file():
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            ckpt[TEMPERATURE_KEY] = float(fit["temperature"])
            tmp = Path(best).with_name(f".{Path(best).name}.tmp")
            torch.save(ckpt, tmp)
            os.replace(tmp, best)
            fit["checkpoint"] = str(best)
        log.info("Temperature scaling on validation: T = %.3f", fit["temperature"])
        return fit

    def _write_cams(self, pl_module, data, test_idx: np.ndarray, test_prob: np.ndarray) -> None:
        from lung_cls.evaluation.cam import (
            RAW_CAMS_KEY,
            cam_map_size,
            compute_gradcam,
            randomisation_check,
            resolve_cam_layer,
        )

        net = pl_module.model
        labels = np.asarray(data.labels)[test_idx]
        x = (
            torch.from_numpy(np.ascontiguousarray(data.images[test_idx])).unsqueeze(1).float()
            / 255.0
        )
        layer = resolve_cam_layer(net, input_size=tuple(x.shape[-2:]))  # model.cam_layer or last
        # Explained for the true class of each image (the paper's figures).
        cams, raw = compute_gradcam(
            net,
            x.to(pl_module.device),
            targets=[int(v) for v in labels],
            batch_size=self.cam_batch_size,
            layer=layer,
            return_raw=True,
        )
        layer_name = next((n for n, m in net.named_modules() if m is layer), "")
        grid = cam_map_size(net, layer, tuple(x.shape[-2:]))
        # Adebayo et al. 2018: the same CAMs from the model with randomised weights.
        similarity = randomisation_check(
            net, x.to(pl_module.device), [int(v) for v in labels], cams, self.cam_batch_size
        )
        write_cams(
            self.run_dir,
            cams=cams,
            labels=labels,
            ids=np.asarray(data.ids)[test_idx],
            images=data.images[test_idx],
            probs=test_prob,
            masks={name: masks[test_idx] for name, masks in (data.masks or {}).items()},
            # The CAM's native resolution and layer, for the report's coarse-CAM warning; the raw
            # maps (before ReLU and min-max scaling) for the statistics.
            extra={
                RAW_CAMS_KEY: raw.astype(np.float32),
                "cam_grid": np.asarray(grid, dtype=np.int64),
                "cam_layer": np.array(layer_name),
                "cam_randomised_similarity": similarity.astype(np.float32),
            },
        )

    def _log_wandb(self, trainer, metrics: dict, y: np.ndarray, prob: np.ndarray) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            import wandb

            run = logger.experiment
            test = metrics["test"]
            run.summary.update(
                {f"test/{k}": test[k] for k in ("acc", "sensitivity", "specificity", "f1", "auc")}
                | {"val/acc_best": metrics["val/acc_best"], "best_epoch": metrics["best_epoch"]}
            )
            probas = np.stack([1 - prob, prob], axis=1)
            run.log(
                {
                    "test/confusion_matrix": wandb.plot.confusion_matrix(
                        y_true=y.tolist(),
                        preds=(prob >= 0.5).astype(int).tolist(),
                        class_names=list(CLASS_NAMES),
                    ),
                    "test/roc": wandb.plot.roc_curve(
                        y.tolist(), probas.tolist(), labels=list(CLASS_NAMES)
                    ),
                }
            )
