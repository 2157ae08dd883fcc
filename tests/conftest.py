"""Shared fixtures: compose the real Hydra config, tiny and offline."""

from __future__ import annotations

import os
from pathlib import Path

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
