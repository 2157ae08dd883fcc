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
from lung_cls.data.preprocess import PreparedData, prep_config, prepare_dataset
from lung_cls.data.split import (
    check_disjoint,
    cv_folds,
    duplicate_content,
    grouped_split,
    near_duplicates,
    scale_counts,
    split_summary,
    stratified_split,
    upsample_indices,
)
from lung_cls.data.subgroups import counts_by_split, stratify_column
from lung_cls.errors import DataSetupError  # re-exported: datamodule.DataSetupError
from lung_cls.labels import CLASS_NAMES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class TensorBatches:
    """A sized iterable of ``(x, y, idx)`` batches sliced from tensors that already sit on the device.

    ``x`` is float in [0, 1], shape (N, 1, H, W). ``epoch_fn`` returns the current epoch so the
    permutation and the augmentation stream depend only on (seed, epoch, batch number).

    ``batch_size`` is the *global* batch: under DDP (``world_size`` > 1) each rank gets its share.
    Why: so that a run on N devices takes the same optimisation steps as a run on one device.

    - Training (``shuffle=True``): the one global order is padded to a multiple of ``world_size``
      (as ``DistributedSampler`` does; only when the set does not divide evenly), cut into global
      batches of ``batch_size``, and rank ``r`` takes ``global_batch[r::world_size]``. With
      ``batch_size`` and the (padded) set size divisible by ``world_size`` every rank holds the same
      number of images per step, so DDP's gradient average equals the single-process mean loss.
      Augmentation is drawn for the whole global batch (same generator seed on every rank) and then
      sliced, so each image gets exactly the transform it would get in a single-process run.
    - Evaluation: no padding (no image is counted twice); rank ``r`` takes ``order[r::world_size]``
      in batches of ``ceil(batch_size / world_size)``. The union of the ranks' batch ``b`` is the
      single-process batch ``b`` when ``batch_size`` divides by ``world_size``.
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
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"TensorBatches: need batch_size >= 1 and 0 <= rank < world_size, got "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        if world_size > 1 and shuffle and batch_size % world_size:
            raise DataSetupError(
                f"data.batch_size={batch_size} does not split evenly over {world_size} DDP "
                "processes: the global batch is shared out across ranks, so set data.batch_size "
                "to a multiple of trainer.devices x trainer.num_nodes"
            )
        if world_size > 1 and not shuffle and len(indices) < world_size:
            raise DataSetupError(
                f"{len(indices)} evaluation image(s) cannot be shared out over {world_size} DDP "
                "processes: every rank needs at least one"
            )
        self.images, self.labels, self.indices = images, labels, indices
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.epoch_fn = seed, epoch_fn
        self.rank, self.world_size = rank, world_size

    @property
    def local_batch_size(self) -> int:
        """Images per batch on this rank (the global batch size on a single process)."""
        return -(-self.batch_size // self.world_size)

    def _order(self) -> torch.Tensor:
        """The global order of the images (shuffled per epoch when training), padded for DDP."""
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_fn())
            order = order[torch.randperm(len(order), generator=g).to(order.device)]
            pad = -len(order) % self.world_size
            if pad:
                order = torch.cat([order, order[:pad]])
        return order

    def _n_global_batches(self, n: int) -> int:
        full, rest = divmod(n, self.batch_size)
        # A training batch of one image breaks BatchNorm; drop such a remainder when shuffling.
        return full + (1 if rest > 1 or (rest == 1 and not self.shuffle) else 0)

    def __len__(self) -> int:
        n = len(self.indices)
        if self.shuffle:
            return self._n_global_batches(n + (-n % self.world_size))
        n_local = len(range(self.rank, n, self.world_size))
        return -(-n_local // self.local_batch_size)

    def _batches(self, order: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, slice | None]]:
        """``(b, image indices to load, this rank's slice of them or None for all)``."""
        if self.shuffle:
            for b in range(self._n_global_batches(len(order))):
                idx = order[b * self.batch_size : (b + 1) * self.batch_size]
                share = slice(self.rank, None, self.world_size) if self.world_size > 1 else None
                yield b, idx, share
        else:
            local = order[self.rank :: self.world_size]
            for b in range(len(self)):
                yield b, local[b * self.local_batch_size : (b + 1) * self.local_batch_size], None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order()
        epoch = self.epoch_fn()
        gen = None
        for b, idx, share in self._batches(order):
            if share is not None and self.augment is None:
                idx = idx[share]  # nothing random to draw: load only this rank's images
                share = None
            x = self.images[idx].unsqueeze(1).float().div_(255.0)
            if self.augment is not None:
                if gen is None:
                    gen = torch.Generator(device=x.device)
                gen.manual_seed((self.seed * 1_000_003 + epoch) * 10_007 + b)
                x = self.augment(x, generator=gen)
            if share is not None:
                x, idx = x[share], idx[share]
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
        # data.subgroup: the column and one category per image (None: no subgroup); with
        # data.split.stratify the split is stratified by it
        self.subgroup_column: str | None = None
        self.subgroups: np.ndarray | None = None
        self._strata: np.ndarray | None = None
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
                raise DataSetupError(
                    f"no {CLASS_NAMES[c]} images in the data set: both classes are needed"
                )
        wanted = {1: tuple(self.cfg.split.perfusion), 0: tuple(self.cfg.split.ventilation)}
        self._set_subgroups(data)
        folds = self.cfg.split.get("folds")
        if folds is None:
            splits, counts = self._split(labels, np.asarray(data.patient_ids), wanted, available)
            if counts != {k: tuple(int(n) for n in v) for k, v in wanted.items()}:
                log.warning("Split counts fitted to the data available: %s", counts)
        else:
            splits, counts = self._cv_split(labels, np.asarray(data.patient_ids), wanted, folds)
        try:
            check_disjoint(splits, np.asarray(data.patient_ids))
        except ValueError as err:
            raise DataSetupError(f"patient leakage between splits: {err}") from None
        nmi_info = self._align_fallback_to_training(splits)
        self._check_leakage(data.images, splits)
        if data.skipped:
            log.warning(
                "%d file(s) skipped (data.on_error=skip), listed in metrics.json data.skipped: %s",
                len(data.skipped), "; ".join(data.skipped),
            )  # fmt: skip
        train_idx = np.flatnonzero(splits == "train")
        balanced, factor = upsample_indices(train_idx, labels, int(self.cfg.split_seed))
        log.debug(  # in metrics.json (data.upsample_factor, n_train_balanced); once per job
            "Training set balanced by up-sampling: minority x%.4f -> %d images",
            factor,
            len(balanced),
        )
        self.splits = splits
        self.train_indices = balanced
        self.summary = {
            **split_summary(labels, splits, np.asarray(data.patient_ids)),
            "counts": {CLASS_NAMES[k]: list(v) for k, v in counts.items()},
            "upsample_factor": float(factor),
            "n_train_balanced": int(len(balanced)),
            "patients_disjoint": True,
            "duplicate_pairs_across_splits": self.summary.get("duplicate_pairs_across_splits", 0),
            "near_duplicate_pairs_across_splits": self.summary.get(
                "near_duplicate_pairs_across_splits", 0
            ),
            "skipped": list(data.skipped),
            "nmi_reference": nmi_info,
        }
        if folds is not None:
            self.summary["cv"] = {"folds": int(folds), "fold": int(self.cfg.split.fold)}
        if self.subgroups is not None:
            self.summary["subgroup"] = {
                "column": self.subgroup_column,
                "stratify": self._strata is not None,
                "by_split": counts_by_split(labels, splits, self.subgroups),
            }

    def _set_subgroups(self, data: PreparedData) -> None:
        """The subgroup values (``data.subgroup``) and, with ``data.split.stratify``, the strata."""
        self.subgroup_column, self.subgroups = data.subgroup_column, data.subgroups
        column = stratify_column(self.cfg)
        if column is None:
            return
        if self.subgroups is None:
            raise DataSetupError(
                f"data.split.stratify={column}: the data carry no subgroup column to stratify by"
            )
        self._strata = np.asarray(self.subgroups, dtype=str)

    def _group_split(
        self,
        labels: np.ndarray,
        patient_ids: np.ndarray,
        counts: Mapping[int, tuple[int, ...]],
        seed: int,
        where: np.ndarray | None = None,
    ) -> np.ndarray:
        """:func:`grouped_split`, or :func:`stratified_split` by the subgroup column under
        ``data.split.stratify``; ``where`` (indices) restricts the strata to the images given."""
        if self._strata is None:
            return grouped_split(labels, patient_ids, counts, seed)
        strata = self._strata if where is None else self._strata[where]
        return stratified_split(labels, patient_ids, strata, counts, seed, self.subgroup_column)

    def _split(
        self,
        labels: np.ndarray,
        patient_ids: np.ndarray,
        wanted: dict[int, tuple[int, ...]],
        available: dict[int, int],
    ) -> tuple[np.ndarray, dict[int, tuple[int, int, int]]]:
        """Patient-grouped split with the configured counts, scaled down to a smaller data set.

        Scaled-down counts keep the paper's class proportions in validation and test (e.g. 1
        perfusion + 2 ventilation), which whole patients cannot give when most patients hold a
        V/Q pair. Then, and only for counts this code scaled (never for counts that fit as they
        were asked), the split is tried again with as many images of each class in validation
        and test as the smaller class has there, the difference moved into training.
        """
        seed = int(self.cfg.split_seed)
        counts = wanted
        try:
            counts = scale_counts(wanted, available)
            return self._group_split(labels, patient_ids, counts, seed), counts
        except ValueError as err:
            error = err
        scaled = counts != {k: tuple(int(n) for n in v) for k, v in wanted.items()}
        if scaled and len(counts) == 2:
            m_val = min(c[1] for c in counts.values())
            m_test = min(c[2] for c in counts.values())
            even = {
                k: (t + v - m_val + s - m_test, m_val, m_test) for k, (t, v, s) in counts.items()
            }
            try:
                splits = self._group_split(labels, patient_ids, even, seed)
                log.warning(
                    "Scaled split counts %s cannot be filled from whole patients (V/Q pairs); "
                    "using %s: the same number of each class in validation and test",
                    counts, even,
                )  # fmt: skip
                return splits, even
            except ValueError:
                pass
        tried = " ".join(
            f"data.split.{CLASS_NAMES[c]}=[{','.join(str(int(k)) for k in counts[c])}]"
            for c in (1, 0)
        )
        raise DataSetupError(
            f"cannot split the data as configured: {error} "
            f"(train, val, test counts tried: {tried}; set other counts with these keys)"
        ) from None

    def _align_fallback_to_training(self, splits: np.ndarray) -> dict[str, Any]:
        """Align the NMI-fallback images to the mean of the centroid-centred *training* images.

        The cached pre-processing aligned them to the mean of the whole cohort's centred images,
        test images included: no labels, but transductive. Here each is aligned again, from its
        stored unshifted image (``PreparedData.nmi_moving``), by the same seeded NMI search
        against a reference built from training images only; its truth masks move by the change
        of shift. The reference itself is what the checkpoint stores too
        (:meth:`reference_image`, the mean training image). Returns the record for
        ``metrics.json`` ``data.nmi_reference``.
        """
        from lung_cls.data.preprocess import _to_uint8, nmi_search, resize_batch, translate

        data = self.prepared
        todo = sorted(i for i in data.nmi_moving if data.info[i].get("method") == "nmi")
        train = splits == "train"
        centred = np.array([inf.get("method") == "centroid" for inf in data.info], dtype=bool)
        ref_idx = np.flatnonzero(train & centred)
        record: dict[str, Any] = {"source": "train", "n_images": int(ref_idx.size)}
        record["n_aligned"] = 0
        how = self.cfg.get("nmi_reference", "train")
        if how not in ("train", "cohort"):
            raise DataSetupError(f"data.nmi_reference must be 'train' or 'cohort', got {how!r}")
        if how == "cohort":  # the earlier behaviour: aligned to the whole cohort's centred mean
            record["source"] = "cohort (data.nmi_reference=cohort)"
            return record
        if not todo:
            return record
        if ref_idx.size == 0:
            log.warning("No centroid-centred training image: NMI-fallback images keep the shift "
                        "found against the cohort mean")  # fmt: skip
            record["source"] = "cohort (no centred training image)"
            return record
        c = prep_config(self.cfg.get("preprocess"))
        size = data.images.shape[-1]
        mean = data.images[ref_idx].astype(np.float32).mean(axis=0)
        mean = resize_batch(mean[None], size)[0] if mean.shape[-1] != size else mean
        subpixel = bool(c["subpixel"])
        images = np.array(data.images, copy=True)
        for i in todo:
            moving = np.asarray(data.nmi_moving[i], dtype=np.float32)
            rng = np.random.default_rng([int(c["seed"]), i])
            dy, dx, score, score0 = nmi_search(moving, mean, c, rng)
            if not subpixel:
                dy, dx = float(round(dy)), float(round(dx))
            old = (float(data.info[i]["shift_y"]), float(data.info[i]["shift_x"]))
            images[i] = _to_uint8(translate(moving, dy, dx, subpixel=subpixel))
            data.info[i].update(
                shift_y=dy, shift_x=dx, nmi=round(score, 6), nmi_unshifted=round(score0, 6),
                nmi_reference="train",
            )  # fmt: skip
            self._shift_masks(i, dy - old[0], dx - old[1])
        data.images = images
        record["n_aligned"] = len(todo)
        log.info("%d NMI-fallback image(s) aligned to the mean of %d centred training images",
                 len(todo), ref_idx.size)  # fmt: skip
        return record

    def _shift_masks(self, i: int, ddy: float, ddx: float) -> None:
        """Move image ``i``'s truth masks by the change of its shift (bilinear, >= 0.5)."""
        from lung_cls.data.masks import PackedMasks
        from lung_cls.data.preprocess import translate

        masks = self.prepared.masks
        if not masks or (ddy == 0 and ddx == 0):
            return
        for name in list(masks):
            old = np.asarray(masks[name][i], dtype=np.float32)
            if not old.any():
                continue
            new = translate(old, ddy, ddx, subpixel=True) >= 0.5
            if isinstance(masks, PackedMasks):
                masks.packed(name)[i] = np.packbits(new, axis=-1)
                masks._cache.pop(name, None)  # noqa: SLF001 - drop the stale unpacked copy
            else:
                masks[name][i] = new

    def _cv_split(
        self,
        labels: np.ndarray,
        patient_ids: np.ndarray,
        wanted: dict[int, tuple[int, ...]],
        folds: Any,
    ) -> tuple[np.ndarray, dict[int, tuple[int, int, int]]]:
        """Cross-validation (``data.split.folds=K``, ``data.split.fold=k``): fold k of
        :func:`cv_folds` is the test set; validation comes from the other folds' patients with
        the configured validation counts (scaled down when the data set is smaller than the
        configured total), and the rest is training. Every image is tested in exactly one fold.
        """
        fold = self.cfg.split.get("fold", 0)
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise DataSetupError(f"data.split.folds must be an integer >= 2 or null, got {folds!r}")
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
            raise DataSetupError(
                f"data.split.fold must be an integer in 0..{folds - 1} (data.split.folds={folds}), "
                f"got {fold!r}"
            )
        seed = int(self.cfg.split_seed)
        try:
            fold_of = cv_folds(labels, patient_ids, folds, seed, strata=self._strata)
        except ValueError as err:
            raise DataSetupError(f"cannot make data.split.folds={folds}: {err}") from None
        test = fold_of == fold
        rest = np.flatnonzero(~test)
        counts: dict[int, tuple[int, int, int]] = {}
        for c in (0, 1):
            total, n_c = sum(int(v) for v in wanted[c]), int((labels == c).sum())
            val = int(wanted[c][1]) if total <= n_c else max(1, round(wanted[c][1] * n_c / total))
            n_rest = int((labels[rest] == c).sum())
            val = min(val, n_rest - 1)
            counts[c] = (n_rest - val, val, int((labels[test] == c).sum()))
        inner = {c: (t, v, 0) for c, (t, v, _) in counts.items()}
        try:
            rest_split = self._group_split(
                labels[rest], patient_ids[rest], inner, seed + 1 + fold, where=rest
            )
        except ValueError:
            m = min(v for _, v, _ in counts.values())
            counts = {c: (t + v - m, m, s) for c, (t, v, s) in counts.items()}
            inner = {c: (t, v, 0) for c, (t, v, _) in counts.items()}
            try:
                rest_split = self._group_split(
                    labels[rest], patient_ids[rest], inner, seed + 1 + fold, where=rest
                )
            except ValueError as err:
                raise DataSetupError(
                    f"fold {fold} of {folds}: no validation set of whole patients: {err}"
                ) from None
        splits = np.full(len(labels), "test", dtype="<U6")
        splits[rest] = rest_split
        log.info(
            "Cross-validation fold %d of %d: test %d images, train/val/test counts per class %s",
            fold, folds, int(test.sum()), counts,
        )  # fmt: skip
        return splits, counts

    def _check_leakage(self, images: np.ndarray, splits: np.ndarray) -> None:
        """Identical pixels, or near-identical images (correlation >= ``data.leakage_corr``
        after pre-processing), in two splits: an error, or a warning with ``data.leakage=warn``.
        """
        mode = str(self.cfg.get("leakage", "error"))
        if mode not in ("error", "warn"):
            raise DataSetupError(f"data.leakage must be 'error' or 'warn', got {mode!r}")
        corr = self.cfg.get("leakage_corr", 0.999)
        if isinstance(corr, bool) or not isinstance(corr, int | float) or not 0 < corr <= 1:
            raise DataSetupError(f"data.leakage_corr must be a number in (0, 1], got {corr!r}")
        pairs = duplicate_content(images, splits)
        exact = set(pairs)
        near = [p for p in near_duplicates(images, splits, float(corr)) if p[:2] not in exact]
        self.summary["duplicate_pairs_across_splits"] = len(pairs)
        self.summary["near_duplicate_pairs_across_splits"] = len(near)
        paths = self.prepared.paths
        msgs = []
        if pairs:
            shown = ", ".join(
                f"{paths[i]} ({splits[i]}) = {paths[j]} ({splits[j]})" for i, j in pairs[:5]
            )
            msgs.append(f"{len(pairs)} image(s) with identical pixels sit in two splits: {shown}")
        if near:
            shown = ", ".join(
                f"{paths[i]} ({splits[i]}) ~ {paths[j]} ({splits[j]}, r={r:.5f})"
                for i, j, r in near[:5]
            )
            msgs.append(
                f"{len(near)} pair(s) of near-identical images (pixel correlation >= {corr:g} "
                f"after pre-processing, data.leakage_corr) sit in two splits: {shown}"
            )
        if not msgs:
            return
        msg = "; ".join(msgs)
        if mode == "error":
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
        if train and world > 1 and len(indices) % world:
            log.warning(
                "DDP: %d training images do not divide by %d processes; %d are repeated each "
                "epoch (as DistributedSampler does), so the run differs slightly from one process",
                len(indices),
                world,
                -len(indices) % world,
            )
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
