"""What a QA check leaves behind: ``predictions.csv`` / ``.json`` (atomically) and the console table.

The row schema lives here (`COLUMNS`): the reader fills the file and header columns, the scorer
the probabilities and the decision, and this module writes exactly these columns, in this order,
to both files. Keys starting with ``_`` (``_rel``, the path shown to the user) never reach a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lung_cls.errors import UserError
from lung_cls.qa.decide import status_kind
from lung_cls.utils.io import atomic_write_json, write_csv_atomic

COLUMNS: tuple[str, ...] = (
    "file",
    "patient_id",
    "series_description",
    "modality",
    "sop_class",
    "view",
    "predicted",
    "prob_perfusion",
    "prob_sd",
    "prob_min",
    "prob_max",
    "declared",
    "declared_evidence",
    "mismatch",
    "status",
    "gate",
    "ood_score",
    "training_split",
    "preprocessing",
    "shift_y",
    "shift_x",
    "overlay",
)
"""Columns of predictions.csv (predictions.json rows carry the same keys)."""

RESULT_FILES = ("predictions.csv", "predictions.json")
OVERLAYS_DIR = "overlays"


def empty_row(file: str | os.PathLike, rel: str) -> dict[str, Any]:
    """A row with every column present (None), for ``file`` shown to the user as ``rel``."""
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row.update(file=str(file), mismatch=False)
    row["_rel"] = rel
    return row


def check_output(output: str | os.PathLike, overwrite: bool) -> tuple[Path, list[Path]]:
    """``output`` -> (the folder, the result files already in it). Results already there are
    never replaced silently: without ``overwrite`` that is an error, before anything is computed."""
    out = Path(os.path.expanduser(str(output)))
    if out.exists() and not out.is_dir():
        raise UserError(f"output={out}: exists and is not a folder")
    existing = [out / n for n in RESULT_FILES if (out / n).exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: already exists; pass overwrite=true to replace it")
    return out, existing


def clear_overlays(output: Path) -> Path:
    """The overlays folder, emptied of PNGs an earlier run left (they would mislead)."""
    overlays = output / OVERLAYS_DIR
    if overlays.is_dir():
        for old in overlays.glob("*.png"):
            old.unlink()
    return overlays


def write_outputs(
    rows: Sequence[Mapping[str, Any]], output: Path, header: Mapping[str, Any]
) -> tuple[Path, Path]:
    """predictions.csv and predictions.json (same rows; the JSON adds the run facts), atomically."""
    clean = [{k: r.get(k) for k in COLUMNS} for r in rows]
    csv_path = write_csv_atomic(output / RESULT_FILES[0], clean, COLUMNS)
    json_path = atomic_write_json(output / RESULT_FILES[1], {**header, "rows": clean})
    return csv_path, json_path


KIND_STYLES = (
    ("ok", "green"),
    ("review", "yellow"),
    ("mismatch", "red"),
    ("rejected", "blue"),
    ("error", "magenta"),
)


def print_summary(
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    output: Path,
    warnings: Sequence[str] = (),
) -> None:
    """The rich table a radiographer reads: warnings, counts that add up to the files, then every
    study that needs a look, one line each (none left out: the CSV has the same rows)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    for text in warnings:
        console.print(f"[bold yellow]WARNING[/] {text}")
    counts = summary["counts"]
    table = Table(title=f"QA check: {summary['n']} files")
    for name, style in KIND_STYLES:
        table.add_column(name, style=style, justify="right")
    table.add_row(*(str(counts.get(k, 0)) for k, _ in KIND_STYLES))
    console.print(table)
    flagged = [r for r in rows if status_kind(r["status"]) in ("mismatch", "review")]
    if flagged:
        detail = Table(title="Studies to check", show_lines=False)
        for col in ("status", "file", "declared", "predicted", "P(perf)", "SD"):
            detail.add_column(col, no_wrap=True)
        for r in sorted(flagged, key=lambda r: (r["status"] != "mismatch", r["file"])):
            detail.add_row(
                r["status"], str(r.get("_rel") or r["file"]), str(r["declared"]), str(r["predicted"]),
                _num(r.get("prob_perfusion")), _num(r.get("prob_sd")),
            )  # fmt: skip
        console.print(detail)
    for kind, style in (("rejected", "blue"), ("error", "magenta")):
        for r in rows:
            if status_kind(r["status"]) == kind:
                reason = str(r["status"]).split(":", 1)[-1].strip()
                console.print(f"[{style}]{kind}[/] {r.get('_rel') or r['file']}: {reason}")
    console.print(f"Wrote {output / RESULT_FILES[0]} and {output / RESULT_FILES[1]}")


def _num(value: Any) -> str:
    return f"{float(value):.3f}" if value is not None else "-"
