"""The runs of a sweep, read from their run-dir files only, and the jobs that never ran.

Why only files: runs may come from any machine or launcher (local, joblib, SLURM), may have been
copied around, and some may have failed. Which folders are run dirs, and how ``metrics.json``,
``predictions.csv`` and ``cams.npz`` are read, is the run-dir contract of :mod:`lung_cls.runs`;
this module adds what only the report needs: the run's identity (model, seed) from its Hydra
files, its outcome in one word with the reason, the test metrics recomputed from the per-image
predictions, and the jobs a sweep asked for that left no run dir at all. Failed, unfinished and
missing runs are listed, never silently dropped.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lung_cls.errors import UserError
from lung_cls.report.paper import model_order
from lung_cls.runs import RunFile, Status, find_run_dirs, read_metrics, read_predictions

log = logging.getLogger(__name__)

#: Statuses of a :class:`RunRecord` (the report folds ``interrupted`` into ``failed``).
OK, FAILED, INCOMPLETE = Status.OK.value, Status.FAILED.value, Status.INCOMPLETE.value


class SweepNotFoundError(UserError, FileNotFoundError):
    """The sweep dir does not exist or holds no run dir: nothing to report.

    A ``FileNotFoundError`` too, so callers that caught that before the report had its own
    error class still do.
    """


@dataclass
class RunRecord:
    """Everything the report knows about one run dir, read from its files only."""

    name: str  # path relative to the sweep dir, e.g. "model=resnet18,seed=0"
    path: Path
    model: str
    seed: int | None
    status: str  # "ok" | "failed" | "incomplete"
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    test: pd.DataFrame | None = None  # test rows of predictions.csv
    test_metrics: dict[str, Any] | None = None  # recomputed from predictions.csv (or metrics.json)
    metrics_source: str = ""
    cams_path: Path | None = None
    wandb_project: str | None = None
    uses_wandb: bool = False
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- small readers
def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as err:
        log.warning("%s: unreadable YAML (%s)", path, err)
        return None


def parse_overrides(items: Any) -> dict[str, str]:
    """Hydra override strings ``key=value`` -> dict; ``+``/``++``/``~`` prefixes are dropped."""
    out: dict[str, str] = {}
    if not isinstance(items, list):
        return out
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            continue
        key, value = item.split("=", 1)
        out[key.lstrip("+~")] = value
    return out


def _log_tail(run_dir: Path, n_lines: int = 12) -> str | None:
    """The end of the run's newest ``*.log`` - from its last traceback if there is one."""
    logs = sorted(run_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    try:
        with open(logs[-1], "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 20000))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    start = max((i for i, ln in enumerate(lines) if "Traceback" in ln), default=None)
    tail = lines[start:] if start is not None else lines
    return f"{logs[-1].name}: " + "\n".join(tail[-n_lines:])


def reason(err: BaseException, path: str | os.PathLike) -> str:
    """The error's message without a leading ``<path>: `` (the caller names the file itself)."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


# --------------------------------------------------------------------------- one run
def _read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config, else Hydra's own copy; {} when neither is a readable mapping."""
    for name in (RunFile.CONFIG, RunFile.HYDRA_CONFIG):
        path = run_dir / str(name)
        if path.exists():
            config = _read_yaml(path)
            if isinstance(config, dict):
                return config
    return {}


def _read_outcome(run_dir: Path) -> tuple[dict[str, Any] | None, str, str | None]:
    """``(metrics, status, error)``: ok, failed (with the job's error or its log's traceback) or
    incomplete (no ``metrics.json``: crashed, killed or still running)."""
    try:
        metrics = read_metrics(run_dir)
    except ValueError as err:  # exists but is not a JSON object
        return None, FAILED, str(err)
    if metrics is None:
        error = (
            _log_tail(run_dir)
            or "no metrics.json: the job did not finish (crashed, killed or still running)"
        )
        return None, INCOMPLETE, error
    if metrics.get("status") == OK:
        return metrics, OK, None
    error = metrics.get("error") or _log_tail(run_dir) or f"status {metrics.get('status')!r}"
    return metrics, FAILED, error


def _model_and_seed(
    metrics: Mapping[str, Any] | None, overrides: Mapping[str, str], config: Mapping[str, Any]
) -> tuple[str, int | None]:
    """Model name and seed: from metrics.json, else the overrides, else the config."""
    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    name = model_cfg.get("name")
    model = (
        (metrics or {}).get("model")
        or overrides.get("model")
        or (name if isinstance(name, str) and "${" not in name else None)
        or "unknown"
    )
    seed_val = (metrics or {}).get("seed", overrides.get("seed", config.get("seed")))
    try:
        seed = int(seed_val) if seed_val is not None else None
    except (TypeError, ValueError):
        seed = None
    return str(model), seed


def _disagreements(stored: Mapping[str, Any], recomputed: Mapping[str, Any]) -> list[str]:
    """Notes where metrics.json's test numbers differ from those recomputed per image."""
    notes = []
    for key in ("acc", "auc"):
        a, b = stored.get(key), recomputed.get(key)
        if isinstance(a, int | float) and isinstance(b, float) and math.isfinite(b):
            if abs(float(a) - b) > 1e-6:
                notes.append(
                    f"test {key} in metrics.json ({a:.4f}) differs from predictions.csv ({b:.4f}); "
                    "the report uses predictions.csv"
                )
    return notes


def _load_test_predictions(run: RunRecord) -> None:
    """Test rows of ``predictions.csv`` and the metrics recomputed from them (kept on ``run``).

    Without usable per-image predictions the metrics.json test numbers stand in (the run is then
    left out of everything that pools images); without those either, the run counts as failed.
    """
    from lung_cls.evaluation.metrics import binary_metrics

    path = run.path / str(RunFile.PREDICTIONS)
    fallback = (run.metrics or {}).get("test")
    try:
        test = read_predictions(run.path, split="test")
        run.test_metrics = binary_metrics(
            test["label"].to_numpy(),
            test["prob_perfusion"].to_numpy(),
            pred=test["pred"].to_numpy(),
        )
    except FileNotFoundError:
        problem = f"{path}: missing"
    except ValueError as err:
        problem = f"{path}: unusable ({reason(err, path)})"
    else:
        run.test = test
        run.metrics_source = "predictions.csv"
        if isinstance(fallback, Mapping):
            run.notes.extend(_disagreements(fallback, run.test_metrics))
        return
    if isinstance(fallback, Mapping):
        run.test_metrics = dict(fallback)
        run.metrics_source = "metrics.json"
        run.notes.append(
            f"{problem}; using the metrics.json test numbers (this run is left out of pooling, "
            "ROC pooling and model comparisons)"
        )
    else:
        run.status = FAILED
        run.error = f"{problem}, and metrics.json has no 'test' section: nothing to report"


def read_run(sweep_dir: Path, run_dir: Path) -> RunRecord:
    """One run dir as a :class:`RunRecord`; never raises for what is inside the dir."""
    ov_path = run_dir / str(RunFile.OVERRIDES)
    overrides = parse_overrides(_read_yaml(ov_path)) if ov_path.exists() else {}
    config = _read_config(run_dir)
    metrics, status, error = _read_outcome(run_dir)
    model, seed = _model_and_seed(metrics, overrides, config)
    logger_cfg = config.get("logger") if isinstance(config.get("logger"), dict) else {}
    wandb_cfg = logger_cfg.get("wandb") if isinstance(logger_cfg.get("wandb"), dict) else {}
    project = wandb_cfg.get("project")
    run = RunRecord(
        name=run_dir.relative_to(sweep_dir).as_posix() if run_dir != sweep_dir else run_dir.name,
        path=run_dir,
        model=model,
        seed=seed,
        status=status,
        error=error,
        overrides=overrides,
        metrics=metrics,
        wandb_project=project if isinstance(project, str) else None,
        uses_wandb=(run_dir / "wandb").is_dir() or bool(wandb_cfg),
    )
    if status == OK:
        _load_test_predictions(run)
        cams = run_dir / str(RunFile.CAMS)
        run.cams_path = cams if cams.exists() else None
    return run


def discover_runs(sweep_dir: str | Path, exclude: str | Path | None = None) -> list[RunRecord]:
    """Every run dir under ``sweep_dir`` (:func:`lung_cls.runs.find_run_dirs`), read from its files."""
    sweep = Path(sweep_dir)
    return [read_run(sweep, d) for d in find_run_dirs(sweep, exclude=exclude)]


# --------------------------------------------------------------------------- the whole sweep
def _expand_sweep_values(value: str) -> list[str] | None:
    """Values of a simple Hydra sweep override: ``a,b,c`` or ``range(a,b[,step])``; else None."""
    value = value.strip()
    m = re.fullmatch(r"range\((-?\d+)\s*,\s*(-?\d+)(?:\s*,\s*(-?\d+))?\)", value)
    if m:
        start, stop, step = int(m[1]), int(m[2]), int(m[3] or 1)
        return [str(v) for v in range(start, stop, step)] if step else None
    if any(ch in value for ch in "()[]{}*"):
        return None
    return [v.strip() for v in value.split(",")]


def _swept_values(sweep_dir: Path) -> dict[str, list[str]] | None:
    """``{key: values}`` of every key the sweep (``multirun.yaml``) swept over more than one
    value; None when there is no such file or a sweep syntax is not expanded here."""
    path = sweep_dir / "multirun.yaml"
    cfg = _read_yaml(path) if path.exists() else None
    hydra_cfg = cfg.get("hydra") if isinstance(cfg, dict) else None
    if not isinstance(hydra_cfg, dict):
        return None
    requested: dict[str, str] = {}
    # Sweeps declared in the config (hydra.sweeper.params), then those on the command line.
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    if isinstance(params, dict):
        requested.update({str(k): str(v) for k, v in params.items()})
    requested.update(parse_overrides((hydra_cfg.get("overrides") or {}).get("task")))
    swept: dict[str, list[str]] = {}
    for key, value in requested.items():
        if key.startswith("hydra"):
            continue
        values = _expand_sweep_values(value)
        if values is None:
            return None  # a sweep syntax we do not expand: do not guess
        if len(values) > 1:
            swept[key] = values
    return swept


def missing_jobs(sweep_dir: Path, runs: Sequence[RunRecord]) -> list[str]:
    """Jobs the sweep asked for (``multirun.yaml``) that have no run dir at all."""
    swept = _swept_values(sweep_dir)
    if not swept:
        return []
    keys = sorted(swept)
    found = {tuple(r.overrides.get(k) for k in keys) for r in runs}
    return [
        ",".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True))
        for combo in itertools.product(*(swept[k] for k in keys))
        if combo not in found
    ]


def runs_by_model(runs: Sequence[RunRecord], notes: list[str]) -> dict[str, list[RunRecord]]:
    """The finished runs with test metrics, per model (paper order), each sorted by seed.

    Runs that share a seed are all counted, with a note: a re-run copied next to the original
    would otherwise weigh twice without anyone noticing.
    """
    ok_runs = [r for r in runs if r.status == OK and r.test_metrics is not None]
    grouped = {
        m: sorted(
            (r for r in ok_runs if r.model == m), key=lambda r: (r.seed is None, r.seed, r.name)
        )
        for m in model_order(r.model for r in ok_runs)
    }
    for m, rs in grouped.items():
        seeds = [r.seed for r in rs]
        # Cross-validation folds (data.split.fold) of one seed are different test sets, not re-runs.
        keys = [(r.seed, r.overrides.get("data.split.fold")) for r in rs]
        if len(set(keys)) != len(keys):
            notes.append(f"{m}: several runs share a seed ({seeds}); all are counted")
    return grouped
