"""LightningDataModule: prepared images held as one uint8 tensor on the training device.

The whole pre-processed cohort is tiny (530 x 224 x 224 uint8 is 27 MB), so there are no
DataLoader workers at all: batches are slices of a device tensor and augmentation runs on the batch,
on the device. Shuffling and augmentation are seeded per (seed, epoch, batch), so a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch

from lung_cls.data.augment import BatchAugment
from lung_cls.data.augment import from_config as augment_from_config
from lung_cls.data.preprocess import PreparedData, prepare_dataset
from lung_cls.data.sources import CLASS_NAMES
from lung_cls.data.split import (
    check_disjoint,
    duplicate_content,
    grouped_split,
    scale_counts,
    split_summary,
    upsample_indices,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataSetupError(ValueError):
    """The data cannot be split or used as configured; the message says why."""


class TensorBatches:
    """A sized iterable of ``(x, y, idx)`` batches sliced from tensors that already sit on the device.

    ``x`` is float in [0, 1], shape (N, 1, H, W). ``epoch_fn`` returns the current epoch so the
    permutation and the augmentation stream depend only on (seed, epoch, batch number).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: BatchAugment | None = None,
        seed: int = 0,
        epoch_fn: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.epoch_fn = seed, epoch_fn
        self.rank, self.world_size = rank, world_size

    def _order(self) -> torch.Tensor:
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_fn())
            order = order[torch.randperm(len(order), generator=g).to(order.device)]
        if self.world_size > 1:
            # Pad to a multiple of world_size (as DistributedSampler does), then take this rank's share.
            per_rank = -(-len(order) // self.world_size)
            pad = per_rank * self.world_size - len(order)
            if pad:
                order = torch.cat([order, order[:pad]])
            order = order[self.rank :: self.world_size]
        return order

    def _n_batches(self, n: int) -> int:
        full, rest = divmod(n, self.batch_size)
        # A training batch of one image breaks BatchNorm; drop such a remainder when shuffling.
        return full + (1 if rest > 1 or (rest == 1 and not self.shuffle) else 0)

    def __len__(self) -> int:
        n = len(self.indices)
        if self.world_size > 1:
            n = -(-n // self.world_size)
        return self._n_batches(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order()
        epoch = self.epoch_fn()
        gen = None
        for b in range(self._n_batches(len(order))):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx].unsqueeze(1).float().div_(255.0)
            if self.augment is not None:
                if gen is None:
                    gen = torch.Generator(device=x.device)
                gen.manual_seed((self.seed * 1_000_003 + epoch) * 10_007 + b)
                x = self.augment(x, generator=gen)
            yield x, self.labels[idx], idx


class LungScanDataModule(L.LightningDataModule):
    """Prepared data -> patient-grouped split with exact per-class counts -> balanced training set."""

    def __init__(self, data: Mapping[str, Any], cache_dir: str, seed: int = 0) -> None:
        super().__init__()
        self.cfg = data
        self.cache_dir = cache_dir
        self.seed = seed  # model seed: shuffling and augmentation streams
        self.prepared: PreparedData | None = None
        self.splits: np.ndarray | None = None
        self.summary: dict[str, Any] = {}
        self._device_tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ preparation
    def prepare_data(self) -> None:
        # Runs once per node: builds the cache, so the ranks' setup() only reads it.
        prepare_dataset(self.cfg, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is not None:
            return
        data = prepare_dataset(self.cfg, self.cache_dir)
        self.prepared = data
        labels = np.asarray(data.labels)
        available = {c: int((labels == c).sum()) for c in (0, 1)}
        for c, n in available.items():
            if n == 0:
                raise DataSetupError(f"no {CLASS_NAMES[c]} images in the data set: both classes are needed")
        wanted = {1: tuple(self.cfg.split.perfusion), 0: tuple(self.cfg.split.ventilation)}
        try:
            counts = scale_counts(wanted, available)
            splits = grouped_split(labels, np.asarray(data.patient_ids), counts, int(self.cfg.split_seed))
        except ValueError as err:
            raise DataSetupError(f"cannot split the data as configured: {err}") from None
        if counts != {k: tuple(v) for k, v in wanted.items()}:
            log.warning("Split counts scaled to the data available: %s", counts)
        check_disjoint(splits, np.asarray(data.patient_ids))
        self._check_leakage(data.images, splits)
        train_idx = np.flatnonzero(splits == "train")
        balanced, factor = upsample_indices(train_idx, labels, int(self.cfg.split_seed))
        log.info(
            "Training set balanced by up-sampling: minority x%.4f -> %d images", factor, len(balanced)
        )
        self.splits = splits
        self.train_indices = balanced
        self.summary = {
            **split_summary(labels, splits, np.asarray(data.patient_ids)),
            "counts": {CLASS_NAMES[k]: list(v) for k, v in counts.items()},
            "upsample_factor": float(factor),
            "n_train_balanced": int(len(balanced)),
            "patients_disjoint": True,
            "skipped": list(data.skipped),
        }

    def _check_leakage(self, images: np.ndarray, splits: np.ndarray) -> None:
        pairs = duplicate_content(images, splits)
        self.summary["duplicate_pairs_across_splits"] = len(pairs)
        if not pairs:
            return
        ids = self.prepared.ids
        shown = ", ".join(f"{ids[i]} ({splits[i]}) = {ids[j]} ({splits[j]})" for i, j in pairs[:5])
        msg = f"{len(pairs)} image(s) with identical pixels sit in two splits: {shown}"
        if str(self.cfg.get("leakage", "error")) == "error":
            raise DataSetupError(msg + " (set data.leakage=warn to continue anyway)")
        log.warning(msg)

    # ------------------------------------------------------------------ tensors and loaders
    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._device()
        if self._device_tensors is None or self._device_tensors[0].device != device:
            images = torch.from_numpy(np.ascontiguousarray(self.prepared.images)).to(device)
            labels = torch.from_numpy(np.asarray(self.prepared.labels, dtype=np.int64)).to(device)
            self._device_tensors = (images, labels)
        return self._device_tensors

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def _loader(self, indices: np.ndarray, train: bool) -> TensorBatches:
        images, labels = self._tensors()
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        return TensorBatches(
            images,
            labels,
            torch.as_tensor(indices, dtype=torch.long, device=images.device),
            int(self.cfg.batch_size),
            shuffle=train,
            augment=augment_from_config(self.cfg.augment) if train else None,
            seed=self.seed,
            epoch_fn=self._epoch,
            rank=rank,
            world_size=world,
        )

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def train_dataloader(self) -> TensorBatches:
        return self._loader(self.train_indices, train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._loader(self.split_indices("val"), train=False)

    def test_dataloader(self) -> TensorBatches:
        return self._loader(self.split_indices("test"), train=False)

    def reference_image(self) -> np.ndarray:
        """Mean of the (centred, un-augmented) training images, float32 (S, S), 0..255."""
        idx = np.unique(self.train_indices)
        return self.prepared.images[idx].astype(np.float32).mean(axis=0)

    def images01(self, indices: np.ndarray) -> torch.Tensor:
        """Un-augmented grey [0, 1] images (N, 1, H, W) on the CPU, for predictions and CAMs."""
        x = torch.from_numpy(np.ascontiguousarray(self.prepared.images[indices]))
        return x.unsqueeze(1).float().div_(255.0)
