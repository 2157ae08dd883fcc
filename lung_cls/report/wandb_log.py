"""The report's figures and tables to W&B, next to the sweep's runs.

Offline by default (files under ``<report>/wandb``, ``wandb sync`` later), like the training
runs: the report must work on a machine without network and never lose its files to a W&B
problem, so the caller catches and notes every error from here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lung_cls.report.discover import RunRecord


def want_wandb(log_wandb: bool | None, runs: Sequence[RunRecord]) -> bool:
    """``log_wandb`` when given; else True when the runs logged to W&B and wandb is installed."""
    if log_wandb is not None:
        return bool(log_wandb)
    return (
        any((r.path / "wandb").is_dir() for r in runs)
        and importlib.util.find_spec("wandb") is not None
    )


def log_to_wandb(
    sweep_dir: Path,
    out_dir: Path,
    runs: Sequence[RunRecord],
    figures: Mapping[str, Path],
    tables: Mapping[str, pd.DataFrame],
) -> str:
    """Figures and tables to a W&B run in the sweep's project; returns a note saying where.

    Offline (files under ``out_dir/wandb``, ``wandb sync`` later) unless WANDB_API_KEY or WANDB_MODE
    says otherwise; the run is always finished, even when logging fails.
    """
    import wandb

    project = next((r.wandb_project for r in runs if r.wandb_project), None) or "lung_cls"
    mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )
    try:
        run = wandb.init(
            project=project,
            name=f"report-{sweep_dir.name}",
            job_type="report",
            dir=str(out_dir),
            mode=mode,
            config={"sweep_dir": str(sweep_dir)},
        )
        payload: dict[str, Any] = {k: wandb.Image(str(p)) for k, p in figures.items()}
        for name, df in tables.items():
            if not df.empty:
                payload[name] = wandb.Table(dataframe=df.astype(object).where(df.notna(), None))
        run.log(payload)
        return f"logged to W&B project '{project}' ({mode})"
    finally:
        wandb.finish()
