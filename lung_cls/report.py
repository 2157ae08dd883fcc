"""A whole sweep -> the paper's Table 1, Figs. 2-4, model comparisons and one HTML report.

``python -m lung_cls.report sweep_dir=outputs/train/multiruns/<date>`` (Hydra CLI, ``conf/report.yaml``)
or :func:`build_report` from Python; the sweep's Hydra callback runs it when a multirun ends.

Why it reads only run-dir files (``metrics.json``, ``predictions.csv``, ``cams.npz``,
``.hydra/overrides.yaml``, ``config_resolved.yaml``, ``*.log``): runs may come from any machine or
launcher (local, joblib, SLURM), may have been copied around, and some may have failed. The report
never re-runs a model; every number is recomputed from the stored per-image predictions and maps
with the pure functions in :mod:`lung_cls.evaluation`, so the same files always give the same
report. Failed, unfinished and missing runs are listed, never silently dropped.

Outputs in ``<sweep_dir>/report/``: ``table1.md/.csv``, ``fig2_average_cams.png``,
``fig3_cam_statistics.png``, ``fig4_roc.png``, ``model_comparison.md/.csv``,
``cam_groundtruth.md/.csv`` (phantom truth masks only), ``report.json`` and ``report.html`` (one
self-contained file).
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

log = logging.getLogger(__name__)

__all__ = ["PAPER_TABLE1", "RunRecord", "build_report", "discover_runs", "main"]

#: Paper Table 1 (mean of 5 repetitions): acc, F1, sensitivity, specificity in %, AUC as a fraction.
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "vgg16": {
        "label": "VGG-16",
        "acc": 89.5,
        "f1": 88.6,
        "sensitivity": 82.0,
        "specificity": 97.0,
        "auc": 0.95,
    },
    "resnet18": {
        "label": "ResNet-18",
        "acc": 92.0,
        "f1": 91.6,
        "sensitivity": 87.0,
        "specificity": 97.0,
        "auc": 0.98,
    },
    "seresnext101": {
        "label": "SE-ResNeXt-101",
        "acc": 98.5,
        "f1": 98.5,
        "sensitivity": 99.0,
        "specificity": 98.0,
        "auc": 0.99,
    },
    "inception_resnet_v2": {
        "label": "Inception-ResNet-v2",
        "acc": 98.5,
        "f1": 98.5,
        "sensitivity": 99.0,
        "specificity": 98.0,
        "auc": 0.99,
    },
}
#: The metrics of Table 1; all but AUC are shown in percent.
TABLE_METRICS: tuple[str, ...] = ("acc", "f1", "sensitivity", "specificity", "auc")
PCT_METRICS: tuple[str, ...] = ("acc", "f1", "sensitivity", "specificity")
_METRIC_LABEL = {
    "acc": "Accuracy (%)",
    "f1": "F1 (%)",
    "sensitivity": "Sensitivity (%)",
    "specificity": "Specificity (%)",
    "auc": "AUC",
}
#: Truth masks that carry each class's evidence (label -> names); absent names are skipped.
GT_FEATURE_MAP: dict[int, list[str]] = {
    0: ["trachea", "hotspots", "oropharynx", "esophagus", "stomach"],
    1: ["heart", "lungs"],
}
_RUN_SKIP_DIRS = {".hydra", "checkpoints", "wandb", "csv", "tensorboard", "report", "__pycache__"}


# --------------------------------------------------------------------------- run discovery
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


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as err:
        log.warning("%s: unreadable YAML (%s)", path, err)
        return None


def _parse_overrides(items: Any) -> dict[str, str]:
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


def _find_run_dirs(sweep_dir: Path, exclude: Path | None) -> list[Path]:
    """Dirs holding ``metrics.json`` or ``.hydra/``; a run dir's own sub-folders are not searched."""
    found: list[Path] = []
    for root, dirs, files in os.walk(sweep_dir):
        here = Path(root)
        if exclude is not None and (here == exclude or exclude in here.parents):
            dirs[:] = []
            continue
        if "metrics.json" in files or ".hydra" in dirs:
            # The sweep dir itself only counts when it is a single run (has metrics or a config).
            if (
                here != sweep_dir
                or "metrics.json" in files
                or (here / ".hydra/config.yaml").exists()
            ):
                found.append(here)
                dirs[:] = []
                continue
        dirs[:] = sorted(d for d in dirs if d not in _RUN_SKIP_DIRS and not d.startswith("."))
    return sorted(found)


def _load_test_predictions(run: RunRecord) -> None:
    """Test rows of ``predictions.csv`` and the metrics recomputed from them (kept on ``run``)."""
    from lung_cls.evaluation.metrics import binary_metrics

    path = run.path / "predictions.csv"
    fallback = (run.metrics or {}).get("test")
    if path.exists():
        try:
            df = pd.read_csv(path, dtype={"id": str, "path": str, "patient_id": str, "split": str})
            missing = {"id", "split", "label", "prob_perfusion"} - set(df.columns)
            if missing:
                raise ValueError(f"missing columns {sorted(missing)}")
            test = df[df["split"].astype(str) == "test"].copy()
            if test.empty:
                raise ValueError("no rows with split == 'test'")
            test["label"] = test["label"].astype(np.int64)
            test["prob_perfusion"] = test["prob_perfusion"].astype(np.float64)
            if "pred" not in test.columns:
                test["pred"] = (test["prob_perfusion"] >= 0.5).astype(np.int64)
            test["pred"] = test["pred"].astype(np.int64)
            if test["id"].duplicated().any():
                raise ValueError("duplicate test ids")
            run.test = test.reset_index(drop=True)
            run.test_metrics = binary_metrics(
                test["label"].to_numpy(),
                test["prob_perfusion"].to_numpy(),
                pred=test["pred"].to_numpy(),
            )
            run.metrics_source = "predictions.csv"
            if isinstance(fallback, Mapping):
                for key in ("acc", "auc"):
                    a, b = fallback.get(key), run.test_metrics.get(key)
                    if isinstance(a, int | float) and isinstance(b, float) and math.isfinite(b):
                        if abs(float(a) - b) > 1e-6:
                            run.notes.append(
                                f"test {key} in metrics.json ({a:.4f}) differs from predictions.csv ({b:.4f}); "
                                "the report uses predictions.csv"
                            )
            return
        except (OSError, ValueError, pd.errors.ParserError) as err:
            problem = f"{path}: unusable ({err})"
    else:
        problem = f"{path}: missing"
    if isinstance(fallback, Mapping):
        run.test_metrics = dict(fallback)
        run.metrics_source = "metrics.json"
        run.notes.append(
            f"{problem}; using the metrics.json test numbers (this run is left out of pooling, "
            "ROC pooling and model comparisons)"
        )
    else:
        run.status = "failed"
        run.error = f"{problem}, and metrics.json has no 'test' section: nothing to report"


