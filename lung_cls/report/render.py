"""The report's files: tables as CSV and markdown, ``report.json``, and one self-contained HTML.

Every file is written atomically through :mod:`lung_cls.utils.io` (a temporary file renamed
over the target), so a browser, a W&B upload or a second report never reads half a file, and a
failed rebuild leaves the previous report whole. The HTML is assembled here from sections, one
function per section, so the orchestrator (:mod:`lung_cls.report.build`) holds no markup; the
figures are embedded as base64 PNGs, so the one file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from lung_cls.report.fmt import finite
from lung_cls.report.settings import Settings
from lung_cls.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from lung_cls.report.discover import RunRecord

#: One part of report.html: its heading and its HTML body.
Section = tuple[str, str]

_POOLED_CAVEAT = (
    "The same test image appears once per seed, so the rows are not independent: the CIs "
    "resample images (patients where a patient holds several test images) with all their rows."
)


# --------------------------------------------------------------------------- files
def df_to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table without the optional ``tabulate`` dependency."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write_text(path, df.to_csv(index=False))


def write_table1(
    out: Path, t1: pd.DataFrame, shown: pd.DataFrame, pooled: pd.DataFrame, n_boot: int
) -> None:
    """``table1.csv`` (every number) and ``table1.md`` (mean ± SD vs the paper, then pooled)."""
    write_csv(t1, out / "table1.csv")
    atomic_write_text(
        out / "table1.md",
        "# Table 1: test metrics, mean ± SD over seeds, next to the paper's values (mean of 5)\n\n"
        + df_to_markdown(shown)
        + f"\n## Pooled over seeds, with image-level stratified bootstrap 95% CI ({n_boot} resamples)\n\n"
        + f"{_POOLED_CAVEAT}\n\n"
        + df_to_markdown(pooled),
    )


def write_table(out: Path, stem: str, title: str, full: pd.DataFrame, shown: pd.DataFrame) -> None:
    """``<stem>.csv`` (every number) and ``<stem>.md`` (the display table under ``title``)."""
    write_csv(full, out / f"{stem}.csv")
    atomic_write_text(out / f"{stem}.md", f"# {title}\n\n" + df_to_markdown(shown))


def write_comparison(out: Path, cmp: pd.DataFrame, shown: pd.DataFrame) -> None:
    title = "Pairwise model comparison (test images, mean-over-seeds probability; majority-vote predictions)"
    write_table(out, "model_comparison", title, cmp, shown)


def write_groundtruth(out: Path, gt: pd.DataFrame, shown: pd.DataFrame) -> None:
    title = "Grad-CAM vs phantom truth: CAM energy inside the discriminative masks vs chance, pointing game"
    write_table(out, "cam_groundtruth", title, gt, shown)


def write_json(out: Path, report: Mapping[str, Any]) -> Path:
    """``report.json``: strict JSON (nan/inf as null) through the project's one converter."""
    return atomic_write_json(out / "report.json", report)


# --------------------------------------------------------------------------- HTML pieces
def html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(empty)</em></p>"
    shown = df.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: f"{v:.4g}" if finite(v) else "-")
    return shown.to_html(index=False, na_rep="-", escape=True, border=0, classes="tbl")


def img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'
    )


def _message(title: str, text: str) -> Section:
    return title, f"<p>{text}</p>"


