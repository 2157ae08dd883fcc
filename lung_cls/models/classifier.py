"""LightningModule around any timm backbone: perfusion (1, positive) vs ventilation (0)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryRecall,
    BinarySpecificity,
)

from lung_cls.models.backbone import LungNet, create_backbone

log = logging.getLogger(__name__)


def _metrics(prefix: str) -> MetricCollection:
    # Perfusion is label 1, so torchmetrics' positive class is the paper's positive class.
    return MetricCollection(
        {
            "acc": BinaryAccuracy(),
            "sensitivity": BinaryRecall(),
            "specificity": BinarySpecificity(),
            "f1": BinaryF1Score(),
            "auc": BinaryAUROC(),
        },
        prefix=prefix,
    )


class LungClassifier(L.LightningModule):
    """Classifier over ``LungNet`` (grey-input adapter + timm backbone).

    Batches are ``(x, y, idx)``: ``x`` float in [0, 1] of shape (N, 1, H, W), already augmented by
    the data module; ``idx`` indexes the prepared data set so predictions can be traced to files.
    """

    def __init__(
        self,
        backbone: str,
        pretrained: bool = True,
        weights: str | None = None,
        in_chans: int = 3,
        num_classes: int = 2,
        drop_rate: float = 0.0,
        channels_last: bool = True,
        compile: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        name: str | None = None,
        output_stride: int | None = None,
        cam_layer: str | int | None = None,
    ) -> None:
        super().__init__()
        # Only plain values go into the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        net, self.weights_origin = create_backbone(
            backbone,
            pretrained=pretrained,
            weights=weights,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            output_stride=output_stride,
        )
        self.model = LungNet(net, in_chans, cam_layer=cam_layer)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # torch.compile is opt-in (model.compile=true): on 100 short epochs its compile time (train,
        # eval and the last short batch each compile) is not won back; see experiments/bench/README.md.
        # The compiled wrapper is kept out of the module tree (set via __dict__), so state_dict keys
        # stay `model.*` (a compiled run's checkpoint loads into an eager model) and Grad-CAM hooks
        # the eager network.
        self.__dict__["_compiled"] = torch.compile(self.model) if compile else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_metrics = _metrics("val/")
        self.test_metrics = _metrics("test/")
        self.val_acc_best = MaxMetric()
        self.test_outputs: dict[str, torch.Tensor] = {}
        self._test_buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # Facts about the run (data config, class names) that predict/export need; plain values only.
        self.run_meta: dict[str, Any] = {}
        self.best_epoch, self._best_acc = -1, float("-inf")
        self.reference_image: torch.Tensor | None = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._compiled if self._compiled is not None else self.model
        return net(x)

    def _step(self, batch):
        x, y, idx = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        prob = torch.softmax(logits.float(), dim=1)[:, 1]
        return loss, prob, y, idx

    # ------------------------------------------------------------------ train / val / test
    def on_train_start(self) -> None:
        if (
            self.best_epoch < 0
        ):  # a resumed run keeps the best it had (restored from the checkpoint)
            self.val_acc_best.reset()
        else:
            self.val_acc_best.update(torch.tensor(self._best_acc))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, prob, y, _ = self._step(batch)
        acc = ((prob >= 0.5).long() == y).float().mean()
        # sync_dist: under DDP the epoch value is the batch-size-weighted mean over all ranks (one
        # reduction at epoch end); a no-op on one process.
        n = len(y)
        epoch = {"on_step": False, "on_epoch": True, "batch_size": n, "sync_dist": True}
        self.log("train/loss", loss, prog_bar=True, **epoch)
        self.log("train/acc", acc, **epoch)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, prob, y, _ = self._step(batch)
        self.val_metrics.update(prob, y)
        epoch = {"on_step": False, "on_epoch": True, "batch_size": len(y), "sync_dist": True}
        self.log("val/loss", loss, prog_bar=True, **epoch)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(values, sync_dist=False)
        acc = float(values["val/acc"])
        # Same rule as the checkpoint callback: only a strict improvement moves the best epoch, so
        # on ties the earliest epoch is kept.
        if self.best_epoch < 0 or acc > self._best_acc:
            self.best_epoch, self._best_acc = int(self.current_epoch), acc
        self.val_acc_best.update(values["val/acc"])
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self._test_buffer = []

    def test_step(self, batch, batch_idx: int) -> None:
        loss, prob, y, idx = self._step(batch)
        self.test_metrics.update(prob, y)
        self._test_buffer.append((idx.detach(), prob.detach(), y.detach()))
        n = len(y)
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()
        if self._test_buffer:
            idx, prob, y = (torch.cat(t) for t in zip(*self._test_buffer, strict=True))
        else:
            idx = y = torch.empty(0, dtype=torch.long, device=self.device)
            prob = torch.empty(0, dtype=torch.float32, device=self.device)
        if self.trainer.world_size > 1:
            # Each rank saw its own share of the test set (of unequal size when the set does not
            # divide evenly, and never padded): collect every image on every rank. Every rank takes
            # part in the gather, even one with nothing to add.
            from torchmetrics.utilities.distributed import gather_all_tensors

            idx, prob, y = (torch.cat(gather_all_tensors(t)) for t in (idx, prob, y))
        if len(idx) == 0:
            return
        order = torch.argsort(idx)
        self.test_outputs = {
            "idx": idx[order].cpu(),
            "prob": prob[order].float().cpu(),
            "y": y[order].cpu(),
        }

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-4)
        else:
            optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # ------------------------------------------------------------------ checkpoint contents
    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "reference_image"):
            # The mean centred training image: new studies whose lungs cannot be separated are
            # aligned to it (the NMI fallback) at prediction time.
            self.reference_image = torch.from_numpy(dm.reference_image())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lung_cls"] = dict(self.run_meta)
        if getattr(self, "reference_image", None) is not None:
            checkpoint["lung_cls_reference_image"] = self.reference_image
        checkpoint["lung_cls_best"] = {"epoch": self.best_epoch, "val_acc": self._best_acc}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_meta = checkpoint.get("lung_cls", {})
        if checkpoint.get("lung_cls_reference_image") is not None:
            self.reference_image = checkpoint["lung_cls_reference_image"]
        best = checkpoint.get("lung_cls_best")
        if best:
            self.best_epoch, self._best_acc = int(best["epoch"]), float(best["val_acc"])


@torch.no_grad()
def predict_probs(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Perfusion probability for grey [0, 1] images (N, 1, H, W), in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            out.append(torch.softmax(logits.float(), dim=1)[:, 1])
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def load_lung_net(
    path: str, map_location: str | torch.device = "cpu"
) -> tuple[LungNet, dict[str, Any]]:
    """Rebuild the trained network from a run's checkpoint, safely (``weights_only=True``).

    Returns ``(net, meta)``: ``net`` in eval mode, ``meta`` the run facts stored at training time
    (``meta["data"]`` holds the data/pre-processing config, ``meta["model"]`` the model config,
    ``meta["seed"]`` the seed). No pretrained weights are needed: the state dict has them all.
    """
    from pathlib import Path

    ckpt_path = Path(path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: checkpoint not found")
    try:
        ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is "not a usable checkpoint"
        raise ValueError(f"{ckpt_path}: not a readable lung_cls checkpoint ({err})") from None
    meta = ckpt.get("lung_cls") or {}
    hp = ckpt.get("hyper_parameters") or {}
    if "state_dict" not in ckpt or not hp.get("backbone"):
        raise ValueError(f"{ckpt_path}: not a lung_cls checkpoint (no state_dict/hyper_parameters)")
    net, _ = create_backbone(
        hp["backbone"],
        pretrained=False,
        num_classes=int(hp.get("num_classes", 2)),
        in_chans=int(hp.get("in_chans", 3)),
        output_stride=hp.get("output_stride"),
    )
    model = LungNet(net, int(hp.get("in_chans", 3)), cam_layer=hp.get("cam_layer"))
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.eval()
    meta = {**meta, "backbone": hp["backbone"], "name": hp.get("name"), "epoch": ckpt.get("epoch")}
    ref = ckpt.get("lung_cls_reference_image")
    meta["reference_image"] = ref.numpy() if ref is not None else None
    # The QA gate's training-set reference (lung_cls.qa.ood), and whether the run was pretrained.
    meta["ood_reference"] = ckpt.get("lung_cls_ood")
    meta["pretrained"] = hp.get("pretrained")
    # Temperature scaling fitted on validation (temperature_scaling=true), or None.
    temp = ckpt.get("temperature")
    meta["temperature"] = float(temp) if temp is not None else None
    return model, meta