def _read_run(sweep_dir: Path, run_dir: Path) -> RunRecord:
    ov_path = run_dir / ".hydra" / "overrides.yaml"
    overrides = _parse_overrides(_read_yaml(ov_path)) if ov_path.exists() else {}
    config = None
    for cfg_path in (run_dir / "config_resolved.yaml", run_dir / ".hydra" / "config.yaml"):
        if cfg_path.exists():
            config = _read_yaml(cfg_path)
            if isinstance(config, dict):
                break
    config = config if isinstance(config, dict) else {}

    metrics: dict[str, Any] | None = None
    status, error = "incomplete", None
    mpath = run_dir / "metrics.json"
    if mpath.exists():
        try:
            with open(mpath, encoding="utf-8") as fh:
                metrics = json.load(fh)
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
            status = "ok" if metrics.get("status") == "ok" else "failed"
            if status == "failed":
                error = (
                    metrics.get("error")
                    or _log_tail(run_dir)
                    or f"status {metrics.get('status')!r}"
                )
        except (OSError, ValueError) as err:
            metrics, status = None, "failed"
            error = f"{mpath}: unreadable ({err})"
    else:
        error = (
            _log_tail(run_dir)
            or "no metrics.json: the job did not finish (crashed, killed or still running)"
        )

    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    model = (
        (metrics or {}).get("model")
        or overrides.get("model")
        or (
            model_cfg.get("name")
            if isinstance(model_cfg.get("name"), str) and "${" not in model_cfg.get("name")
            else None
        )
        or "unknown"
    )
    seed_val = (metrics or {}).get("seed", overrides.get("seed", config.get("seed")))
    try:
        seed = int(seed_val) if seed_val is not None else None
    except (TypeError, ValueError):
        seed = None
    logger_cfg = config.get("logger") if isinstance(config.get("logger"), dict) else {}
    wandb_cfg = logger_cfg.get("wandb") if isinstance(logger_cfg.get("wandb"), dict) else {}
    rel = run_dir.relative_to(sweep_dir).as_posix() if run_dir != sweep_dir else run_dir.name
    run = RunRecord(
        name=rel,
        path=run_dir,
        model=str(model),
        seed=seed,
        status=status,
        error=error,
        overrides=overrides,
        metrics=metrics,
        wandb_project=wandb_cfg.get("project")
        if isinstance(wandb_cfg.get("project"), str)
        else None,
        uses_wandb=(run_dir / "wandb").is_dir() or bool(wandb_cfg),
    )
    if status == "ok":
        _load_test_predictions(run)
        cams = run_dir / "cams.npz"
        run.cams_path = cams if cams.exists() else None
    return run


def discover_runs(sweep_dir: str | Path, exclude: str | Path | None = None) -> list[RunRecord]:
    """Every run dir under ``sweep_dir`` (found by ``metrics.json`` or ``.hydra/``), read from its files."""
    sweep = Path(sweep_dir)
    excl = Path(exclude) if exclude is not None else None
    return [_read_run(sweep, d) for d in _find_run_dirs(sweep, excl)]


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


def _missing_jobs(sweep_dir: Path, runs: Sequence[RunRecord]) -> list[str]:
    """Jobs the sweep asked for (``multirun.yaml``) that have no run dir at all."""
    cfg = (
        _read_yaml(sweep_dir / "multirun.yaml") if (sweep_dir / "multirun.yaml").exists() else None
    )
    hydra_cfg = cfg.get("hydra") if isinstance(cfg, dict) else None
    if not isinstance(hydra_cfg, dict):
        return []
    requested: dict[str, str] = {}
    # Sweeps declared in the config (hydra.sweeper.params), then those on the command line.
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    if isinstance(params, dict):
        requested.update({str(k): str(v) for k, v in params.items()})
    requested.update(_parse_overrides((hydra_cfg.get("overrides") or {}).get("task")))
    swept: dict[str, list[str]] = {}
    for key, value in requested.items():
        if key.startswith("hydra"):
            continue
        values = _expand_sweep_values(value)
        if values is None:
            return []  # a sweep syntax we do not expand: do not guess
        if len(values) > 1:
            swept[key] = values
    if not swept:
        return []
    keys = sorted(swept)
    found = {tuple(r.overrides.get(k) for k in keys) for r in runs}
    missing = []
    for combo in itertools.product(*(swept[k] for k in keys)):
        if combo not in found:
            missing.append(",".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)))
    return missing


# --------------------------------------------------------------------------- small helpers
def _model_order(models: Iterable[str]) -> list[str]:
    """The paper's order first (VGG-16, ResNet-18, SE-ResNeXt-101, Inception-ResNet-v2), then A-Z."""
    models = list(dict.fromkeys(models))
    paper = [m for m in PAPER_TABLE1 if m in models]
    return paper + sorted(m for m in models if m not in PAPER_TABLE1)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and math.isfinite(float(x))


def _fmt(x: Any, digits: int = 1) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "-"


