"""Check studies with an ensemble: a set of files (`predict_files`), one file (`check_file`) or one
image in memory (`check_image`, for a caller such as the DICOM node that holds no file).

All three go through the same steps - read and pre-process (`lung_cls.qa.inputs`), score with the
ensemble, decide (`lung_cls.qa.decide`), draw the Grad-CAM overlay - so a study gets the same row
whichever way it arrives.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lung_cls.data.sources import CLASS_NAMES
from lung_cls.qa.decide import DEFAULT_BAND, decide_batch
from lung_cls.qa.declared import SERIES_FIELDS, STUDY_FIELDS, KeywordMatcher
from lung_cls.qa.gate import GateSettings
from lung_cls.qa.inputs import (
    Prepared,
    ReadOptions,
    error_row,
    ignored_row,
    prepare_file,
    prepare_image,
)

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
    gate: GateSettings = field(default_factory=GateSettings)
    """The header gate (`lung_cls.qa.gate`); ``frame_index`` is passed on to it."""
    image_gate: bool = True
    """The image gate (`lung_cls.qa.ood`): segmentation plausibility and the OOD score."""

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            matcher=KeywordMatcher(self.keywords, self.ignore),
            frame_index=self.frame_index,
            manifest=self.manifest,
            series_fields=tuple(self.series_fields),
            study_fields=tuple(self.study_fields),
            gate=replace(self.gate, frame_index=self.frame_index),
        )


def overlay_name(rel: str) -> str:
    """A study's shown path -> a flat, safe PNG file name (``day1/a.dcm`` -> ``day1__a.dcm.png``)."""
    safe = rel.replace("\\", "/").strip("/").replace("/", "__")
    return "".join(c if c.isalnum() or c in "._-=+" else "_" for c in safe) + ".png"


def training_identity(ens: Ensemble) -> dict[str, dict[str, set[str]]]:
    """The members' training and validation images (pixel hashes, SOP Instance UIDs), pooled."""
    from lung_cls.qa.ood import identity_of

    pooled: dict[str, dict[str, set[str]]] = {}
    for m in ens.runners:
        for split, part in identity_of(getattr(m, "ood", None)).items():
            for key, values in part.items():
                pooled.setdefault(split, {}).setdefault(key, set()).update(values)
    return pooled


def score(ens: Ensemble, chunk: Sequence[Prepared], opts: PredictOptions) -> None:
    """Fill the rows of pre-processed studies in place: probabilities, decision, the image gate
    (which may turn the decision into ``review: lungs not found`` or ``rejected: ...``), whether
    the study is one of the model's own training images, the overlay."""
    # Imported here so that `python -m lung_cls.qa.ood` finds its module not yet imported.
    from lung_cls.qa.ood import image_gate, split_of

    if not chunk:
        return
    images = np.stack([c.image for c in chunk])
    # (M, N) probabilities and the OOD scores from one pass of each backbone.
    probs, ood = ens.probs_and_ood(images, opts.batch_size, gate=opts.image_gate)
    declared = [c.row["declared"] for c in chunk]
    identity = training_identity(ens)
    decided = decide_batch(probs, declared, opts.review_band, opts.review_sd)
    for j, (c, fields) in enumerate(zip(chunk, decided, strict=True)):
        c.row.update(fields)
        c.row["gate"] = "model"
        o = None if ood is None else float(ood[j])
        c.row["ood_score"] = None if o is None else round(o, 4)
        c.row["training_split"] = split_of(
            identity, c.meta.get("pixel_hash"), c.meta.get("sop_instance_uid")
        )
        if not opts.image_gate:
            continue
        seg_ok = c.info.get("method") == "centroid"
        over = image_gate(fields["prob_perfusion"], seg_ok, o, opts.review_band)
        if over is not None:
            status, gate = over
            c.row.update(status=status, gate=gate, mismatch=False)
            if status.startswith("rejected"):
                c.row["predicted"] = None  # a rejected study gets no class
    if opts.overlays_dir is not None and ens.can_cam:
        _draw_overlays(ens, chunk, images, opts.overlays_dir)