# --------------------------------------------------------------------------- sections
def table1_section(
    t1: pd.DataFrame | None,
    shown: pd.DataFrame | None = None,
    pooled: pd.DataFrame | None = None,
    confusion: pd.DataFrame | None = None,
    n_boot: int = 0,
    caption: str = "",
) -> Section:
    """Table 1 with the pooled CIs, the summed confusion matrices and every number folded away;
    ``t1=None``: no finished run. ``caption`` says how this sweep's set-up differs from the
    paper's (the setup box's words)."""
    if t1 is None:
        return _message("Table 1", "No finished run.")
    return (
        "Table 1: this sweep's test metrics (mean ± SD over seeds) beside the paper's - "
        "a comparison of set-ups that differ",
        (f'<p class="warn">{html.escape(caption)}</p>' if caption else "")
        + html_table(shown)
        + f"<h3>Pooled over seeds, image-level stratified bootstrap 95% CI ({n_boot} resamples)</h3>"
        + f"<p class='note'>{_POOLED_CAVEAT}</p>"
        + html_table(pooled)
        + "<h3>Confusion matrices summed over seeds (perfusion positive)</h3>"
        + html_table(confusion)
        + "<details><summary>All numbers (table1.csv)</summary>"
        + html_table(t1)
        + "</details>",
    )


def roc_section(figure: Path | None) -> Section:
    if figure is None:
        return _message("Fig. 4: ROC curves", "No run with both classes in its test predictions.")
    return "Fig. 4: ROC curves (test set)", img_tag(figure, "ROC curves")


def comparison_section(shown: pd.DataFrame | None) -> Section:
    if shown is None:
        return _message("Model comparison", "Fewer than two models finished: nothing to compare.")
    return "Model comparison (DeLong, McNemar, Holm-adjusted)", html_table(shown)


def no_cams_section() -> Section:
    return _message(
        "Fig. 2 and 3: CAMs", "No CAMs (cams.npz) in any finished run: CAM figures skipped."
    )


def average_cams_section(figure: Path) -> Section:
    return "Fig. 2: average images and average Grad-CAMs", img_tag(figure, "average CAMs")


def cam_statistics_section(figure: Path | None, fractions: pd.DataFrame) -> Section:
    if figure is None:
        return (
            "Fig. 3: CAM statistics",
            "<p>No model has CAMs of both classes.</p>" + html_table(fractions),
        )
    return (
        "Fig. 3: CAM difference and pixel-wise t-test",
        img_tag(figure, "CAM statistics") + html_table(fractions),
    )


NECK_TITLE = (
    "Do the ventilation CAMs find the neck? (phantom truth, neck-positive ventilation images)"
)


def neck_section(shown: pd.DataFrame | None, warnings: Sequence[str]) -> Section:
    """The paper's finding as a number: the neck measure with its chance levels and bars."""
    warn = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in warnings)
    if shown is None:
        return _message(NECK_TITLE, "No trachea masks in cams.npz (not phantom data): skipped.")
    legend = (
        "<p class='note'>Target: the trachea, oropharynx and oesophagus masks, grown by half a "
        "CAM cell (a map cannot place its peak more finely). 'CAM energy inside': share of each "
        "map's sum inside the target; chance is the target's area share (a flat map). 'CAM max "
        "inside': share of images whose maximum lies in the target; chance is the same area "
        "share. Bars from the issue: energy ratio at least 2, maximum inside in at least half "
        "the images.</p>"
    )
    return NECK_TITLE, warn + html_table(shown) + legend


def groundtruth_section(shown: pd.DataFrame | None) -> Section:
    if shown is None:
        return _message(
            "Grad-CAM vs truth masks", "No truth masks (mask_* arrays) in cams.npz: skipped."
        )
    return "Grad-CAM vs truth masks (phantom)", html_table(shown) + (
        "<p class='note'>Every truth feature of the class (ventilation: trachea, hot spots, "
        "oropharynx, oesophagus, stomach; perfusion: heart and lungs), on all images of that "
        "class that show one. energy_share: share of each CAM's sum inside the masks as drawn; "
        "chance_share: their area share. pointing_hit_rate: share of images whose CAM maximum "
        "lies inside the masks grown by pointing_tolerance_px (half a CAM cell, as in the neck "
        "table); pointing_chance: the grown masks' area share.</p>"
    )