def _fmt_p(p: Any) -> str:
    if not _finite(p):
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _jsonable(obj: Any) -> Any:
    """Strict-JSON copy: nan/inf -> None, numpy -> Python, Paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer | np.bool_):
        return obj.item()
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _df_to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table without the optional ``tabulate`` dependency."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- Table 1
def _table1(
    runs_by_model: Mapping[str, list[RunRecord]], n_boot: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Per model: mean +- SD over seeds, the paper's values, pooled metrics with bootstrap CIs."""
    from lung_cls.evaluation.metrics import (
        binary_metrics,
        bootstrap_ci,
        pool_confusion,
        summarise_seeds,
    )

    rows, md_rows, pooled_rows, details = [], [], [], {}
    for model, runs in runs_by_model.items():
        per_run = [
            {k: r.test_metrics.get(k, math.nan) for k in (*TABLE_METRICS, "ppv", "npv")}
            for r in runs
        ]
        per_run = [
            {k: (float(v) if _finite(v) else math.nan) for k, v in d.items()} for d in per_run
        ]
        summary = summarise_seeds(per_run)
        paper = PAPER_TABLE1.get(model, {})
        row: dict[str, Any] = {
            "model": model,
            "paper_model": paper.get("label", ""),
            "n_runs": len(runs),
            "seeds": " ".join(str(r.seed) for r in runs),
        }
        for key in TABLE_METRICS:
            scale = 100.0 if key in PCT_METRICS else 1.0
            unit = "_pct" if key in PCT_METRICS else ""
            mean, sd = summary.get(key, (math.nan, math.nan))
            row[f"{key}{unit}_mean"] = mean * scale
            row[f"{key}{unit}_sd"] = sd * scale
            row[f"paper_{key}{unit}"] = paper.get(key, math.nan)

        pooled_runs = [r for r in runs if r.test is not None]
        pooled: dict[str, Any] = {}
        if pooled_runs:
            df = pd.concat([r.test for r in pooled_runs], ignore_index=True)
            y = df["label"].to_numpy()
            p = df["prob_perfusion"].to_numpy()
            pooled = binary_metrics(y, p, pred=df["pred"].to_numpy())
            if len(np.unique(y)) == 2 and n_boot > 0:
                pooled["ci95"] = bootstrap_ci(y, p, n_boot=n_boot, seed=seed, stratified=True)
            pooled["n_runs"] = len(pooled_runs)
            pooled["n_unique_images"] = int(df["id"].nunique())
        row["pooled_n"] = pooled.get("n", 0)
        row["pooled_unique_images"] = pooled.get("n_unique_images", 0)
        for key in TABLE_METRICS:
            scale = 100.0 if key in PCT_METRICS else 1.0
            unit = "_pct" if key in PCT_METRICS else ""
            lo, hi = (pooled.get("ci95") or {}).get(key, [math.nan, math.nan])
            row[f"pooled_{key}{unit}"] = pooled.get(key, math.nan) * scale if pooled else math.nan
            row[f"pooled_{key}{unit}_lo"] = lo * scale if _finite(lo) else math.nan
            row[f"pooled_{key}{unit}_hi"] = hi * scale if _finite(hi) else math.nan
        rows.append(row)

        md: dict[str, Any] = {"Model": model, "Runs": len(runs)}
        for key in TABLE_METRICS:
            unit = "_pct" if key in PCT_METRICS else ""
            digits = 1 if key in PCT_METRICS else 3
            sd = row[f"{key}{unit}_sd"]
            md[_METRIC_LABEL[key]] = (
                f"{_fmt(row[f'{key}{unit}_mean'], digits)} ± {_fmt(sd, digits)}"
            )
            md[f"paper {key}"] = _fmt(row[f"paper_{key}{unit}"], 1 if key in PCT_METRICS else 2)
        md_rows.append(md)
        pmd: dict[str, Any] = {
            "Model": model,
            "Runs pooled": pooled.get("n_runs", 0),
            "Rows (distinct images)": f"{row['pooled_n']} ({row['pooled_unique_images']})",
        }
        for key in TABLE_METRICS:
            unit = "_pct" if key in PCT_METRICS else ""
            digits = 1 if key in PCT_METRICS else 3
            pmd[f"{_METRIC_LABEL[key]} [95% CI]"] = (
                f"{_fmt(row[f'pooled_{key}{unit}'], digits)} "
                f"[{_fmt(row[f'pooled_{key}{unit}_lo'], digits)}, {_fmt(row[f'pooled_{key}{unit}_hi'], digits)}]"
            )
        pooled_rows.append(pmd)
        cms = [
            r.test_metrics for r in runs if isinstance(r.test_metrics.get("confusion_matrix"), list)
        ]
        details[model] = {
            "runs": [
                {
                    "run": r.name,
                    "seed": r.seed,
                    "source": r.metrics_source,
                    **{
                        k: r.test_metrics.get(k)
                        for k in (*TABLE_METRICS, "ppv", "npv", "n", "confusion_matrix")
                    },
                }
                for r in runs
            ],
            "mean_sd": {k: list(v) for k, v in summary.items()},
            "pooled": {k: v for k, v in pooled.items() if k != "notes"},
            "confusion_matrix_sum": pool_confusion(cms) if cms else None,
            "paper": paper,
        }
    return pd.DataFrame(rows), pd.DataFrame(md_rows), pd.DataFrame(pooled_rows), details