def _draw_overlays(
    ens: Ensemble, chunk: Sequence[Prepared], images: np.ndarray, folder: Path
) -> None:
    """One PNG per study (`lung_cls.qa.overlay`): the original study with the CAM of the class
    the ensemble predicts (at 0.5, also in the band) mapped back onto it, and its header facts."""
    from lung_cls.qa.overlay import render_study_overlay

    targets = [int(c.row["prob_perfusion"] >= 0.5) for c in chunk]
    cams = ens.cams(images, targets)
    for c, cam, t in zip(chunk, cams, targets, strict=True):
        name = overlay_name(c.row["_rel"])
        raw = c.raw if c.raw is not None else c.image
        render_study_overlay(
            raw, cam, c.info, c.row, c.meta, folder / name, cam_class=CLASS_NAMES[t]
        )
        c.row["overlay"] = f"{folder.name}/{name}"


def predict_files(
    ens: Ensemble,
    files: Sequence[Path],
    root: Path,
    options: PredictOptions | None = None,
    walk_errors: Sequence[DataError] = (),
    progress: bool = False,
    ignored: Sequence[tuple[Path, str]] = (),
) -> list[dict[str, Any]]:
    """Run the QA check over ``files`` -> one row per file, per unreadable folder entry and per
    ignored file (``ignored``: `find_inputs`'s (path, why) of files that are not images).

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
    rows.extend(ignored_row(Path(p), root, why) for p, why in ignored)
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
    *,
    dataset: Any = None,
) -> dict[str, Any]:
    """One image in memory -> its row, no file needed.

    ``pixels``: the raw (H, W) image after rescale slope/intercept (what
    `lung_cls.data.sources.read_image` returns); ``header``: its text fields by the names of
    `lung_cls.qa.declared.SERIES_FIELDS` / ``STUDY_FIELDS`` plus ``patient_id``
    (`lung_cls.qa.declared.dataset_texts` gives them for a pydicom Dataset). ``name`` fills the
    ``file`` column and names the overlay. ``dataset``: the pydicom Dataset the pixels came from;
    given, the header gate (`lung_cls.qa.gate`) runs on it first, as for a file, and a rejected
    study's pixels are never used. Without it only the image gate checks the study.
    """
    opts = options or PredictOptions()
    prepared = prepare_image(
        pixels, header, name, ens.prep, ens.reference, opts.read_options(), dataset=dataset
    )
    if prepared.image is not None:
        score(ens, [prepared], opts)
    return prepared.row


def check_dataset(
    ens: Ensemble, ds: Any, name: str, options: PredictOptions | None = None
) -> dict[str, Any]:
    """One received pydicom Dataset -> its row: the header gate, then its pixels (the anterior
    frame, rescaled) through `check_image`. For a caller such as the DICOM node."""
    from lung_cls.data.sources import dicom_pixels
    from lung_cls.qa.declared import dataset_texts
    from lung_cls.qa.gate import gate_dataset

    opts = options or PredictOptions()
    texts = dataset_texts(ds)
    result, _ = gate_dataset(ds, opts.read_options().gate, texts)
    if not result.passed:  # no pixel is decoded for a rejected object
        return check_image(ens, np.zeros((1, 1), np.float32), texts, name, opts, dataset=ds)
    try:
        pixels, _ = dicom_pixels(ds, name, opts.frame_index)
    except Exception as err:  # noqa: BLE001 - the object's error, as for a file
        from lung_cls.qa.inputs import _reader_error
        from lung_cls.qa.output import empty_row

        row = empty_row(name, name)
        row.update(declared="unknown")
        return _reader_error(row, err).row
    return check_image(ens, pixels, texts, name, opts, dataset=ds)
