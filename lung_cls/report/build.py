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

:func:`build_report` is the table of contents; each ``_add_*`` step computes one part with the
pure functions of :mod:`~lung_cls.report.tables` and :mod:`~lung_cls.report.cams`, draws it with
:mod:`~lung_cls.report.figures`, writes it with :mod:`~lung_cls.report.render`, and records it in
the :class:`_Report` that becomes ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from lung_cls.report import cams, checks, figures, neck, render, setup, tables
from lung_cls.report.discover import (
    RunRecord,
    SweepNotFoundError,
    discover_runs,
    missing_jobs,
    runs_by_model,
)
from lung_cls.report.settings import Settings, load_cam_mask
from lung_cls.report.tables import RunsByModel
from lung_cls.report.wandb_log import log_to_wandb, want_wandb

log = logging.getLogger(__name__)


@dataclass
class _Report:
    """What the steps collect: ``data`` becomes report.json, ``sections`` report.html."""

    sweep: Path
    out: Path
    runs: list[RunRecord]
    missing: list[str]
    settings: Settings
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    sections: list[render.Section] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    cam_mask: Any = "auto"  # settings.cam_mask as cams.body_mask takes it (a file: its array)
    setup: dict[str, str] = field(default_factory=dict)


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
    cam_scale: str = "minmax",
    cam_mask: str = "auto",
    cam_mask_threshold: float = 0.1,
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
        cam_scale: ``minmax`` tests the per-image scaled CAMs (paper), ``raw`` the raw ones.
        cam_mask: pixels tested: ``auto`` (body), ``none`` (all) or a ``.npy`` bool mask file.
        cam_mask_threshold: ``auto`` without truth masks: mean image >= this x its maximum.

    Raises:
        SweepNotFoundError: ``sweep_dir`` does not exist or holds no run dir (a ``UserError``
            and a ``FileNotFoundError``).
    """
    settings = Settings(
        n_boot, n_perm, seed, alpha, equal_var, cam_scale, cam_mask, cam_mask_threshold
    )
    mask = load_cam_mask(cam_mask)  # a bad mask file stops here, before any work
    rep = _start(sweep_dir, out_dir, settings)
    rep.cam_mask = mask
    if not any(r.status == "ok" for r in rep.runs):
        return _failure_report(rep)
    rep.setup = setup.setup_facts(rep.runs)
    rep.data["setup"] = rep.setup
    by_model = runs_by_model(rep.runs, rep.notes)
    _add_table1(rep, by_model)
    _add_cams(rep, by_model)  # Figs. 2 and 3 before Fig. 4: the paper's order
    _add_roc(rep, by_model)
    _add_model_comparison(rep, by_model)
    _add_checks(rep, by_model)
    _add_wandb(rep, log_wandb)
    _finish(rep)
    n_ok = sum(r.status == "ok" and r.test_metrics is not None for r in rep.runs)
    log.info("Report of %s written to %s (%d runs, %d ok)", rep.sweep, rep.out, len(rep.runs), n_ok)
    return rep.out


# --------------------------------------------------------------------------- the steps
def _start(sweep_dir: str | Path, out_dir: str | Path | None, settings: Settings) -> _Report:
    """Find the runs (and the jobs that never ran) and create the report folder."""
    sweep = Path(sweep_dir).expanduser().resolve()
    if not sweep.is_dir():
        raise SweepNotFoundError(f"{sweep}: sweep dir does not exist")
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else sweep / "report"
    runs = discover_runs(sweep, exclude=out)
    if not runs:
        raise SweepNotFoundError(
            f"{sweep}: no run dirs (folders with metrics.json or .hydra/config.yaml) found"
        )
    out.mkdir(parents=True, exist_ok=True)
    missing = missing_jobs(sweep, runs)
    data: dict[str, Any] = {
        "sweep_dir": str(sweep),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings),
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
    return _Report(sweep, out, runs, missing, settings, data)


def _add_table1(rep: _Report, by_model: RunsByModel) -> None:
    """Table 1 (mean ± SD over seeds vs the paper; pooled with bootstrap CIs)."""
    if not by_model:
        rep.notes.append("no finished run: no Table 1, ROC or comparisons")
        rep.sections.append(render.table1_section(None))
        return
    n_boot = rep.settings.n_boot
    t1, details = tables.table1(by_model, n_boot, rep.settings.seed)
    shown, pooled = tables.table1_display(t1), tables.table1_pooled_display(t1, details)
    render.write_table1(rep.out, t1, shown, pooled, n_boot)
    rep.tables["table1"] = t1
    rep.data["table1"] = details
    confusion = tables.confusion_table(details)
    caption = setup.comparison_caption(rep.setup)
    rep.sections.append(render.table1_section(t1, shown, pooled, confusion, n_boot, caption))


def _add_roc(rep: _Report, by_model: RunsByModel) -> None:
    """Fig. 4: ROC per seed and pooled."""
    curves, pooled, info = tables.roc_curves(by_model)
    rep.data["roc"] = info
    figure = None
    if curves or pooled:
        figure = rep.figures[figures.ROC] = figures.draw_roc(curves, pooled, rep.out)
    rep.sections.append(render.roc_section(figure))


def _add_model_comparison(rep: _Report, by_model: RunsByModel) -> None:
    """DeLong and McNemar between every pair of models, Holm-adjusted."""
    if len(by_model) < 2:
        rep.sections.append(render.comparison_section(None))
        return
    cmp, notes = tables.model_comparison(by_model)
    rep.notes.extend(notes)
    shown = tables.comparison_display(cmp)
    render.write_comparison(rep.out, cmp, shown)
    rep.tables["model_comparison"] = cmp
    rep.data["model_comparison"] = cmp.to_dict("records")
    rep.sections.append(render.comparison_section(shown))


def _add_cams(rep: _Report, by_model: RunsByModel) -> None:
    """Figs. 2 and 3 and the CAM-vs-truth scores, from each model's CAMs pooled over seeds."""
    model_cams: dict[str, cams.ModelCams] = {}
    for m, rs in by_model.items():
        mc = cams.load_model_cams(rs, rep.notes)
        if mc is not None:
            model_cams[m] = mc
    if not model_cams:
        rep.notes.append("no cams.npz in any finished run: CAM figures and statistics skipped")
        rep.sections.append(render.no_cams_section())
        return
    _add_average_cams(rep, model_cams)
    _add_cam_statistics(rep, model_cams)
    grids = {m: neck.cam_grid(by_model[m]) for m in model_cams}
    _add_neck(rep, grids, model_cams)
    _add_groundtruth(rep, grids, model_cams)