# --------------------------------------------------------------------------- ROC
def _roc_curves(runs_by_model: Mapping[str, list[RunRecord]]) -> tuple[dict, dict, dict]:
    from lung_cls.evaluation.metrics import auc_score, roc_points

    curves: dict[str, list[tuple[list[float], list[float], float]]] = {}
    pooled: dict[str, tuple[list[float], list[float], float]] = {}
    info: dict[str, Any] = {}
    for model, runs in runs_by_model.items():
        per_seed = []
        for r in runs:
            if r.test is not None and r.test["label"].nunique() == 2:
                roc = roc_points(r.test["label"].to_numpy(), r.test["prob_perfusion"].to_numpy())
                auc = auc_score(r.test["label"].to_numpy(), r.test["prob_perfusion"].to_numpy())
            else:
                roc = (r.metrics or {}).get("test", {}).get("roc")
                auc = r.test_metrics.get("auc", math.nan)
                if not isinstance(roc, Mapping) or "fpr" not in roc:
                    continue
            per_seed.append(
                (list(roc["fpr"]), list(roc["tpr"]), float(auc) if _finite(auc) else math.nan)
            )
        if per_seed:
            curves[model] = per_seed
        frames = [r.test for r in runs if r.test is not None]
        if frames:
            df = pd.concat(frames, ignore_index=True)
            if df["label"].nunique() == 2:
                y, p = df["label"].to_numpy(), df["prob_perfusion"].to_numpy()
                roc = roc_points(y, p)
                pooled[model] = (roc["fpr"], roc["tpr"], auc_score(y, p))
        info[model] = {
            "auc_per_seed": [c[2] for c in per_seed],
            "auc_pooled": pooled[model][2] if model in pooled else None,
        }
    return curves, pooled, info


# --------------------------------------------------------------------------- model comparison
def _per_image(runs: Sequence[RunRecord]) -> pd.DataFrame | None:
    """Mean-over-seeds probability and majority-vote prediction per test image id."""
    frames = [r.test[["id", "label", "prob_perfusion", "pred"]] for r in runs if r.test is not None]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    g = df.groupby("id", sort=True)
    out = pd.DataFrame(
        {
            "label": g["label"].first(),
            "label_consistent": g["label"].nunique() == 1,
            "prob": g["prob_perfusion"].mean(),
            "vote": g["pred"].mean(),
            "n_runs": g.size(),
        }
    )
    # Majority vote of the runs' predictions; an exact tie goes to the mean probability.
    out["pred"] = np.where(
        out["vote"] > 0.5, 1, np.where(out["vote"] < 0.5, 0, (out["prob"] >= 0.5).astype(int))
    )
    return out


def _model_comparison(
    runs_by_model: Mapping[str, list[RunRecord]],
) -> tuple[pd.DataFrame, list[str]]:
    from lung_cls.evaluation.stats import delong_test, holm, mcnemar_test

    notes: list[str] = []
    per_image = {m: _per_image(rs) for m, rs in runs_by_model.items()}
    rows: list[dict[str, Any]] = []
    for a, b in itertools.combinations(list(runs_by_model), 2):
        row: dict[str, Any] = {"model_a": a, "model_b": b}
        da, db = per_image[a], per_image[b]
        if da is None or db is None:
            row["note"] = "no per-image predictions for one model"
            rows.append(row)
            continue
        common = da.index.intersection(db.index)
        note = []
        if len(common) != len(da) or len(common) != len(db):
            note.append(
                f"test sets differ: compared on the {len(common)} common ids (of {len(da)} / {len(db)})"
            )
        if len(common) == 0:
            row["note"] = "test sets differ: no common test image ids; not compared"
            rows.append(row)
            continue
        ja, jb = da.loc[common], db.loc[common]
        if not (ja["label"].to_numpy() == jb["label"].to_numpy()).all() or not (
            ja["label_consistent"].all() and jb["label_consistent"].all()
        ):
            row["note"] = "labels of the same ids disagree between runs; not compared"
            rows.append(row)
            continue
        y = ja["label"].to_numpy().astype(int)
        row["n_images"] = int(len(common))
        try:
            d = delong_test(y, ja["prob"].to_numpy(), jb["prob"].to_numpy())
            row.update(
                auc_a=d["auc_a"],
                auc_b=d["auc_b"],
                auc_diff=d["diff"],
                auc_diff_lo=d["ci95"][0],
                auc_diff_hi=d["ci95"][1],
                delong_z=d["z"],
                delong_p=d["p"],
            )
        except ValueError as err:
            note.append(f"DeLong not computed: {err}")
        m = mcnemar_test(y, ja["pred"].to_numpy().astype(int), jb["pred"].to_numpy().astype(int))
        row.update(
            acc_a=float((ja["pred"].to_numpy() == y).mean()),
            acc_b=float((jb["pred"].to_numpy() == y).mean()),
            mcnemar_b=m["b"],
            mcnemar_c=m["c"],
            mcnemar_stat=m["statistic"],
            mcnemar_p=m["p"],
            mcnemar_method=m["method"],
        )
        row["note"] = "; ".join(note)
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("delong_p", "mcnemar_p"):
        if col not in df.columns:
            df[col] = np.nan
        ok = df[col].apply(_finite)
        adj = pd.Series(np.nan, index=df.index)
        if ok.any():
            adj[ok] = holm(df.loc[ok, col].astype(float).to_numpy())
        df[f"{col}_holm"] = adj
    if len(runs_by_model) < 2:
        notes.append("only one model: no pairwise comparison")
    return df, notes


# --------------------------------------------------------------------------- CAMs
@dataclass
class _ModelCams:
    cams: np.ndarray  # float32 (N, H, W), pooled over seeds
    labels: np.ndarray
    ids: np.ndarray
    images: np.ndarray | None
    masks: dict[str, np.ndarray]
    n_runs: int