SUBGROUP_TITLE = "Subgroups: ventilation studies with and without neck activity (phantom truth)"
CALIBRATION_TITLE = "Calibration: expected calibration error and Brier score (test)"
RANDOMISATION_TITLE = "CAM sanity check: model-parameter randomisation (Adebayo et al. 2018)"


def subgroup_title(column: str | None, source: str | None) -> str:
    """The section's title, naming the column: the phantom's neck truth keeps its old title."""
    if column is None or (column == "neck" and source == "phantom truth"):
        return SUBGROUP_TITLE
    return f"Subgroups by '{column}' ({source}): ventilation studies recognised and accuracy"


def subgroup_section(table: pd.DataFrame | None, title: str = SUBGROUP_TITLE) -> Section:
    if table is None:
        return _message(
            "Subgroups",
            "No subgroup (data.subgroup, the subgroup column of predictions.csv) and no neck "
            "truth (mask_trachea in cams.npz): skipped.",
        )
    shown = table.drop(columns=[c for c in ("column", "source") if c in table.columns])
    return title, html_table(shown) + (
        "<p class='note'>Perfusion is positive, so the share of ventilation studies recognised "
        "is the specificity. <i>Accuracy with all perfusion studies</i>: the subgroup's "
        "ventilation studies together with every perfusion study; <i>accuracy within "
        "subgroup</i>: only the subgroup's own studies of both classes (its perfusion studies "
        "counted in the column before). Each distinct test image counts once (its prediction: "
        "the majority of the seeds); 95% Wilson intervals. A model that learned the neck shadow "
        "recognises ventilation studies with neck activity and misses those without.</p>"
    )


def calibration_section(table: pd.DataFrame | None, figure: Path | None) -> Section:
    if table is None:
        return _message(CALIBRATION_TITLE, "No test predictions: skipped.")
    fig = img_tag(figure, "reliability diagram") if figure is not None else ""
    return CALIBRATION_TITLE, html_table(table) + fig + (
        "<p class='note'>ECE: mean |share of perfusion - mean P(perfusion)| over 15 equal-width "
        "bins, weighted by the rows in each bin (torchmetrics). Brier: mean squared error of "
        "P(perfusion). 0 is perfect for both. Rows are test image x seed, so a pooled bin counts "
        "an image once per seed; with a small test set most middle bins hold one or two rows "
        "(the diagram labels each bin with its count), and their shares say little.</p>"
    )


def randomisation_section(table: pd.DataFrame | None) -> Section:
    if table is None:
        return _message(
            RANDOMISATION_TITLE,
            "No cam_randomised_similarity in cams.npz (runs older than this check): skipped.",
        )
    return RANDOMISATION_TITLE, html_table(table) + (
        "<p class='note'>Spearman rank correlation between each test CAM of the trained model and "
        "the CAM of the same architecture with all weights re-initialised. High similarity means "
        "the maps follow the image, not the learned weights, and are no explanation. Pairs in "
        "which either map is flat (Grad-CAM all zero after its ReLU, common with random "
        "weights) have no rank correlation; they are counted and left out. Verdict by the median: "
        "below 0.3 pass, 0.3-0.6 caution (the maps partly follow the image), from 0.6 fail.</p>"
    )


def notes_section(notes: Sequence[str]) -> Section:
    return (
        "Notes",
        "<ul>" + "".join(f'<li class="note">{html.escape(n)}</li>' for n in notes) + "</ul>",
    )


def _problems_html(runs: Sequence[RunRecord], missing: Sequence[str]) -> str:
    """The failed, unfinished and missing runs, each with its error: first thing on the page."""
    bad = [r for r in runs if r.status != "ok"]
    if not bad and not missing:
        return (
            '<h2 id="failed">Failed, incomplete or missing runs</h2>'
            "<p>None: every run finished.</p>"
        )
    items = [
        f"<li><b>{html.escape(r.name)}</b> ({html.escape(r.status)}, model {html.escape(r.model)}, "
        f"seed {r.seed}):<pre>{html.escape(r.error or 'no error recorded')}</pre></li>"
        for r in bad
    ]
    items += [f"<li><b>{html.escape(m)}</b> (missing: no run dir)</li>" for m in missing]
    return (
        f'<h2 id="failed">Failed, incomplete or missing runs ({len(bad) + len(missing)})</h2>'
        f"<ul>{''.join(items)}</ul>"
    )


