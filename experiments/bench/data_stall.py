"""Data stall: the share of training-step time spent waiting for batches, on the CPU path.

    python experiments/bench/data_stall.py [--sizes 64 224] [--epochs 3] [--limit-batches 8]
                                           [--backbone resnet18] [--n-perfusion 394 --n-ventilation 136]

Why: the data module keeps the prepared uint8 images as one tensor on the training device and
augments whole batches there (no DataLoader workers, nothing restarted per epoch). This checks
that claim in the real training loop. Two independent measurements, per image size:

1. **In the loop.** The real ``LungScanDataModule`` (phantom cohort, cached pre-processing) and
   ``LungClassifier`` under a Lightning ``Trainer`` with the CPU trainer's precision, timed by
   :class:`lung_cls.evaluation.timing.StepTimer`: data wait = time between one batch's end and the
   next batch's start (slice + uint8->float + on-device augmentation + Lightning's fetch), compute =
   forward + backward + optimiser. Epoch 0 is a warm-up and left out.
2. **Isolated.** The same loader's batches alone (slice+convert, then augmentation), alternated
   batch by batch with a plain training step on them, so both see the same machine load.

Target: data stall < 5 % of step time. The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
TARGET = 0.05


def compose_cfg(size: int, backbone: str, n_perf: int, n_vent: int, batch_size: int):
    """The real training config (CPU trainer, phantom data) at the given image size."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lung_cls.utils.hydra  # noqa: F401 - registers the cpu_precision resolver

    GlobalHydra.instance().clear()
    overrides = [
        "trainer=cpu",
        f"data.preprocess.size={size}",
        f"data.batch_size={batch_size}",
        f"data.n_perfusion={n_perf}",
        f"data.n_ventilation={n_vent}",
        "model=timm",
        f"model.backbone={backbone}",
        "model.pretrained=false",
        f"paths.output_dir={ROOT / 'outputs' / 'bench' / 'data_stall'}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def in_loop(cfg, epochs: int, limit_batches: int | None) -> dict:
    import hydra

    from lung_cls.data.datamodule import LungScanDataModule
    from lung_cls.evaluation.timing import StepTimer

    L.seed_everything(0, workers=True)
    dm = LungScanDataModule(cfg.data, cache_dir=cfg.paths.cache_dir, seed=0)
    model = hydra.utils.instantiate(cfg.model)
    timer = StepTimer(out="")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=epochs,
        limit_train_batches=limit_batches or 1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=dm)
    return timer.summarise()


def isolated(cfg, n_batches: int) -> dict:
    """Batch-by-batch alternation: [slice+convert], [augment], [train step], ..."""
    import hydra

    from lung_cls.data.datamodule import LungScanDataModule

    dm = LungScanDataModule(cfg.data, cache_dir=cfg.paths.cache_dir, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    augment, loader.augment = loader.augment, None  # time the two parts apart
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model)
    net = model.model
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    autocast = str(cfg.trainer.precision) == "bf16-mixed"
    gen = torch.Generator()
    fetch, aug, step = [], [], []
    it = iter(loader)
    for b in range(n_batches + 1):
        t0 = time.perf_counter()
        try:
            x, y, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, y, _ = next(it)
        t1 = time.perf_counter()
        gen.manual_seed(b)
        x = augment(x, generator=gen)
        t2 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = net(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t3 = time.perf_counter()
        if b:  # batch 0 is a warm-up
            fetch.append(t1 - t0)
            aug.append(t2 - t1)
            step.append(t3 - t2)
    f, a, s = (statistics.median(v) for v in (fetch, aug, step))
    return {
        "fetch_ms": 1e3 * f,
        "augment_ms": 1e3 * a,
        "step_ms": 1e3 * s,
        "stall": (f + a) / (f + a + s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--limit-batches", type=int, default=8, help="training batches per epoch (0 = all)"
    )
    parser.add_argument("--isolated-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-perfusion", type=int, default=394)
    parser.add_argument("--n-ventilation", type=int, default=136)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lung_cls"):
        logging.getLogger(name).setLevel(logging.ERROR)

    rows = []
    load0 = os.getloadavg()
    for size in args.sizes:
        cfg = compose_cfg(
            size, args.backbone, args.n_perfusion, args.n_ventilation, args.batch_size
        )
        loop = in_loop(cfg, args.epochs, args.limit_batches or None)
        iso = isolated(cfg, args.isolated_batches)
        rows.append((size, str(cfg.trainer.precision), loop, iso))
        print(f"size {size}: done", file=sys.stderr)
    load1 = os.getloadavg()

    print(
        f"backbone={args.backbone} batch={args.batch_size} threads={torch.get_num_threads()} "
        f"cohort={args.n_perfusion}+{args.n_ventilation} "
        f"load avg (1 min) {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"{'size':>5} {'precision':>10} | {'loop: data s':>12} {'compute s':>10} {'stall*':>7} | "
        f"{'iso: fetch ms':>13} {'augment ms':>10} {'step ms':>9} {'stall':>7} | target"
    )
    for size, prec, loop, iso in rows:
        print(
            f"{size:>5} {prec:>10} | {loop['data_seconds']:>12.3f} {loop['compute_seconds']:>10.3f} "
            f"{100 * loop['stall_fraction_after_first_epoch']:>6.2f}% | {iso['fetch_ms']:>13.2f} "
            f"{iso['augment_ms']:>10.2f} {iso['step_ms']:>9.1f} {100 * iso['stall']:>6.2f}% | "
            f"< {100 * TARGET:.0f} %"
        )
    print(
        "loop: seconds summed over all epochs; stall* = after the warm-up epoch. iso: medians per batch."
    )


if __name__ == "__main__":
    main()