def _load_model_cams(runs: Sequence[RunRecord], notes: list[str]) -> _ModelCams | None:
    """All runs' test CAMs of one model, pooled over seeds (the paper's CAM sets)."""
    from lung_cls.evaluation.groundtruth import masks_from_npz

    cams, labels, ids, images, masks, n_runs = [], [], [], [], [], 0
    shape = None
    for r in runs:
        if r.cams_path is None:
            continue
        try:
            with np.load(r.cams_path, allow_pickle=False) as z:
                c = np.asarray(z["cams"], dtype=np.float32)
                lab = np.asarray(z["labels"]).astype(np.int64)
                if c.ndim != 3 or lab.shape != (c.shape[0],):
                    raise ValueError(f"cams {c.shape} / labels {lab.shape} do not match")
                if shape is not None and c.shape[1:] != shape:
                    raise ValueError(
                        f"map size {c.shape[1:]} differs from the model's other runs {shape}"
                    )
                shape = c.shape[1:]
                cams.append(np.clip(np.nan_to_num(c), 0.0, 1.0))
                labels.append(lab)
                ids.append(
                    np.asarray(z["ids"]).astype(str)
                    if "ids" in z
                    else np.array([f"{r.name}:{i}" for i in range(len(c))])
                )
                images.append(
                    np.asarray(z["images"])
                    if "images" in z and z["images"].shape == c.shape
                    else None
                )
                masks.append(masks_from_npz(z))
                n_runs += 1
        except (OSError, ValueError, KeyError) as err:
            notes.append(f"{r.cams_path}: not used ({err})")
    if not cams:
        return None
    common = set.intersection(*(set(m) for m in masks)) if masks else set()
    if any(set(m) != common for m in masks):
        notes.append(
            f"truth masks differ between runs of {runs[0].model}; using the shared ones {sorted(common)}"
        )
    return _ModelCams(
        cams=np.concatenate(cams),
        labels=np.concatenate(labels),
        ids=np.concatenate(ids),
        images=np.concatenate(images) if all(i is not None for i in images) else None,
        masks={k: np.concatenate([m[k] for m in masks]) for k in sorted(common)},
        n_runs=n_runs,
    )


def _mean_images(model_cams: Mapping[str, _ModelCams]) -> dict[str, np.ndarray]:
    """Per-class average test image over unique image ids (the first model with images)."""
    from lung_cls.evaluation.groundtruth import CLASS_NAMES

    for mc in model_cams.values():
        if mc.images is None:
            continue
        _, first = np.unique(mc.ids, return_index=True)
        out = {}
        for label in (1, 0):
            sel = first[mc.labels[first] == label]
            if sel.size:
                out[CLASS_NAMES[label]] = mc.images[sel].astype(np.float64).mean(axis=0)
        return out
    return {}


def _cam_statistics(
    mc: _ModelCams, n_perm: int, seed: int, alpha: float, equal_var: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Difference map and pixel-wise tests (perfusion vs ventilation CAMs, pooled over seeds)."""
    from lung_cls.evaluation.stats import (
        fdr_bh,
        permutation_maxT,
        pixelwise_ttest,
        significant_fractions,
    )

    perf, vent = mc.cams[mc.labels == 1], mc.cams[mc.labels == 0]
    fig: dict[str, Any] = {"mean_cam": mc.cams.mean(axis=0)}
    info: dict[str, Any] = {
        "n_perfusion": int(len(perf)),
        "n_ventilation": int(len(vent)),
        "n_runs": mc.n_runs,
    }
    if len(perf) and len(vent):
        fig["diff"] = vent.mean(axis=0) - perf.mean(axis=0)
        info["diff_min"], info["diff_max"] = float(fig["diff"].min()), float(fig["diff"].max())
    if len(perf) < 2 or len(vent) < 2:
        info["note"] = "fewer than 2 CAMs in a class: no t-test"
        return fig, info
    _, p = pixelwise_ttest(perf, vent, equal_var=equal_var)
    fdr_mask, _ = fdr_bh(p, alpha)
    p_fwer = None
    if n_perm > 0:
        fwer_mask, p_fwer = permutation_maxT(
            perf, vent, n_perm=n_perm, seed=seed, alpha=alpha, equal_var=equal_var
        )
        fig["fwer_mask"] = fwer_mask
    fig["p_mask"] = p < alpha
    fig["fdr_mask"] = fdr_mask
    info["significant_fraction"] = significant_fractions(p, alpha, p_fwer)
    info["min_p"] = float(p.min())
    if p_fwer is not None:
        info["min_p_fwer"] = float(np.min(p_fwer))
    return fig, info


def _groundtruth_table(model_cams: Mapping[str, _ModelCams]) -> tuple[pd.DataFrame, dict[str, Any]]:
    from lung_cls.evaluation.groundtruth import score_cams

    rows, details = [], {}
    for model, mc in model_cams.items():
        if not mc.masks:
            continue
        scores = score_cams(mc.cams, mc.labels, mc.masks, GT_FEATURE_MAP)
        details[model] = scores
        for cls, s in scores.items():
            share, chance = s.get("energy_share"), s.get("chance_share")
            rows.append(
                {
                    "model": model,
                    "class": cls,
                    "targets": "+".join(s.get("targets", [])),
                    "n_images": s.get("n_images"),
                    "n_with_target": s.get("n_with_target"),
                    "energy_share": share,
                    "chance_share": chance,
                    "energy_ratio": share / chance
                    if _finite(share) and _finite(chance) and chance > 0
                    else math.nan,
                    "pointing_hit_rate": s.get("pointing_hit_rate"),
                    "pointing_chance": s.get("pointing_chance"),
                }
            )
    return pd.DataFrame(rows), details


# --------------------------------------------------------------------------- W&B
def _want_wandb(log_wandb: bool | None, runs: Sequence[RunRecord]) -> bool:
    if log_wandb is not None:
        return bool(log_wandb)
    import importlib.util

    return (
        any((r.path / "wandb").is_dir() for r in runs)
        and importlib.util.find_spec("wandb") is not None
    )


def _log_to_wandb(
    sweep_dir: Path,
    out_dir: Path,
    runs: Sequence[RunRecord],
    figures: Mapping[str, Path],
    tables: Mapping[str, pd.DataFrame],
) -> str:
    """Figures and tables to a W&B run in the sweep's project.

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


# --------------------------------------------------------------------------- HTML
def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'
    )


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(empty)</em></p>"
    shown = df.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: f"{v:.4g}" if _finite(v) else "-")
    return shown.to_html(index=False, na_rep="-", escape=True, border=0, classes="tbl")