def _runs_table(runs: Sequence[RunRecord]) -> pd.DataFrame:
    return pd.DataFrame(
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


def _methods_html(settings: Settings) -> str:
    """How each number was computed, with the settings of this report filled in."""
    n_boot, n_perm, seed, alpha = settings.n_boot, settings.n_perm, settings.seed, settings.alpha
    ttest = "Student's pooled-variance" if settings.equal_var else "Welch's unequal-variance"
    items = [
        "Perfusion is the positive class (label 1), ventilation the negative (label 0); a prediction is perfusion when p(perfusion) &ge; 0.5 (the run's own argmax, as stored in predictions.csv).",
        "Table 1: accuracy, F1, sensitivity, specificity and AUC are recomputed per run from the test rows of predictions.csv (metrics.json when that file is missing), then summarised as mean &plusmn; sample SD (ddof = 1) over seeds; SD is '-' for a single run. The paper's numbers are means of 5 repetitions.",
        f"Pooled metrics: the test predictions of all seeds are concatenated and scored once; 95% CIs are percentile bootstrap intervals with {n_boot} resamples (seed {seed}) whose unit is the test image: each resample draws images with replacement, within their class, and scores all seed rows of each drawn image. Where a patient holds more than one test image the unit is the patient (report.json: table1.&lt;model&gt;.pooled.ci_unit, n_units). The point estimate is the pooled one; the interval reflects the number of distinct images, not of rows.",
        "ROC: one thin curve per seed; the thick curve and 'pooled' AUC use the pooled predictions; the legend's AUC is mean &plusmn; SD over seeds (Mann-Whitney AUC, ties count 1/2).",
        "CAMs: Grad-CAM (pytorch-grad-cam) on the layer named by model.cam_layer (default: timm's feature_info[-1]; the setup box names it), explained for the true class of each test image, no test-time augmentation. Grad-CAM min-max scales every map per image to [0, 1], so statistics on those maps compare relative spatial patterns, not absolute activation strength; runs also keep the raw maps (before that ReLU and scaling) in cams.npz, and report.cam_scale=raw tests those.",
        "Fig. 2: per-class average of the unique test images; per model, the per-class average of the CAMs pooled over seeds.",
        f"Fig. 3: difference = mean ventilation CAM &minus; mean perfusion CAM (red: perfusion higher, blue: ventilation higher). Pixel-wise {ttest} two-sample t-test of perfusion vs ventilation CAMs with the test image as the unit: each image's CAMs are first averaged over the seeds that tested it (the paper pooled the seeds' maps as if independent, which overstates the evidence); the permutations shuffle the class labels of whole images. Significant pixels at p &lt; {alpha:g}: uncorrected (the paper's rule), Benjamini-Hochberg FDR (q &le; {alpha:g}), and family-wise error control by Westfall-Young max-|t| permutations ({n_perm} label shuffles, seed {seed}). CAMs tested: {settings.cam_scale} ({'raw maps before ReLU and min-max' if settings.cam_scale == 'raw' else 'per-image min-max scaled, as in the paper'}). Only pixels inside the body mask are tested (cam_mask={html.escape(str(settings.cam_mask))}: the phantom's lungs and neck truth masks, else the mean test image above {settings.cam_mask_threshold:g} x its maximum), so background pixels add no tests; report.json gives the mask and the number of tests (n_tests) per model.",
        "Model comparison: per test image id, the probability is averaged over seeds and the prediction is the majority vote of the seeds (ties: mean probability &ge; 0.5). Models are paired on the same ids. AUCs are compared with DeLong's test for correlated ROC curves; errors with McNemar's test (exact binomial when fewer than 25 discordant images, else continuity-corrected chi-square). p-values are Holm-adjusted over all model pairs, separately for DeLong and McNemar.",
        "CAM vs truth (phantom data only): share of each CAM's total value inside the class's discriminative masks (ventilation: trachea, hot spots, and oropharynx/esophagus/stomach where drawn; perfusion: heart and lungs) against chance (the masks' area fraction), and the pointing-game hit rate (CAM peak inside the mask) against its chance level.",
    ]
    return "<ul>" + "".join(f"<li>{t}</li>" for t in items) + "</ul>"


_STYLE = """
body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
table.tbl{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
table.tbl th,table.tbl td{border:1px solid #ccc;padding:3px 6px;text-align:right}
table.tbl th{background:#f0f0f0} pre{background:#fbeaea;padding:6px;white-space:pre-wrap;font-size:0.8em}
.note{color:#555;font-size:0.9em}
.setup{border:2px solid #345;padding:0 1em 0.6em;margin:1em 0;background:#f6f8fb}
.setup th{text-align:left;padding-right:1em;vertical-align:top;white-space:nowrap}
.warn{background:#fff4d6;border-left:4px solid #d08700;padding:4px 8px}
"""


def setup_box(facts: Mapping[str, str]) -> str:
    """The box at the top of the page: what was run, in one glance."""
    if not facts:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in facts.items()
    )
    return f'<div class="setup"><h2 id="setup">What was run</h2><table>{rows}</table></div>'


