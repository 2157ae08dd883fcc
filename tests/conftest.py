"""Shared fixtures: compose the real Hydra config, tiny and offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose(overrides: list[str], config_name: str = "train"):
    """The real config, composed exactly as the CLI would, with the given overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lung_cls.utils.hydra  # noqa: F401 - registers resolvers

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A complete, tiny training run: 50 phantom images at 32 px, 2 epochs, csv logger."""
    return [
        "debug=tiny",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path.parent / 'cache'}",
        *extra,
    ]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str):
        return compose(tiny_overrides(tmp_path, *extra))

    return make


def lungs(size=256, off=(0.0, 0.0), rng=None, bridge=False, noise=True, shape=None):
    """Two Gaussian-blob 'lungs' whose midpoint sits ``off`` px from the image centre.

    ``bridge`` adds activity between them (a trachea-like band) so thresholding cannot split them.
    """
    h, w = shape or (size, size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy0, cx0 = (h - 1) / 2 + off[0], (w - 1) / 2 + off[1]
    s = size / 256
    img = np.zeros((h, w), np.float32)
    for side, amp in ((-1, 1.0), (1, 0.85)):
        cx = cx0 + side * 45 * s
        img += amp * np.exp(-((((yy - cy0) / (55 * s)) ** 2 + ((xx - cx) / (24 * s)) ** 2) ** 2))
    if bridge:
        img += 0.9 * np.exp(
            -((((yy - cy0 + 30 * s) / (45 * s)) ** 2 + ((xx - cx0) / (30 * s)) ** 2) ** 2)
        )
    img *= 1000
    if noise:
        rng = rng if rng is not None else np.random.default_rng(0)
        img = rng.poisson(img + 5).astype(np.float32)
    return img