def _methods_html(n_boot: int, n_perm: int, seed: int, alpha: float, equal_var: bool) -> str:
    ttest = "Student's pooled-variance" if equal_var else "Welch's unequal-variance"
    items = [
        "Perfusion is the positive class (label 1), ventilation the negative (label 0); a prediction is perfusion when p(perfusion) &ge; 0.5 (the run's own argmax, as stored in predictions.csv).",
        "Table 1: accuracy, F1, sensitivity, specificity and AUC are recomputed per run from the test rows of predictions.csv (metrics.json when that file is missing), then summarised as mean &plusmn; sample SD (ddof = 1) over seeds; SD is '-' for a single run. The paper's numbers are means of 5 repetitions.",
        f"Pooled metrics: the test predictions of all seeds are concatenated and scored once; 95% CIs are percentile bootstrap intervals with {n_boot} resamples, stratified by class (seed {seed}). The same test image appears once per seed, so the pooled rows are not independent and these intervals are narrower than intervals over distinct images would be.",
        "ROC: one thin curve per seed; the thick curve and 'pooled' AUC use the pooled predictions; the legend's AUC is mean &plusmn; SD over seeds (Mann-Whitney AUC, ties count 1/2).",
        "CAMs: Grad-CAM (pytorch-grad-cam) on the layer named by timm's feature_info[-1], explained for the true class of each test image, no test-time augmentation. Grad-CAM min-max scales every map per image to [0, 1], so all CAM statistics compare relative spatial patterns, not absolute activation strength.",
        "Fig. 2: per-class average of the unique test images; per model, the per-class average of the CAMs pooled over seeds.",
        f"Fig. 3: difference = mean ventilation CAM &minus; mean perfusion CAM (red: perfusion higher, blue: ventilation higher). Pixel-wise {ttest} two-sample t-test of perfusion vs ventilation CAMs, pooled over seeds as in the paper (the same image enters once per seed, so the maps are not independent samples). Significant pixels at p &lt; {alpha:g}: uncorrected (the paper's rule), Benjamini-Hochberg FDR (q &le; {alpha:g}), and family-wise error control by Westfall-Young max-|t| permutations ({n_perm} label shuffles, seed {seed}).",
        "Model comparison: per test image id, the probability is averaged over seeds and the prediction is the majority vote of the seeds (ties: mean probability &ge; 0.5). Models are paired on the same ids. AUCs are compared with DeLong's test for correlated ROC curves; errors with McNemar's test (exact binomial when fewer than 25 discordant images, else continuity-corrected chi-square). p-values are Holm-adjusted over all model pairs, separately for DeLong and McNemar.",
        "CAM vs truth (phantom data only): share of each CAM's total value inside the class's discriminative masks (ventilation: trachea, hot spots, and oropharynx/esophagus/stomach where drawn; perfusion: heart and lungs) against chance (the masks' area fraction), and the pointing-game hit rate (CAM peak inside the mask) against its chance level.",
    ]
    return "<ul>" + "".join(f"<li>{t}</li>" for t in items) + "</ul>"