def _add_average_cams(rep: _Report, model_cams: Mapping[str, cams.ModelCams]) -> None:
    """Fig. 2: per-class average image and per-model per-class average CAM."""
    images = cams.mean_images(model_cams)
    means, counts = cams.class_mean_cams(model_cams)
    figure = figures.draw_average_cams(images, means, counts, rep.out)
    rep.figures[figures.AVERAGE_CAMS] = figure
    rep.sections.append(render.average_cams_section(figure))


def _add_cam_statistics(rep: _Report, model_cams: Mapping[str, cams.ModelCams]) -> None:
    """Fig. 3: difference maps and pixel-wise tests (uncorrected, FDR, max-T), one map per test
    image, at the pixels of the body mask; the number of tests goes into report.json."""
    s = rep.settings
    maps, info = cams.all_cam_statistics(
        model_cams, s.n_perm, s.seed, s.alpha, s.equal_var,
        scale=s.cam_scale, mask=rep.cam_mask, mask_threshold=s.cam_mask_threshold,
    )  # fmt: skip
    rep.data["cam_statistics"] = info
    figure = None
    if maps:
        figure = rep.figures[figures.CAM_STATISTICS] = figures.draw_cam_statistics(
            maps, rep.out, s.alpha, cams.mean_images(model_cams)
        )
    rep.sections.append(render.cam_statistics_section(figure, tables.cam_statistics_table(info)))


def _add_neck(
    rep: _Report, grids: Mapping[str, Any], model_cams: Mapping[str, cams.ModelCams]
) -> None:
    """The paper's finding measured: ventilation CAMs inside the neck masks, against chance."""
    table, details, warnings = neck.neck_table(model_cams, grids)
    rep.data["cam_grid"] = {m: list(g) if g else None for m, g in grids.items()}
    rep.notes.extend(warnings)
    if table.empty:
        rep.sections.append(render.neck_section(None, warnings))
        return
    shown = neck.neck_display(table)
    render.write_table(rep.out, "cam_neck", render.NECK_TITLE, table, shown)
    rep.tables["cam_neck"] = table
    rep.data["cam_neck"] = details
    rep.sections.append(render.neck_section(shown, warnings))


