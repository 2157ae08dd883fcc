"""The run-dir contract: what one training job leaves behind, written and read in one place.

Train writes a run dir; the report, the sweep callback, the QA tool and the benchmarks read it.
They may run on other machines, later, on copies: so the names of the files and of the
``cams.npz`` arrays are fixed here once (:class:`RunFile`, :class:`CamKey`), every writer and
reader goes through this module, and :func:`find_run_dirs` is the one rule that says which folders
of a sweep are run dirs.

Layout of a run dir::

    <run_dir>/
      .hydra/config.yaml, .hydra/overrides.yaml   written by Hydra
      config_resolved.yaml                        the fully resolved config
      metrics.json                                status, metrics, data summary; written last
      predictions.csv                             PREDICTION_FIELDS, one row per val and test image
      cams.npz                                    CamKey arrays of every test image
      timing.json                                 seconds per phase (kept apart so that equal
                                                  runs give byte-identical metrics.json)
      step_timing.json                            data wait vs compute per step (StepTimer only)
      checkpoints/best.ckpt                       weights only, best validation epoch
      checkpoints/last.ckpt                       full state, with resumable=true

A ``metrics.json`` whose ``status`` is ``ok`` means the run dir is complete (it is written last,
atomically). A failed job writes ``status: failed | interrupted`` with its ``error``; a killed one
writes nothing, which readers report as ``incomplete``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from lung_cls.utils.io import atomic_savez, atomic_write_json, write_csv_atomic


class _StrEnum(str, Enum):
    """``enum.StrEnum`` for Python 3.10: members are their string values."""

    def __str__(self) -> str:
        return str(self.value)


class RunFile(_StrEnum):
    """Paths inside a run dir, relative to it."""

    CONFIG = "config_resolved.yaml"
    HYDRA_CONFIG = ".hydra/config.yaml"
    OVERRIDES = ".hydra/overrides.yaml"
    METRICS = "metrics.json"
    PREDICTIONS = "predictions.csv"
    CAMS = "cams.npz"
    TIMING = "timing.json"
    STEP_TIMING = "step_timing.json"  # evaluation.timing.StepTimer, when that callback is on
    BEST_CKPT = "checkpoints/best.ckpt"
    LAST_CKPT = "checkpoints/last.ckpt"


class CamKey(_StrEnum):
    """Arrays of ``cams.npz``; one entry per test image, in the same order in every array."""

    CAMS = "cams"  # float16 (N, H, W) in [0, 1]: Grad-CAM of the true class, at input resolution
    LABELS = "labels"  # int64 (N,): 1 perfusion, 0 ventilation
    IDS = "ids"  # str (N,): study ids, as in predictions.csv
    IMAGES = "images"  # uint8 (N, H, W): the pre-processed input
    PROBS = "probs"  # float32 (N,): P(perfusion)
    PREDS = "preds"  # int64 (N,): predicted label at 0.5


#: Prefix of the phantom's truth masks in ``cams.npz``: ``mask_<name>`` bool (N, H, W).
MASK_PREFIX = "mask_"


class Status(_StrEnum):
    OK = "ok"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    INCOMPLETE = "incomplete"  # no metrics.json: crashed, killed or still running


#: Columns of ``predictions.csv``.
PREDICTION_FIELDS: tuple[str, ...] = (
    "id",
    "path",
    "patient_id",
    "split",
    "label",
    "prob_perfusion",
    "pred",
    "subgroup",
)
"""``subgroup``: the image's category in the ``data.subgroup`` column (the manifest's column, or
the phantom's neck truth ``yes``/``no``); empty when the run had none. The column's name is in
``metrics.json`` ``data.subgroup.column``."""

#: Sub-folders of a run dir (or of a sweep dir) that never hold run dirs.
_NOT_RUN_DIRS = {".hydra", "checkpoints", "wandb", "csv", "tensorboard", "report", "__pycache__"}


def run_file(run_dir: str | os.PathLike, name: RunFile) -> Path:
    return Path(run_dir) / str(name)


# --------------------------------------------------------------------------- finding run dirs
def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder that a training job wrote into: it has a ``metrics.json``, or a Hydra config and
    no ``multirun.yaml`` (the top folder of a Hydra multirun is a sweep, not a run)."""
    path = Path(path)
    if (path / str(RunFile.METRICS)).is_file():
        return True
    return (path / str(RunFile.HYDRA_CONFIG)).is_file() and not (path / "multirun.yaml").is_file()