def _write_html(
    path: Path,
    sweep_dir: Path,
    sections: list[tuple[str, str]],
    runs: Sequence[RunRecord],
    missing: Sequence[str],
    methods: str,
) -> None:
    bad = [r for r in runs if r.status != "ok"]
    ok = [r for r in runs if r.status == "ok"]
    problems = ""
    if bad or missing:
        items = [
            f"<li><b>{html.escape(r.name)}</b> ({html.escape(r.status)}, model {html.escape(r.model)}, seed {r.seed}):"
            f"<pre>{html.escape(r.error or 'no error recorded')}</pre></li>"
            for r in bad
        ]
        items += [f"<li><b>{html.escape(m)}</b> (missing: no run dir)</li>" for m in missing]
        problems = f'<h2 id="failed">Failed, incomplete or missing runs ({len(bad) + len(missing)})</h2><ul>{"".join(items)}</ul>'
    else:
        problems = '<h2 id="failed">Failed, incomplete or missing runs</h2><p>None: every run finished.</p>'
    run_rows = pd.DataFrame(
        [
            {
                "run": r.name,
                "model": r.model,
                "seed": r.seed,
                "status": r.status,
                "source": r.metrics_source,
                "notes": "; ".join(r.notes),
            }
            for r in runs
        ]
    )
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lung_cls report: {html.escape(sweep_dir.name)}</title>
<style>
body{{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}}
table.tbl{{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}}
table.tbl th,table.tbl td{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
table.tbl th{{background:#f0f0f0}} pre{{background:#fbeaea;padding:6px;white-space:pre-wrap;font-size:0.8em}}
.note{{color:#555;font-size:0.9em}}
</style></head><body>
<h1>lung_cls sweep report</h1>
<p>Sweep dir: <code>{html.escape(str(sweep_dir))}</code><br>
Generated {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} from {len(ok)} finished run(s) of {len(runs)} run dir(s).</p>
{problems}
{body}
<h2>Runs</h2>{_html_table(run_rows)}
<h2>How each number was computed</h2>{methods}
</body></html>
"""
    path.write_text(doc, encoding="utf-8")


# --------------------------------------------------------------------------- the report
def build_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    n_boot: int = 2000,
    n_perm: int = 1000,
    seed: int = 0,
    log_wandb: bool | None = None,
    *,
    alpha: float = 0.05,
    equal_var: bool = True,
) -> Path:
    """Write the sweep report into ``out_dir`` (default ``<sweep_dir>/report``); return that dir.

    Args:
        sweep_dir: a Hydra multirun dir (one run dir per job) or any folder holding run dirs.
        n_boot: bootstrap resamples for the pooled 95% CIs.
        n_perm: label permutations of the max-T test (0: skip it).
        seed: seed of the bootstrap and the permutations.
        log_wandb: log figures and tables to W&B; None = when the runs used W&B and it is installed.
        alpha: significance level of the pixel-wise tests.
        equal_var: Student's pooled-variance t-test (paper); False for Welch's test.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist or holds no run dir.
    """
    from lung_cls.evaluation import figures as figs

    sweep = Path(sweep_dir).expanduser().resolve()
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep}: sweep dir does not exist")
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else sweep / "report"
    runs = discover_runs(sweep, exclude=out)
    if not runs:
        raise FileNotFoundError(
            f"{sweep}: no run dirs (folders with metrics.json or .hydra/) found"
        )
    out.mkdir(parents=True, exist_ok=True)
    missing = _missing_jobs(sweep, runs)
    notes: list[str] = []

    ok_runs = [r for r in runs if r.status == "ok" and r.test_metrics is not None]
    models = _model_order(r.model for r in ok_runs)
    runs_by_model = {
        m: sorted(
            (r for r in ok_runs if r.model == m), key=lambda r: (r.seed is None, r.seed, r.name)
        )
        for m in models
    }
    for m, rs in runs_by_model.items():
        seeds = [r.seed for r in rs]
        if len(set(seeds)) != len(seeds):
            notes.append(f"{m}: several runs share a seed ({seeds}); all are counted")
    report: dict[str, Any] = {
        "sweep_dir": str(sweep),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "n_boot": n_boot,
            "n_perm": n_perm,
            "seed": seed,
            "alpha": alpha,
            "equal_var": equal_var,
        },
        "runs": [
            {
                "run": r.name,
                "model": r.model,
                "seed": r.seed,
                "status": r.status,
                "error": r.error,
                "metrics_source": r.metrics_source,
                "notes": r.notes,
            }
            for r in runs
        ],
        "missing_jobs": missing,
    }
    sections: list[tuple[str, str]] = []
    figures: dict[str, Path] = {}
    tables: dict[str, pd.DataFrame] = {}

    # Table 1
    if runs_by_model:
        t1, t1_md, t1_pooled, t1_details = _table1(runs_by_model, n_boot, seed)
        t1.to_csv(out / "table1.csv", index=False)
        (out / "table1.md").write_text(
            "# Table 1: test metrics, mean ± SD over seeds, next to the paper's values (mean of 5)\n\n"
            + _df_to_markdown(t1_md)
            + f"\n## Pooled over seeds, with stratified bootstrap 95% CI ({n_boot} resamples)\n\n"
            + "The same test image appears once per seed, so pooled rows are not independent.\n\n"
            + _df_to_markdown(t1_pooled),
            encoding="utf-8",
        )
        tables["table1"] = t1
        report["table1"] = t1_details
        cm_rows = pd.DataFrame(
            [
                {
                    "model": m,
                    "TN": d["confusion_matrix_sum"][0][0],
                    "FP": d["confusion_matrix_sum"][0][1],
                    "FN": d["confusion_matrix_sum"][1][0],
                    "TP": d["confusion_matrix_sum"][1][1],
                }
                for m, d in t1_details.items()
                if d["confusion_matrix_sum"]
            ]
        )
        sections.append(
            (
                "Table 1: test metrics (mean ± SD over seeds) vs the paper",
                _html_table(t1_md)
                + f"<h3>Pooled over seeds, stratified bootstrap 95% CI ({n_boot} resamples)</h3>"
                + "<p class='note'>The same test image appears once per seed, so pooled rows are not independent.</p>"
                + _html_table(t1_pooled)
                + "<h3>Confusion matrices summed over seeds (perfusion positive)</h3>"
                + _html_table(cm_rows)
                + "<details><summary>All numbers (table1.csv)</summary>"
                + _html_table(t1)
                + "</details>",
            )
        )
    else:
        notes.append("no finished run: no Table 1, ROC or comparisons")
        sections.append(("Table 1", "<p>No finished run.</p>"))

    # ROC
    curves, pooled_roc, roc_info = _roc_curves(runs_by_model)
    report["roc"] = roc_info
    if curves or pooled_roc:
        figures["fig4_roc"] = figs.fig_roc(curves, out / "fig4_roc.png", pooled=pooled_roc)
        sections.append(
            ("Fig. 4: ROC curves (test set)", _img_tag(figures["fig4_roc"], "ROC curves"))
        )
    else:
        sections.append(
            ("Fig. 4: ROC curves", "<p>No run with both classes in its test predictions.</p>")
        )

    # Model comparison
    if len(runs_by_model) >= 2:
        cmp_df, cmp_notes = _model_comparison(runs_by_model)
        notes.extend(cmp_notes)
        cmp_df.to_csv(out / "model_comparison.csv", index=False)
        cmp_md = pd.DataFrame(
            [
                {
                    "models": f"{r['model_a']} vs {r['model_b']}",
                    "n": r.get("n_images", "-"),
                    "AUC a / b": f"{_fmt(r.get('auc_a'), 3)} / {_fmt(r.get('auc_b'), 3)}",
                    "AUC diff [95% CI]": f"{_fmt(r.get('auc_diff'), 3)} [{_fmt(r.get('auc_diff_lo'), 3)}, {_fmt(r.get('auc_diff_hi'), 3)}]",
                    "DeLong p (Holm)": f"{_fmt_p(r.get('delong_p'))} ({_fmt_p(r.get('delong_p_holm'))})",
                    "acc a / b": f"{_fmt(100 * r['acc_a'] if _finite(r.get('acc_a')) else None)} / {_fmt(100 * r['acc_b'] if _finite(r.get('acc_b')) else None)}",
                    "McNemar b/c": f"{r.get('mcnemar_b', '-')}/{r.get('mcnemar_c', '-')}"
                    if _finite(r.get("mcnemar_p"))
                    else "-",
                    "McNemar p (Holm)": f"{_fmt_p(r.get('mcnemar_p'))} ({_fmt_p(r.get('mcnemar_p_holm'))})",
                    "note": r.get("note") if isinstance(r.get("note"), str) else "",
                }
                for r in cmp_df.to_dict("records")
            ]
        )
        (out / "model_comparison.md").write_text(
            "# Pairwise model comparison (test images, mean-over-seeds probability; majority-vote predictions)\n\n"
            + _df_to_markdown(cmp_md),
            encoding="utf-8",
        )
        tables["model_comparison"] = cmp_df
        report["model_comparison"] = cmp_df.to_dict("records")
        sections.append(("Model comparison (DeLong, McNemar, Holm-adjusted)", _html_table(cmp_md)))
    else:
        sections.append(
            ("Model comparison", "<p>Fewer than two models finished: nothing to compare.</p>")
        )

    # CAMs
    model_cams: dict[str, _ModelCams] = {}
    for m, rs in runs_by_model.items():
        mc = _load_model_cams(rs, notes)
        if mc is not None:
            model_cams[m] = mc
    if model_cams:
        from lung_cls.evaluation.groundtruth import CLASS_NAMES

        mean_imgs = _mean_images(model_cams)
        mean_cams = {
            m: {
                CLASS_NAMES[k]: mc.cams[mc.labels == k].mean(axis=0)
                for k in (1, 0)
                if (mc.labels == k).any()
            }
            for m, mc in model_cams.items()
        }
        counts = {
            m: {CLASS_NAMES[k]: int((mc.labels == k).sum()) for k in (1, 0)}
            for m, mc in model_cams.items()
        }
        figures["fig2_average_cams"] = figs.fig_average_cams(
            mean_imgs, mean_cams, out / "fig2_average_cams.png", counts=counts
        )
        sections.append(
            (
                "Fig. 2: average images and average Grad-CAMs",
                _img_tag(figures["fig2_average_cams"], "average CAMs"),
            )
        )

        stat_figs, stat_info = {}, {}
        for m, mc in model_cams.items():
            f, info = _cam_statistics(mc, n_perm, seed, alpha, equal_var)
            stat_info[m] = info
            if "diff" in f:
                stat_figs[m] = f
        report["cam_statistics"] = stat_info
        frac_rows = pd.DataFrame(
            [
                {
                    "model": m,
                    "perfusion CAMs": i["n_perfusion"],
                    "ventilation CAMs": i["n_ventilation"],
                    **{
                        f"significant {k}": f"{100 * v:.1f}%"
                        for k, v in (i.get("significant_fraction") or {}).items()
                        if k != "n_pixels"
                    },
                    "note": i.get("note", ""),
                }
                for m, i in stat_info.items()
            ]
        )
        if stat_figs:
            figures["fig3_cam_statistics"] = figs.fig_cam_statistics(
                stat_figs, out / "fig3_cam_statistics.png", alpha=alpha
            )
            sections.append(
                (
                    "Fig. 3: CAM difference and pixel-wise t-test",
                    _img_tag(figures["fig3_cam_statistics"], "CAM statistics")
                    + _html_table(frac_rows),
                )
            )
        else:
            sections.append(
                (
                    "Fig. 3: CAM statistics",
                    "<p>No model has CAMs of both classes.</p>" + _html_table(frac_rows),
                )
            )

        gt_df, gt_details = _groundtruth_table(model_cams)
        if not gt_df.empty:
            gt_df.to_csv(out / "cam_groundtruth.csv", index=False)
            gt_md = gt_df.copy()
            for col in ("energy_share", "chance_share", "pointing_hit_rate", "pointing_chance"):
                gt_md[col] = gt_md[col].map(lambda v: _fmt(100 * v) + "%" if _finite(v) else "-")
            gt_md["energy_ratio"] = gt_md["energy_ratio"].map(lambda v: _fmt(v, 2))
            (out / "cam_groundtruth.md").write_text(
                "# Grad-CAM vs phantom truth: CAM energy inside the discriminative masks vs chance, pointing game\n\n"
                + _df_to_markdown(gt_md),
                encoding="utf-8",
            )
            tables["cam_groundtruth"] = gt_df
            report["cam_groundtruth"] = gt_details
            sections.append(("Grad-CAM vs truth masks (phantom)", _html_table(gt_md)))
        else:
            sections.append(
                (
                    "Grad-CAM vs truth masks",
                    "<p>No truth masks (mask_* arrays) in cams.npz: skipped.</p>",
                )
            )
    else:
        notes.append("no cams.npz in any finished run: CAM figures and statistics skipped")
        sections.append(
            (
                "Fig. 2 and 3: CAMs",
                "<p>No CAMs (cams.npz) in any finished run: CAM figures skipped.</p>",
            )
        )

    if log_wandb is not False and _want_wandb(log_wandb, runs):
        try:
            notes.append(_log_to_wandb(sweep, out, runs, figures, tables))
        except Exception as err:  # noqa: BLE001 - W&B problems must not lose the report
            log.warning("W&B logging of the report failed: %s", err)
            notes.append(f"W&B logging failed: {err}")

    report["notes"] = notes
    report["figures"] = {k: p.name for k, p in figures.items()}
    if notes:
        sections.append(
            (
                "Notes",
                "<ul>"
                + "".join(f'<li class="note">{html.escape(n)}</li>' for n in notes)
                + "</ul>",
            )
        )
    with open(out / "report.json", "w", encoding="utf-8") as fh:
        json.dump(_jsonable(report), fh, indent=2, allow_nan=False)
    _write_html(
        out / "report.html",
        sweep,
        sections,
        runs,
        missing,
        _methods_html(n_boot, n_perm, seed, alpha, equal_var),
    )
    log.info("Report of %s written to %s (%d runs, %d ok)", sweep, out, len(runs), len(ok_runs))
    return out


# --------------------------------------------------------------------------- CLI
def _main(cfg: Any) -> None:
    from rich.console import Console

    console = Console()
    try:
        out = build_report(
            cfg.sweep_dir,
            out_dir=cfg.get("out_dir"),
            n_boot=int(cfg.n_boot),
            n_perm=int(cfg.n_perm),
            seed=int(cfg.seed),
            log_wandb=cfg.get("log_wandb"),
            alpha=float(cfg.alpha),
            equal_var=bool(cfg.equal_var),
        )
    except FileNotFoundError as err:
        console.print(f"[bold red]No report:[/] {err}")
        raise SystemExit(1) from err
    console.print(f"[bold green]Report written:[/] {out / 'report.html'}")


def main() -> None:
    """``python -m lung_cls.report sweep_dir=DIR`` (config: ``conf/report.yaml``)."""
    import sys

    import hydra

    from lung_cls.utils.hydra import quote_path_overrides

    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","

    hydra.main(version_base="1.3", config_path="../conf", config_name="report")(_main)()


if __name__ == "__main__":
    main()
