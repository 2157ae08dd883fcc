"""Checkpoint cost: weights-only (what every run keeps) against full state (``resumable=true``).

    python experiments/bench/checkpoints.py [--models resnet18 vgg16] [--repeats 3] [--dir DIR]

Why: a VGG-16 checkpoint with AdamW state is ~1.6 GB. Written after every epoch of 20 runs x 100
epochs that is terabytes of I/O for nothing, so runs keep weights only, and only when validation
accuracy improves (conf/callbacks/default.yaml); the optimiser state is saved only when resuming is
asked for (``resumable=true`` adds a full-state ``last.ckpt``). This prints, per model, the file
size and the write time of both kinds, side by side, written the way Lightning's ModelCheckpoint
writes them (``trainer.save_checkpoint(path, weights_only=...)``), after one real training step so
the AdamW moments exist. "write" is the call alone (the OS may still hold the data in its page
cache); "write+fsync" also waits until the bytes are on disk. Medians of ``--repeats`` writes,
the two kinds alternated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from lung_cls.data.datamodule import TensorBatches
from lung_cls.models.classifier import LungClassifier

ROOT = Path(__file__).resolve().parents[2]
BACKBONES = {"resnet18": "resnet18.tv_in1k", "vgg16": "vgg16.tv_in1k"}


class OneBatch(L.LightningDataModule):
    def train_dataloader(self) -> TensorBatches:
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(4, 32, 32, generator=g) * 255).to(torch.uint8)
        return TensorBatches(images, torch.tensor([0, 1, 0, 1]), torch.arange(4), 4)


def trained_trainer(backbone: str) -> L.Trainer:
    """A trainer after one optimiser step: weights, AdamW moments and loop state all exist."""
    torch.manual_seed(0)
    model = LungClassifier(backbone=backbone, pretrained=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=OneBatch())
    return trainer


def write(trainer: L.Trainer, path: Path, weights_only: bool, fsync: bool) -> float:
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    trainer.save_checkpoint(path, weights_only=weights_only)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=ROOT / "outputs" / "bench" / "checkpoints")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    load0 = os.getloadavg()
    for name in args.models:
        trainer = trained_trainer(BACKBONES[name])
        params = sum(p.numel() for p in trainer.lightning_module.parameters())
        res: dict[str, dict[str, list[float] | int]] = {}
        for kind in ("weights", "full"):
            res[kind] = {"write": [], "fsync": [], "bytes": 0}
        for _ in range(args.repeats):
            for kind, weights_only in (("weights", True), ("full", False)):
                path = args.dir / f"{name}_{kind}.ckpt"
                res[kind]["write"].append(write(trainer, path, weights_only, fsync=False))
                res[kind]["fsync"].append(write(trainer, path, weights_only, fsync=True))
                res[kind]["bytes"] = path.stat().st_size
        ckpt = torch.load(args.dir / f"{name}_full.ckpt", weights_only=True, map_location="cpu")
        has_opt = bool(ckpt.get("optimizer_states"))
        w = torch.load(args.dir / f"{name}_weights.ckpt", weights_only=True, map_location="cpu")
        rows.append((name, params, res, has_opt, bool(w.get("optimizer_states"))))
        for kind in res:
            (args.dir / f"{name}_{kind}.ckpt").unlink(missing_ok=True)
    load1 = os.getloadavg()
    print(
        f"repeats={args.repeats} dir={args.dir} load avg (1 min) {load0[0]:.1f} -> {load1[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    print(
        f"{'model':<10}{'params':>8} | {'weights MB':>10}{'write s':>9}{'+fsync s':>9} | "
        f"{'full MB':>9}{'write s':>9}{'+fsync s':>9} | {'size x':>7}{'fsync x':>8}"
    )
    for name, params, res, has_opt, w_has_opt in rows:
        w, f = res["weights"], res["full"]
        wm, fm = w["bytes"] / 1e6, f["bytes"] / 1e6
        ww, wf = statistics.median(w["write"]), statistics.median(w["fsync"])
        fw, ff = statistics.median(f["write"]), statistics.median(f["fsync"])
        print(
            f"{name:<10}{params / 1e6:>7.1f}M | {wm:>10.1f}{ww:>9.3f}{wf:>9.3f} | "
            f"{fm:>9.1f}{fw:>9.3f}{ff:>9.3f} | {fm / wm:>7.2f}{ff / wf:>8.2f}"
        )
        assert has_opt and not w_has_opt, (
            "full must hold the optimiser state, weights-only must not"
        )
    print("weights = save_weights_only (best.ckpt, on improvement); full = resumable last.ckpt")


if __name__ == "__main__":
    main()