def failure_document(
    sweep_dir: Path, runs: Sequence[RunRecord], missing: Sequence[str], groups: Sequence[Mapping]
) -> str:
    """The short page of a sweep in which no run finished: each distinct error once."""
    items = "".join(
        f"<li><b>{len(g['runs'])} run(s)</b> ({html.escape(str(g['status']))}): "
        f"<pre>{html.escape(str(g['error']))}</pre><span class='note'>"
        f"{html.escape(', '.join(g['runs'][:10]))}"
        f"{' ...' if len(g['runs']) > 10 else ''}</span></li>"
        for g in groups
    )
    miss = f"<p>{len(missing)} job(s) left no run dir.</p>" if missing else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lung_cls: no run finished</title>
<style>{_STYLE}</style></head><body>
<h1>No finished run in this sweep</h1>
<p>Sweep dir: <code>{html.escape(str(sweep_dir))}</code>: {len(runs)} run dir(s), none finished;
{len(groups)} distinct error(s) (the same message with other paths or numbers counts once).
No tables or figures were made. Each run's own log is <code>train.log</code> in its dir.</p>
{miss}<ul>{items}</ul>
</body></html>
"""


def html_document(
    sweep_dir: Path,
    sections: Sequence[Section],
    runs: Sequence[RunRecord],
    missing: Sequence[str],
    settings: Settings,
    setup: Mapping[str, str] | None = None,
) -> str:
    """The whole page: what was run, the problems, the sections in order, the runs, the methods."""
    n_ok = sum(r.status == "ok" for r in runs)
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lung_cls report: {html.escape(sweep_dir.name)}</title>
<style>{_STYLE}</style></head><body>
<h1>lung_cls sweep report</h1>
<p>Sweep dir: <code>{html.escape(str(sweep_dir))}</code><br>
Generated {generated} from {n_ok} finished run(s) of {len(runs)} run dir(s).</p>
{setup_box(setup or {})}
{_problems_html(runs, missing)}
{body}
<h2>Runs</h2>{html_table(_runs_table(runs))}
<h2>How each number was computed</h2>{_methods_html(settings)}
</body></html>
"""


def write_html(out: Path, document: str) -> Path:
    return atomic_write_text(out / "report.html", document)
