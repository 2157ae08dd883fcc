"""Check studies with an ensemble: a set of files (`predict_files`), one file (`check_file`) or one
image in memory (`check_image`, for a caller such as the DICOM node that holds no file).

All three go through the same steps - read and pre-process (`lung_cls.qa.inputs`), score with the
ensemble, decide (`lung_cls.qa.decide`), draw the Grad-CAM overlay - so a study gets the same row
whichever way it arrives.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lung_cls.data.sources import CLASS_NAMES
from lung_cls.qa.decide import DEFAULT_BAND, decide_batch
from lung_cls.qa.declared import SERIES_FIELDS, STUDY_FIELDS, KeywordMatcher
from lung_cls.qa.inputs import Prepared, ReadOptions, error_row, prepare_file, prepare_image

if TYPE_CHECKING:
    from lung_cls.data.sources import DataError
    from lung_cls.qa.backends import Ensemble


@dataclass
class PredictOptions:
    """Everything `predict_files` needs besides the model and the files."""

    review_band: tuple[float, float] | None = DEFAULT_BAND
    review_sd: float | None = None
    batch_size: int = 32
    overlays_dir: Path | None = None
    frame_index: int | None = None
    keywords: Mapping[str, Sequence[str]] | None = None
    ignore: Sequence[str] | None = None
    series_fields: Sequence[str] = SERIES_FIELDS
    study_fields: Sequence[str] = STUDY_FIELDS
    manifest: Mapping[str, str] | None = None

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            matcher=KeywordMatcher(self.keywords, self.ignore),
            frame_index=self.frame_index,
            manifest=self.manifest,
            series_fields=tuple(self.series_fields),
            study_fields=tuple(self.study_fields),
        )


def overlay_name(rel: str) -> str:
    """A study's shown path -> a flat, safe PNG file name (``day1/a.dcm`` -> ``day1__a.dcm.png``)."""
    safe = rel.replace("\\", "/").strip("/").replace("/", "__")
    return "".join(c if c.isalnum() or c in "._-=+" else "_" for c in safe) + ".png"


def score(ens: Ensemble, chunk: Sequence[Prepared], opts: PredictOptions) -> None:
    """Fill the rows of pre-processed studies in place: probabilities, decision, overlay."""
    if not chunk:
        return
    images = np.stack([c.image for c in chunk])
    probs = ens.member_probs(images, batch_size=opts.batch_size)  # (M, N)
    declared = [c.row["declared"] for c in chunk]
    for c, fields in zip(
        chunk, decide_batch(probs, declared, opts.review_band, opts.review_sd), strict=True
    ):
        c.row.update(fields)
    if opts.overlays_dir is not None and ens.can_cam:
        _draw_overlays(ens, chunk, images, opts.overlays_dir)


def _draw_overlays(
    ens: Ensemble, chunk: Sequence[Prepared], images: np.ndarray, folder: Path
) -> None:
    """One PNG per study: the CAM of the class the ensemble predicts (at 0.5, also in the band)."""
    from lung_cls.evaluation.figures import overlay_title, render_overlay

    targets = [int(c.row["prob_perfusion"] >= 0.5) for c in chunk]
    cams = ens.cams(images, targets)
    for c, cam, t in zip(chunk, cams, targets, strict=True):
        row = c.row
        name = overlay_name(row["_rel"])
        title = overlay_title(
            row["_rel"], row["predicted"], row["prob_perfusion"], row["prob_sd"],
            row["declared"], row["status"], cam_class=CLASS_NAMES[t], n_models=len(ens.members),
        )  # fmt: skip
        render_overlay(c.image, cam, title, folder / name, status=row["status"])
        row["overlay"] = f"{folder.name}/{name}"


def predict_files(
    ens: Ensemble,
    files: Sequence[Path],
    root: Path,
    options: PredictOptions | None = None,
    walk_errors: Sequence[DataError] = (),
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run the QA check over ``files`` -> one row per file (and per unreadable folder entry).

    Files are read and pre-processed one at a time and sent to the model(s) in chunks of
    ``batch_size``, so memory stays bounded however many studies there are.
    """
    opts = options or PredictOptions()
    read = opts.read_options()
    rows: list[dict[str, Any]] = []
    chunk: list[Prepared] = []
    iterator: Iterable[Path] = files
    if progress:
        from rich.progress import track

        iterator = track(files, description="Checking studies", transient=True)
    for path in iterator:
        prepared = prepare_file(path, root, ens.prep, ens.reference, read)
        rows.append(prepared.row)
        if prepared.image is not None:
            chunk.append(prepared)
            if len(chunk) >= opts.batch_size:
                score(ens, chunk, opts)
                chunk.clear()
    score(ens, chunk, opts)
    rows.extend(error_row(Path(err.path), root, err.reason) for err in walk_errors)
    return rows


def check_file(
    ens: Ensemble,
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    options: PredictOptions | None = None,
) -> dict[str, Any]:
    """One file -> its row (``root``: what the file is shown relative to; default its folder)."""
    path = Path(path)
    opts = options or PredictOptions()
    prepared = prepare_file(
        path, Path(root) if root is not None else path.parent, ens.prep, ens.reference,
        opts.read_options(),
    )  # fmt: skip
    if prepared.image is not None:
        score(ens, [prepared], opts)
    return prepared.row


def check_image(
    ens: Ensemble,
    pixels: np.ndarray,
    header: Mapping[str, Any],
    name: str,
    options: PredictOptions | None = None,
) -> dict[str, Any]:
    """One image in memory -> its row, no file needed.

    ``pixels``: the raw (H, W) image after rescale slope/intercept (what
    `lung_cls.data.sources.read_image` returns); ``header``: its text fields by the names of
    `lung_cls.qa.declared.SERIES_FIELDS` / ``STUDY_FIELDS`` plus ``patient_id``
    (`lung_cls.qa.declared.dataset_texts` gives them for a pydicom Dataset). ``name`` fills the
    ``file`` column and names the overlay.
    """
    opts = options or PredictOptions()
    prepared = prepare_image(pixels, header, name, ens.prep, ens.reference, opts.read_options())
    if prepared.image is not None:
        score(ens, [prepared], opts)
    return prepared.row
