"""Lightning's per-epoch overhead against a plain PyTorch loop, on identical data, model and batches.

    python experiments/bench/overhead.py [--size 64] [--epochs 8] [--n 256] [--backbone resnet18]
                                         [--precision bf16-mixed|32-true]

Why it interleaves epoch by epoch: the machine this runs on is shared, and its load changes by
the second. Running "all plain epochs, then all Lightning epochs" measured the load, not the
framework (a first version of this script reported a ratio of 2.5 that way). Here one Lightning
``fit`` trains model A, and after each of its epochs a callback trains model B (same init, same
seeded batches from the same ``TensorBatches`` loader, same AdamW, same autocast) for one plain
epoch. Each Lightning epoch is the time between consecutive epoch ends minus the plain epoch
inserted in between, so every bit of Lightning's per-epoch work (hooks, logging, iterator set-up)
is counted and each pair runs under the same load. Epoch 0 of each path is a warm-up.

It prints the median of the paired ratios (wall clock and process CPU time; the CPU-time ratio is
less sensitive to other processes), the per-path medians, and the load average.
Target: ratio <= 1.05. On a loaded machine the ratio of one model is noisy; ``--backbone
test_resnet`` (timm's tiny test network, compute ~0) measures Lightning's absolute extra cost per
epoch instead, which divided by a real epoch's time bounds the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F

from lung_cls.data.augment import BatchAugment
from lung_cls.data.datamodule import TensorBatches
from lung_cls.models.classifier import LungClassifier

TARGET = 1.05


def make_data(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images and labels: the timing does not depend on content."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, size, size, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 2, (n,), generator=g)
    return images, labels


def loader(images, labels, batch_size, epoch_fn) -> TensorBatches:
    return TensorBatches(
        images,
        labels,
        torch.arange(len(images)),
        batch_size,
        shuffle=True,
        augment=BatchAugment(),
        seed=0,
        epoch_fn=epoch_fn,
    )


def make_module(backbone: str) -> LungClassifier:
    torch.manual_seed(0)
    return LungClassifier(backbone=backbone, pretrained=False, optimizer=None, scheduler=None)


class PlainEpochs(L.Callback):
    """After each Lightning epoch: one plain-loop epoch of an identical second model, timed."""

    def __init__(self, args, images, labels) -> None:
        self.model = make_module(args.backbone).model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.epoch = 0
        self.batches = loader(images, labels, args.batch_size, lambda: self.epoch)
        self.autocast = args.precision == "bf16-mixed"
        self.lightning_ends: list[
            tuple[float, float]
        ] = []  # (wall, cpu) at each Lightning epoch end
        self.plain: list[tuple[float, float, float, float]] = []  # (wall0, cpu0, wall1, cpu1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.lightning_ends.append((time.perf_counter(), time.process_time()))
        self.epoch = trainer.current_epoch
        w0, c0 = time.perf_counter(), time.process_time()
        self.model.train()
        for x, y, _ in self.batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.plain.append((w0, c0, time.perf_counter(), time.process_time()))

    def pairs(self) -> list[dict[str, float]]:
        """(lightning, plain) wall and CPU seconds per epoch, warm-up epoch 0 left out."""
        out = []
        for k in range(1, len(self.plain)):
            lw = self.lightning_ends[k][0] - self.plain[k - 1][2]
            lc = self.lightning_ends[k][1] - self.plain[k - 1][3]
            pw = self.plain[k][2] - self.plain[k][0]
            pc = self.plain[k][3] - self.plain[k][1]
            out.append(
                {"lightning_wall": lw, "lightning_cpu": lc, "plain_wall": pw, "plain_cpu": pc}
            )
        return out


class TrainOnly(L.LightningDataModule):
    def __init__(self, images, labels, batch_size):
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def train_dataloader(self):
        return loader(self.images, self.labels, self.batch_size, lambda: self.trainer.current_epoch)


def run(args) -> list[dict[str, float]]:
    images, labels = make_data(args.n, args.size)
    plain = PlainEpochs(args, images, labels)
    module = make_module(args.backbone)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[plain],
    )
    trainer.fit(module, datamodule=TrainOnly(images, labels, args.batch_size))
    return plain.pairs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    pairs = run(args)
    load1 = os.getloadavg()
    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    r_wall = statistics.median(p["lightning_wall"] / p["plain_wall"] for p in pairs)
    r_cpu = statistics.median(p["lightning_cpu"] / p["plain_cpu"] for p in pairs)
    print(
        f"backbone={args.backbone} size={args.size} n={args.n} batch={args.batch_size} "
        f"precision={args.precision} threads={torch.get_num_threads()} epoch pairs={len(pairs)} "
        f"load avg (1 min) {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'path':<12}{'wall s/epoch':>14}{'cpu s/epoch':>14}")
    print(f"{'plain loop':<12}{med['plain_wall']:>14.3f}{med['plain_cpu']:>14.3f}")
    print(f"{'lightning':<12}{med['lightning_wall']:>14.3f}{med['lightning_cpu']:>14.3f}")
    print(
        "per-pair wall ratios: "
        + " ".join(f"{p['lightning_wall'] / p['plain_wall']:.3f}" for p in pairs)
    )
    extra = statistics.median(p["lightning_cpu"] - p["plain_cpu"] for p in pairs)
    print(
        f"lightning - plain, CPU s per epoch (median of pairs): {extra:+.4f} "
        f"= {1e3 * extra / math.ceil(args.n / args.batch_size):+.2f} ms per step"
    )
    print(
        f"ratio lightning/plain (median of pairs): wall {r_wall:.3f}, cpu {r_cpu:.3f}   "
        f"(target <= {TARGET:.2f})"
    )


if __name__ == "__main__":
    main()
