"""Lightning's per-epoch overhead against a plain PyTorch loop, on identical data, model and batches.

    python experiments/bench/overhead.py [--size 64] [--epochs 4] [--n 256] [--backbone resnet18]

Both paths train the same LungClassifier (same init, same seeded batches from the same
TensorBatches loader, same AdamW) on CPU; the first epoch of each is a warm-up and not timed. It
prints seconds per epoch for each path and their ratio (target <= 1.10, goal <= 1.03).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F

from lung_cls.data.augment import BatchAugment
from lung_cls.data.datamodule import TensorBatches
from lung_cls.models.classifier import LungClassifier


def make_data(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, size, size, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 2, (n,), generator=g)
    return images, labels


def loader(images, labels, batch_size, epoch_fn) -> TensorBatches:
    return TensorBatches(
        images, labels, torch.arange(len(images)), batch_size, shuffle=True,
        augment=BatchAugment(), seed=0, epoch_fn=epoch_fn,
    )


def make_module(backbone: str, precision: str) -> LungClassifier:
    torch.manual_seed(0)
    return LungClassifier(backbone=backbone, pretrained=False, optimizer=None, scheduler=None)


def plain_loop(args, images, labels) -> list[float]:
    module = make_module(args.backbone, args.precision)
    model = module.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    epoch = {"i": 0}
    batches = loader(images, labels, args.batch_size, lambda: epoch["i"])
    autocast = args.precision == "bf16-mixed"
    times = []
    model.train()
    for e in range(args.epochs):
        epoch["i"] = e
        t0 = time.perf_counter()
        for x, y, _ in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self.t0)


class TrainOnly(L.LightningDataModule):
    def __init__(self, images, labels, batch_size):
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def train_dataloader(self):
        return loader(self.images, self.labels, self.batch_size, lambda: self.trainer.current_epoch)


def lightning_loop(args, images, labels) -> list[float]:
    module = make_module(args.backbone, args.precision)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, precision=args.precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=TrainOnly(images, labels, args.batch_size))
    return timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    images, labels = make_data(args.n, args.size)
    # Interleave the two paths so that machine noise hits both alike.
    plain, light = [], []
    for _ in range(2):
        plain += plain_loop(args, images, labels)
        light += lightning_loop(args, images, labels)
    p, lt = statistics.median(plain), statistics.median(light)
    print(f"backbone={args.backbone} size={args.size} n={args.n} batch={args.batch_size} "
          f"precision={args.precision} threads={torch.get_num_threads()}")
    print(f"{'path':<12}{'s/epoch (median)':>18}{'epochs timed':>14}")
    print(f"{'plain loop':<12}{p:>18.3f}{len(plain):>14}")
    print(f"{'lightning':<12}{lt:>18.3f}{len(light):>14}")
    print(f"ratio lightning/plain = {lt / p:.3f}   (target <= 1.10, goal <= 1.03)")


if __name__ == "__main__":
    main()