def _add_groundtruth(
    rep: _Report, grids: Mapping[str, Any], model_cams: Mapping[str, cams.ModelCams]
) -> None:
    """CAM energy and peaks inside the phantom's truth masks, against chance."""
    gt, details = tables.groundtruth_table(model_cams, grids)
    if gt.empty:
        rep.sections.append(render.groundtruth_section(None))
        return
    shown = tables.groundtruth_display(gt)
    render.write_groundtruth(rep.out, gt, shown)
    rep.tables["cam_groundtruth"] = gt
    rep.data["cam_groundtruth"] = details
    rep.sections.append(render.groundtruth_section(shown))


def _add_checks(rep: _Report, by_model: RunsByModel) -> None:
    """Subgroups (data.subgroup, or the phantom's neck truth), calibration with its reliability diagram, CAM randomisation."""
    sub, sub_info = checks.subgroup_table(by_model)
    rep.data["subgroups"] = sub_info
    title = render.SUBGROUP_TITLE
    if not sub.empty:
        title = render.subgroup_title(str(sub["column"].iloc[0]), str(sub["source"].iloc[0]))
        render.write_table(rep.out, "subgroups", title, sub, sub)
    rep.sections.append(render.subgroup_section(sub if not sub.empty else None, title))
    cal, cal_info = checks.calibration_table(by_model)
    rep.data["calibration"] = cal_info
    figure = None
    if not cal.empty:
        render.write_table(rep.out, "calibration", render.CALIBRATION_TITLE, cal, cal)
        ece = {m: d["ece"] for m, d in cal_info.items()}
        points = checks.reliability_points(cal_info)
        if points:
            figure = rep.figures[figures.RELIABILITY] = figures.draw_reliability(
                points, ece, rep.out
            )
    rep.sections.append(render.calibration_section(cal if not cal.empty else None, figure))
    rnd, rnd_info = checks.randomisation_table(by_model)
    rep.data["cam_randomisation"] = rnd_info
    if not rnd.empty:
        render.write_table(rep.out, "cam_randomisation", render.RANDOMISATION_TITLE, rnd, rnd)
    rep.sections.append(render.randomisation_section(rnd if not rnd.empty else None))


def _add_wandb(rep: _Report, log_wandb: bool | None) -> None:
    """The figures and tables to W&B when asked (or when the runs used it); never fatal."""
    if log_wandb is False or not want_wandb(log_wandb, rep.runs):
        return
    try:
        rep.notes.append(log_to_wandb(rep.sweep, rep.out, rep.runs, rep.figures, rep.tables))
    except Exception as err:  # noqa: BLE001 - W&B problems must not lose the report
        log.warning("W&B logging of the report failed: %s", err)
        rep.notes.append(f"W&B logging failed: {err}")


def _failure_report(rep: _Report) -> Path:
    """No run finished: a short report of the errors, identical ones grouped, and nothing else."""
    groups = setup.error_groups(rep.runs)
    rep.data["error_groups"] = groups
    render.write_json(rep.out, rep.data)
    render.write_html(rep.out, render.failure_document(rep.sweep, rep.runs, rep.missing, groups))
    log.error(
        "No run of %s finished (%d runs, %d distinct errors): failure report in %s",
        rep.sweep,
        len(rep.runs),
        len(groups),
        rep.out,
    )
    return rep.out


def _finish(rep: _Report) -> None:
    """report.json, then report.html (the notes last on the page)."""
    rep.data["notes"] = rep.notes
    rep.data["figures"] = {k: p.name for k, p in rep.figures.items()}
    if rep.notes:
        rep.sections.append(render.notes_section(rep.notes))
    render.write_json(rep.out, rep.data)
    page = render.html_document(
        rep.sweep, rep.sections, rep.runs, rep.missing, rep.settings, setup=rep.setup
    )
    render.write_html(rep.out, page)