def find_run_dirs(
    sweep_dir: str | os.PathLike, exclude: str | os.PathLike | None = None
) -> list[Path]:
    """Every run dir under ``sweep_dir``, sorted; ``sweep_dir`` itself when it is a single run.

    A run dir is a folder with ``metrics.json`` or ``.hydra/config.yaml`` (a job that started but
    wrote no result yet still counts: readers report it as incomplete). A run dir's own
    sub-folders are not searched, nor are hidden folders or ``report/``; ``exclude`` (e.g. the
    report's output folder) is skipped with everything below it. Sweep dirs nest run dirs at any
    depth (a copied-back cluster sweep may hold several sweeps).
    """
    root = Path(sweep_dir)
    excluded = Path(exclude).resolve() if exclude is not None else None
    if not root.is_dir():
        return []
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for here, dirs, _files in os.walk(root):
        here_path = Path(here)
        if excluded is not None and here_path.resolve() == excluded:
            dirs[:] = []
            continue
        if here_path != root and is_run_dir(here_path):
            found.append(here_path)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUN_DIRS and not d.startswith("."))
    return sorted(found)


# --------------------------------------------------------------------------- metrics.json
def write_metrics(run_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """``metrics.json``, atomically; NaN/inf become null (valid JSON for every reader)."""
    return atomic_write_json(run_file(run_dir, RunFile.METRICS), metrics)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``metrics.json`` as a dict; None when there is none.

    Raises ``ValueError`` (naming the file) when it exists but is not a JSON object: a reader must
    be able to tell "not finished" from "broken".
    """
    path = run_file(run_dir, RunFile.METRICS)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def run_status(run_dir: str | os.PathLike) -> Status:
    """``ok``, ``failed``, ``interrupted`` or ``incomplete`` (no or unreadable metrics.json counts
    as failed only when the file exists)."""
    try:
        metrics = read_metrics(run_dir)
    except ValueError:
        return Status.FAILED
    if metrics is None:
        return Status.INCOMPLETE
    status = metrics.get("status")
    if status == Status.OK:
        return Status.OK
    if status == Status.INTERRUPTED:
        return Status.INTERRUPTED
    return Status.FAILED


def is_complete(run_dir: str | os.PathLike) -> bool:
    return run_status(run_dir) == Status.OK


# --------------------------------------------------------------------------- predictions.csv
def write_predictions(run_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    return write_csv_atomic(run_file(run_dir, RunFile.PREDICTIONS), rows, PREDICTION_FIELDS)


def read_predictions(run_dir: str | os.PathLike, split: str | None = None) -> Any:
    """``predictions.csv`` as a pandas DataFrame with typed columns (``split`` rows only if given).

    Raises ``FileNotFoundError`` when absent and ``ValueError`` (naming the file) when a required
    column is missing, a value does not parse, the split has no rows or an id repeats in it.
    """
    import pandas as pd

    path = run_file(run_dir, RunFile.PREDICTIONS)
    try:
        df = pd.read_csv(path, dtype={"id": str, "path": str, "patient_id": str, "split": str})
    except FileNotFoundError:
        raise
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    missing = {"id", "split", "label", "prob_perfusion"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    if split is not None:
        df = df[df["split"].astype(str) == split].copy()
        if df.empty:
            raise ValueError(f"{path}: no rows with split == {split!r}")
        if df["id"].duplicated().any():
            raise ValueError(f"{path}: duplicate {split} ids")
    if "subgroup" in df.columns:  # categories as written ("None", "NA" too); empty: no subgroup
        try:
            raw = pd.read_csv(path, usecols=["subgroup"], dtype=str, keep_default_na=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable ({err})") from None
        df["subgroup"] = raw["subgroup"].loc[df.index].to_numpy()
    try:
        df["label"] = df["label"].astype(np.int64)
        df["prob_perfusion"] = df["prob_perfusion"].astype(np.float64)
        if "pred" not in df.columns:
            df["pred"] = (df["prob_perfusion"] >= 0.5).astype(np.int64)
        df["pred"] = df["pred"].astype(np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: a value does not parse ({err})") from None
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------- cams.npz
def write_cams(
    run_dir: str | os.PathLike,
    *,
    cams: np.ndarray,
    labels: np.ndarray,
    ids: Sequence[str] | np.ndarray,
    images: np.ndarray,
    probs: np.ndarray,
    masks: Mapping[str, np.ndarray] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """``cams.npz`` with the :class:`CamKey` arrays, truth masks as ``mask_<name>``, and any
    ``extra`` arrays (their names must not clash with the contract's)."""
    probs = np.asarray(probs, dtype=np.float32)
    arrays: dict[str, np.ndarray] = {
        CamKey.CAMS.value: np.asarray(cams).astype(np.float16),
        CamKey.LABELS.value: np.asarray(labels).astype(np.int64),
        CamKey.IDS.value: np.asarray(ids).astype(str),
        CamKey.IMAGES.value: np.asarray(images, dtype=np.uint8),
        CamKey.PROBS.value: probs,
        CamKey.PREDS.value: (probs >= 0.5).astype(np.int64),
    }
    n = arrays[CamKey.CAMS.value].shape[0]
    for key, value in arrays.items():
        if value.shape[:1] != (n,):
            raise ValueError(f"cams.npz: {key} has {value.shape[:1]} entries, cams has {n}")
    for name, mask in (masks or {}).items():
        arrays[f"{MASK_PREFIX}{name}"] = np.asarray(mask, dtype=bool)
    for name, value in (extra or {}).items():
        if name in arrays or name.startswith(MASK_PREFIX):
            raise ValueError(f"cams.npz: extra array {name!r} clashes with the contract")
        arrays[name] = np.asarray(value)
    return atomic_savez(run_file(run_dir, RunFile.CAMS), **arrays)


def read_cams(run_dir_or_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of ``cams.npz`` (a run dir or the file itself), loaded into memory.

    Raises ``FileNotFoundError`` when absent and ``ValueError`` naming the file when it is not a
    readable npz or lacks ``cams``/``labels`` of matching length.
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / str(RunFile.CAMS)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    cams, labels = arrays.get(CamKey.CAMS.value), arrays.get(CamKey.LABELS.value)
    if cams is None or labels is None:
        raise ValueError(
            f"{path}: needs the arrays {CamKey.CAMS.value!r} and {CamKey.LABELS.value!r}"
        )
    if cams.ndim != 3 or labels.shape != (cams.shape[0],):
        raise ValueError(f"{path}: cams {cams.shape} and labels {labels.shape} do not match")
    return arrays


def masks_of(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The truth masks among ``cams.npz`` arrays: ``mask_<name>`` -> ``{name: bool (N, H, W)}``."""
    return {
        k[len(MASK_PREFIX) :]: np.asarray(v, dtype=bool)
        for k, v in arrays.items()
        if k.startswith(MASK_PREFIX)
    }


__all__ = [
    "MASK_PREFIX",
    "PREDICTION_FIELDS",
    "CamKey",
    "RunFile",
    "Status",
    "find_run_dirs",
    "is_complete",
    "is_run_dir",
    "masks_of",
    "read_cams",
    "read_metrics",
    "read_predictions",
    "run_file",
    "run_status",
    "write_cams",
    "write_metrics",
    "write_predictions",
]
