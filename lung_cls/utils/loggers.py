"""Experiment loggers as this project configures them (``conf/logger/``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger


class QuietWandbLogger(WandbLogger):
    """Lightning's W&B logger without W&B's per-run console chatter when offline.

    - Lightning always hands ``anonymous=None`` to ``wandb.init``, which recent W&B versions answer
      with "The anonymous setting has no effect" once per run: the key is dropped when unset.
    - Offline, W&B's banner and closing summary ("Tracking run...", "Run data is saved locally...",
      "wandb sync ...", the run history) say nothing the README does not; ``quiet=true`` (the
      default) keeps them off the console. Online runs keep the line with the run's URL.
    """

    def __init__(self, *args: Any, quiet: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        if quiet and self._offline and "settings" not in self._wandb_init:
            self._wandb_init["settings"] = {"silent": True}


__all__ = ["QuietWandbLogger"]
