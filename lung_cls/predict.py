"""The pre-archive QA check: does each new study look like the class its header declares?

    python -m lung_cls.predict ckpt=outputs/train/runs/<run> input=/data/today output=qa
    python -m lung_cls.predict ckpt=outputs/train/multiruns/<sweep> input=... output=... overlays=true
    python -m lung_cls.predict ckpt=[a.ckpt,b.ckpt] input=study.dcm output=qa fail_on_mismatch=true
    python -m lung_cls.predict onnx=exported/ input=... output=...        # ONNX Runtime, no torch model

Every study becomes one row of ``predictions.csv`` / ``predictions.json``: the predicted class,
P(perfusion) (the ensemble mean, with SD / min / max over the members), the class the header
declares, and a status:

* ``ok``        - the model is confident and agrees with the declared class (or nothing is declared);
* ``review``    - P(perfusion) lies inside ``review_band`` (default [0.2, 0.8], inclusive): the
  model is not sure, so the study is neither passed nor flagged; ``predicted`` is ``uncertain``.
  Also a confident prediction for a study whose header contradicts itself (declared
  ``ambiguous``: keywords of both classes);
* ``mismatch``  - the model is confident (outside the band) and the declared class is known and
  different: the study is probably mislabelled;
* ``error: <reason>`` - the file could not be read or pre-processed; the other files go on.

Pre-processing is the training run's own (the checkpoint stores its data config), so nothing is
retyped. Each study is pre-processed on its own, so its result never depends on which other files
sit in the same folder: a study whose lungs cannot be separated is aligned (NMI fallback) to the
mean centred *training* image stored in the checkpoint.

Expected problems (no input files, a missing checkpoint, outputs that already exist) end with one
line on stderr and exit code 2; ``fail_on_mismatch=true`` exits with 1 when any study mismatches.
Paths with ``=`` or ``,`` (a sweep's ``model=resnet18,seed=0`` run dirs) need Hydra quoting:
``ckpt="'outputs/.../model=resnet18,seed=0'"`` - or pass the sweep dir itself.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from lung_cls.data.declared import (
    AMBIGUOUS,
    KNOWN_CLASSES,
    SERIES_FIELDS,
    STUDY_FIELDS,
    Declared,
    KeywordMatcher,
    declared_for_file,
    keyword_map_from_config,
    read_declared_manifest,
)
from lung_cls.data.sources import CLASS_NAMES, DataError, has_dicom_preamble, to_plain
from lung_cls.utils.hydra import UserError, clean_errors, quote_path_overrides
from lung_cls.utils.io import atomic_write_json, write_csv_atomic

log = logging.getLogger("lung_cls.predict")

COLUMNS: tuple[str, ...] = (
    "file",
    "patient_id",
    "series_description",
    "predicted",
    "prob_perfusion",
    "prob_sd",
    "prob_min",
    "prob_max",
    "declared",
    "declared_evidence",
    "mismatch",
    "status",
    "preprocessing",
    "shift_y",
    "shift_x",
    "overlay",
)
"""Columns of predictions.csv (predictions.json rows carry the same keys)."""

UNCERTAIN = "uncertain"
STATUSES = ("ok", "review", "mismatch", "error")
_CKPT_GLOB = "checkpoints/best.ckpt"


# --------------------------------------------------------------------------------------------------
# The decision (pure)
# --------------------------------------------------------------------------------------------------
def check_review_band(band: Sequence[float] | None) -> tuple[float, float] | None:
    """Validate ``review_band``: ``[low, high]`` with 0 <= low <= 0.5 <= high <= 1, or None."""
    if band is None:
        return None
    values = list(band)
    if len(values) != 2:
        raise UserError(f"review_band must be [low, high] or null, got {values}")
    lo, hi = float(values[0]), float(values[1])
    if not (0.0 <= lo <= 0.5 <= hi <= 1.0):
        raise UserError(f"review_band must satisfy 0 <= low <= 0.5 <= high <= 1, got [{lo}, {hi}]")
    return lo, hi


def decide(
    prob: float,
    declared: str,
    band: tuple[float, float] | None = (0.2, 0.8),
    *,
    sd: float = 0.0,
    review_sd: float | None = None,
) -> tuple[str, bool, str]:
    """P(perfusion) and the declared class -> ``(predicted, mismatch, status)``.

    Inside the band (inclusive) the model has no confident answer: ``("uncertain", False,
    "review")`` whatever the header says - flagging a mismatch there would cry wolf, passing it
    would claim a certainty the model does not have. Outside it, a known declared class that
    differs from the prediction is a ``mismatch``. An ``ambiguous`` header (keywords of both
    classes, e.g. "LUNG PERFUSION" with a DTPA radiopharmaceutical) contradicts itself, which is how
    a wrongly picked camera protocol often shows: ``review``, with the model's class. ``unknown``
    (nothing declared) is ``ok``: there is nothing to contradict.
    """
    if band is not None and band[0] <= prob <= band[1]:
        return UNCERTAIN, False, "review"
    if review_sd is not None and sd > review_sd:
        return UNCERTAIN, False, "review"
    predicted = CLASS_NAMES[1] if prob >= 0.5 else CLASS_NAMES[0]
    if declared == AMBIGUOUS:
        return predicted, False, "review"
    mismatch = declared in KNOWN_CLASSES and declared != predicted
    return predicted, mismatch, "mismatch" if mismatch else "ok"


# --------------------------------------------------------------------------------------------------
# Models: torch checkpoints or exported ONNX files, one or an ensemble
# --------------------------------------------------------------------------------------------------
def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def resolve_checkpoints(spec: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    """``ckpt`` as given -> checkpoint files: a file, a run dir (``checkpoints/best.ckpt``), a
    sweep dir (every ``**/checkpoints/best.ckpt`` below it), a glob, or a list of these."""
    if spec is None or spec == "":
        raise UserError(
            "no checkpoint given: pass ckpt=PATH (a .ckpt file, a run dir or a sweep dir)"
        )
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise UserError("ckpt=[] lists no checkpoint")
    found: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if _is_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UserError(f"ckpt={text}: the pattern matches no file")
            for m in matches:
                found.extend(_checkpoints_at(Path(m)))
        else:
            found.extend(_checkpoints_at(Path(text)))
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in {q.resolve() for q in unique}:
            unique.append(p)
    return unique


def _checkpoints_at(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        own = path / _CKPT_GLOB
        if own.is_file():
            return [own]
        below = sorted(path.glob(f"**/{_CKPT_GLOB}"))
        if below:
            return below
        raise UserError(f"{path}: no checkpoint found (expected {_CKPT_GLOB} in it or below it)")
    raise UserError(f"{path}: checkpoint not found")


def resolve_onnx_models(spec: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    """``onnx`` as given -> ``.onnx`` files (a folder means its ``model.onnx``)."""
    if spec is None or spec == "":
        raise UserError(
            "backend=onnx needs onnx=DIR (written by lung_cls.export) or onnx=FILE.onnx"
        )
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[Path] = []
    for item in items:
        p = Path(os.path.expanduser(str(item)))
        if p.is_dir():
            p = p / "model.onnx"
        if not p.is_file():
            raise UserError(f"{p}: ONNX model not found")
        out.append(p)
    return out


@dataclass
class Ensemble:
    """What predict needs from the model(s), whatever runs them."""

    backend: str
    members: list[dict[str, Any]]
    """Per member: path, backbone, seed, epoch, (sha256)."""
    prep: dict[str, Any]
    """The resolved pre-processing config shared by all members."""
    reference: np.ndarray | None
    """Mean centred training image (S, S) 0..255 for the NMI fallback, or None."""
    _runners: list[Any] = field(default_factory=list, repr=False)
    device: str = "cpu"

    @property
    def size(self) -> int:
        return int(self.prep["size"])

    @property
    def can_cam(self) -> bool:
        return self.backend == "torch"

    def member_probs(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, S, S) pre-processed images -> P(perfusion) per member, float64 (M, N)."""
        x = np.ascontiguousarray(images, dtype=np.float32)[:, None] / np.float32(255.0)
        out = np.empty((len(self._runners), len(images)), dtype=np.float64)
        if self.backend == "torch":
            import torch

            from lung_cls.models.classifier import predict_probs

            xt = torch.from_numpy(x).to(self.device)
            for m, net in enumerate(self._runners):
                out[m] = predict_probs(net, xt, batch_size=batch_size).double().cpu().numpy()
        else:
            for m, session in enumerate(self._runners):
                probs = [
                    session.run(["prob_perfusion"], {"image": x[s : s + batch_size]})[0]
                    for s in range(0, len(x), batch_size)
                ]
                out[m] = np.concatenate(probs).astype(np.float64).reshape(-1)
        return out

    def cams(self, images: np.ndarray, targets: Sequence[int], batch_size: int = 16) -> np.ndarray:
        """Grad-CAM of each image for its target class, averaged over the members: (N, S, S)."""
        if not self.can_cam:
            raise RuntimeError("CAM needs the torch backend")
        import torch

        from lung_cls.evaluation.cam import compute_gradcam, resolve_cam_layer

        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]
        x = x.to(self.device)
        total = np.zeros(images.shape, dtype=np.float32)
        for net in self._runners:
            total += compute_gradcam(
                net, x, targets, batch_size=batch_size, layer=resolve_cam_layer(net.net)
            )
        return total / len(self._runners)


def _prep_of(meta: Mapping[str, Any], where: Path) -> dict[str, Any]:
    from lung_cls.data.preprocess import prep_config

    data = meta.get("data") or {}
    block = data.get("preprocess") if isinstance(data, Mapping) else None
    if block is None:
        raise UserError(
            f"{where}: the checkpoint stores no pre-processing config (data.preprocess); "
            "it was not written by this version of lung_cls.train"
        )
    try:
        return prep_config(block)
    except ValueError as err:
        raise UserError(f"{where}: bad pre-processing config in the checkpoint ({err})") from None


def _agree(preps: list[dict[str, Any]], paths: list[Path]) -> dict[str, Any]:
    """All members must pre-process identically: else their probabilities are not comparable."""
    first = preps[0]
    for prep, path in zip(preps[1:], paths[1:], strict=True):
        diff = sorted(k for k in set(first) | set(prep) if first.get(k) != prep.get(k))
        if diff:
            shown = ", ".join(f"{k}: {first.get(k)!r} vs {prep.get(k)!r}" for k in diff[:4])
            raise UserError(
                f"{path}: pre-processing differs from {paths[0]} ({shown}); an ensemble needs "
                "members trained with the same data.preprocess"
            )
    return first


def _mean_reference(
    refs: list[np.ndarray | None], size: int, paths: list[Path]
) -> np.ndarray | None:
    usable = [np.asarray(r, np.float32) for r in refs if r is not None]
    usable = [r for r in usable if r.shape == (size, size)]
    if not usable:
        log.warning("No reference image in the model(s): the NMI fallback is unavailable")
        return None
    if len(usable) > 1 and max(float(np.abs(r - usable[0]).max()) for r in usable) > 1.0:
        log.warning("Reference images of the members differ; using their mean (%s ...)", paths[0])
    return np.mean(usable, axis=0).astype(np.float32)


def one_line(err: BaseException) -> str:
    """A checkpoint loader's error as one line (torch.load's own messages run to a page)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if first.count("(") != first.count(")"):
        first = first.split(" (", 1)[0] + " (torch.load failed: not a lung_cls .ckpt file?)"
    return first


def load_torch_ensemble(paths: Sequence[Path], device: str = "cpu") -> Ensemble:
    """Load checkpoints (eval mode) and check that they share one pre-processing config."""
    from lung_cls.models.classifier import load_lung_net

    nets, preps, refs, members = [], [], [], []
    for p in paths:
        try:
            net, meta = load_lung_net(str(p), map_location=device)
        except FileNotFoundError:
            raise UserError(f"{p}: checkpoint not found") from None
        except ValueError as err:
            raise UserError(one_line(err)) from None
        nets.append(net.to(device).eval())
        preps.append(_prep_of(meta, p))
        refs.append(meta.get("reference_image"))
        members.append(
            {
                "path": str(p),
                "backbone": meta.get("backbone"),
                "name": meta.get("name"),
                "seed": meta.get("seed"),
                "epoch": meta.get("epoch"),
            }  # fmt: skip
        )
    prep = _agree(preps, list(paths))
    ref = _mean_reference(refs, int(prep["size"]), list(paths))
    return Ensemble("torch", members, prep, ref, nets, device)


def load_onnx_ensemble(paths: Sequence[Path]) -> Ensemble:
    """Load exported models with their ``model.json`` sidecars (and ``reference.npy``)."""
    from lung_cls.export import load_onnx_model

    sessions, preps, refs, members = [], [], [], []
    for p in paths:
        session, sidecar, ref = load_onnx_model(p)
        sessions.append(session)
        preps.append(_prep_of({"data": {"preprocess": sidecar.get("preprocess")}}, p))
        refs.append(ref)
        members.append(
            {
                "path": str(p),
                "backbone": sidecar.get("backbone"),
                "name": sidecar.get("model_name"),
                "seed": sidecar.get("seed"),
                "epoch": sidecar.get("epoch"),
                "checkpoint_sha256": (sidecar.get("checkpoint") or {}).get("sha256"),
            }  # fmt: skip
        )
    prep = _agree(preps, list(paths))
    ref = _mean_reference(refs, int(prep["size"]), list(paths))
    return Ensemble("onnx", members, prep, ref, sessions)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def _ext(path: Path) -> str:
    return path.suffix[1:].lower() if path.suffix else ""


def find_inputs(
    input_path: str | os.PathLike,
    extensions: Iterable[str] = ("dcm", "dicom", "", "png", "tif", "tiff", "npy"),
    exclude: Iterable[str | os.PathLike] = (),
) -> tuple[list[Path], list[DataError], Path]:
    """Image files under ``input_path`` -> (files, unreadable entries, root).

    A single file is taken as it is (whatever its type: a bad one becomes an error row). In a
    folder, files are picked by extension; extension-less files only with the DICOM preamble;
    files with other extensions (reports, DICOMDIR) are not studies and are counted in the log.
    Folders in ``exclude`` (the output folder, when it sits inside the input) are skipped.
    """
    from lung_cls.data.sources import walk_files

    root = Path(os.path.expanduser(str(input_path)))
    if root.is_file():
        return [root], [], root.parent
    if not root.exists():
        raise UserError(f"input={root}: no such file or folder")
    if not root.is_dir():
        raise UserError(f"input={root}: not a file or folder")
    exts = {str(e).lower().lstrip(".") for e in extensions}
    skip = [Path(e).resolve() for e in exclude]
    errors: list[DataError] = []
    files: list[Path] = []
    ignored = 0
    for p in walk_files(root, errors):
        rp = p.resolve()
        if any(rp == s or s in rp.parents for s in skip):
            continue
        ext = _ext(p)
        if p.name == "DICOMDIR":
            ignored += 1
        elif ext == "" and "" in exts:
            if has_dicom_preamble(p):
                files.append(p)
            else:
                ignored += 1
        elif ext in exts and ext != "":
            files.append(p)
        else:
            ignored += 1
    if ignored:
        log.info(
            "Ignored %d file(s) under %s that are not images of the accepted types", ignored, root
        )
    if not files and not errors:
        shown = ", ".join(sorted("(no extension, DICOM)" if e == "" else f".{e}" for e in exts))
        raise UserError(f"input={root}: no image files found (looked for {shown})")
    return files, errors, root


# --------------------------------------------------------------------------------------------------
# One study: read -> declared class -> pre-process
# --------------------------------------------------------------------------------------------------
def preprocess_study(
    pixels: np.ndarray, prep: Mapping[str, Any], reference: np.ndarray | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """One raw image -> (uint8 (S, S), record), exactly as training pre-processed it.

    Alone on purpose: `preprocess_set` builds the NMI reference from the *set's* centroid-centred
    images; a set of one has none unless the centroid step worked, so a study whose lungs cannot be
    separated is aligned to ``reference`` - the checkpoint's mean centred training image.
    """
    from lung_cls.data.preprocess import preprocess_set

    images, infos = preprocess_set([pixels], prep, reference=reference)
    return images[0], infos[0]


@dataclass
class _Prepared:
    row: dict[str, Any]
    image: np.ndarray | None = None


def _empty_row(path: Path, root: Path) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row.update(file=str(path), mismatch=False)
    row["_rel"] = _relative(path, root)
    return row


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _read_one(
    path: Path,
    root: Path,
    ens: Ensemble,
    matcher: KeywordMatcher,
    opts: Mapping[str, Any],
) -> _Prepared:
    from lung_cls.data.sources import read_image

    row = _empty_row(path, root)
    looks_dicom = _ext(path) in ("dcm", "dicom") or has_dicom_preamble(path)
    declared, texts = declared_for_file(
        path,
        matcher,
        is_dicom=looks_dicom,
        manifest=opts.get("manifest"),
        root=root,
        series_fields=opts.get("series_fields", SERIES_FIELDS),
        study_fields=opts.get("study_fields", STUDY_FIELDS),
    )
    _set_declared(row, declared)
    row["patient_id"] = texts.get("patient_id")
    row["series_description"] = texts.get("series_description")
    try:
        pixels, meta = read_image(path, frame_index=opts.get("frame_index"))
    except DataError as err:
        # The reader names the training knob; here the same knob is top-level.
        row["status"] = f"error: {err.reason.replace('data.frame_index', 'frame_index')}"
        return _Prepared(row)
    except Exception as err:  # noqa: BLE001 - any reader failure is this file's error, not the batch's
        row["status"] = f"error: cannot read file ({type(err).__name__}: {err})"
        return _Prepared(row)
    row["patient_id"] = meta.get("patient_id") or row["patient_id"]
    row["series_description"] = meta.get("series_description") or row["series_description"]
    try:
        image, info = preprocess_study(pixels, ens.prep, ens.reference)
    except Exception as err:  # noqa: BLE001 - same: one bad image must not stop the others
        row["status"] = f"error: pre-processing failed ({type(err).__name__}: {err})"
        return _Prepared(row)
    row["preprocessing"] = info.get("method")
    row["shift_y"] = round(float(info.get("shift_y", 0.0)), 3)
    row["shift_x"] = round(float(info.get("shift_x", 0.0)), 3)
    if info.get("method") == "none":
        log.warning("%s: lungs not separable and no reference image: not centred", path)
    return _Prepared(row, image)


def _set_declared(row: dict[str, Any], declared: Declared) -> None:
    row["declared"] = declared.cls
    row["declared_evidence"] = declared.evidence_text() or None


# --------------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------------
_STATUS_COLOUR = {"ok": "#1a7f37", "review": "#b58100", "mismatch": "#c62828"}


def render_overlay(
    image: np.ndarray, cam: np.ndarray, title: str, path: str | os.PathLike, status: str = "ok"
) -> Path:
    """Grey image | the same with the CAM blended on top (jet, alpha by CAM strength) -> PNG.

    Uses the Agg canvas directly (no pyplot state), so it is safe in any process.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = np.asarray(image, dtype=np.float32) / 255.0
    heat = colormaps["jet"](np.clip(cam, 0.0, 1.0))
    heat[..., 3] = 0.6 * np.clip(cam, 0.0, 1.0)  # weak CAM stays see-through
    fig = Figure(figsize=(5.6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    axes[0].imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("pre-processed", fontsize=8)
    axes[1].imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[1].imshow(heat, interpolation="bilinear")
    axes[1].set_title("Grad-CAM", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8, color=_STATUS_COLOUR.get(status, "black"))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.76, wspace=0.04)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _overlay_title(row: Mapping[str, Any], cam_class: str, n_models: int) -> str:
    prob = row["prob_perfusion"]
    spread = f" ± {row['prob_sd']:.2f} (SD, {n_models} models)" if n_models > 1 else ""
    status = str(row["status"]).upper()
    return (
        f"{row['_rel']}\n"
        f"predicted: {row['predicted']}  P(perfusion) = {prob:.3f}{spread}\n"
        f"declared: {row['declared']}  ->  {status}   (CAM of {cam_class})"
    )


def _overlay_name(rel: str) -> str:
    safe = rel.replace("\\", "/").strip("/").replace("/", "__")
    return "".join(c if c.isalnum() or c in "._-=+" else "_" for c in safe) + ".png"


# --------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------
@dataclass
class PredictOptions:
    """Everything `predict_files` needs besides the model and the files."""

    review_band: tuple[float, float] | None = (0.2, 0.8)
    review_sd: float | None = None
    batch_size: int = 32
    overlays_dir: Path | None = None
    frame_index: int | None = None
    keywords: Mapping[str, Sequence[str]] | None = None
    ignore: Sequence[str] | None = None
    series_fields: Sequence[str] = SERIES_FIELDS
    study_fields: Sequence[str] = STUDY_FIELDS
    manifest: Mapping[str, str] | None = None


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
    matcher = KeywordMatcher(opts.keywords, opts.ignore)
    read_opts = {
        "frame_index": opts.frame_index,
        "manifest": opts.manifest,
        "series_fields": tuple(opts.series_fields),
        "study_fields": tuple(opts.study_fields),
    }
    rows: list[dict[str, Any]] = []
    chunk: list[_Prepared] = []
    n_models = len(ens.members)

    def flush() -> None:
        if not chunk:
            return
        images = np.stack([c.image for c in chunk])
        probs = ens.member_probs(images, batch_size=opts.batch_size)  # (M, N)
        mean = probs.mean(axis=0)
        for j, c in enumerate(chunk):
            p, col = float(mean[j]), probs[:, j]
            sd = float(col.std()) if n_models > 1 else 0.0
            predicted, mismatch, status = decide(
                p, c.row["declared"], opts.review_band, sd=sd, review_sd=opts.review_sd
            )
            c.row.update(
                prob_perfusion=round(p, 6), prob_sd=round(sd, 6),
                prob_min=round(float(col.min()), 6), prob_max=round(float(col.max()), 6),
                predicted=predicted, mismatch=mismatch, status=status,
            )  # fmt: skip
        if opts.overlays_dir is not None and ens.can_cam:
            targets = [int(c.row["prob_perfusion"] >= 0.5) for c in chunk]
            cams = ens.cams(images, targets)
            for c, cam, t in zip(chunk, cams, targets, strict=True):
                name = _overlay_name(c.row["_rel"])
                render_overlay(
                    c.image, cam, _overlay_title(c.row, CLASS_NAMES[t], n_models),
                    opts.overlays_dir / name, status=c.row["status"],
                )  # fmt: skip
                c.row["overlay"] = f"{opts.overlays_dir.name}/{name}"
        chunk.clear()

    iterator: Iterable[Path] = files
    if progress:
        from rich.progress import track

        iterator = track(files, description="Checking studies", transient=True)
    for path in iterator:
        prepared = _read_one(path, root, ens, matcher, read_opts)
        rows.append(prepared.row)
        if prepared.image is not None:
            chunk.append(prepared)
            if len(chunk) >= opts.batch_size:
                flush()
    flush()
    for err in walk_errors:
        row = _empty_row(Path(err.path), root)
        row.update(status=f"error: {err.reason}", declared="unknown")
        rows.append(row)
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts per status (errors pooled) and the files to look at."""
    counts = {s: 0 for s in STATUSES}
    for r in rows:
        key = "error" if str(r["status"]).startswith("error") else str(r["status"])
        counts[key] = counts.get(key, 0) + 1
    return {
        "n": len(rows),
        "counts": counts,
        "mismatches": [r["file"] for r in rows if r["status"] == "mismatch"],
        "review": [r["file"] for r in rows if r["status"] == "review"],
        "errors": [r["file"] for r in rows if str(r["status"]).startswith("error")],
    }


def write_outputs(
    rows: Sequence[Mapping[str, Any]], output: Path, header: Mapping[str, Any]
) -> tuple[Path, Path]:
    """predictions.csv and predictions.json (same rows; the JSON adds the run facts), atomically."""
    clean = [{k: r.get(k) for k in COLUMNS} for r in rows]
    csv_path = write_csv_atomic(output / "predictions.csv", clean, COLUMNS)
    json_path = atomic_write_json(output / "predictions.json", {**header, "rows": clean})
    return csv_path, json_path


def print_summary(
    rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], output: Path
) -> None:
    """The rich table a radiographer reads: counts, then every study that needs a look."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    counts = summary["counts"]
    table = Table(title=f"QA check: {summary['n']} studies")
    for name, style in (
        ("ok", "green"),
        ("review", "yellow"),
        ("mismatch", "red"),
        ("error", "magenta"),
    ):
        table.add_column(name, style=style, justify="right")
    table.add_row(*(str(counts[k]) for k in ("ok", "review", "mismatch", "error")))
    console.print(table)
    flagged = [r for r in rows if r["status"] in ("mismatch", "review")]
    if flagged:
        detail = Table(title="Studies to check", show_lines=False)
        for col in ("status", "file", "declared", "predicted", "P(perf)", "SD"):
            detail.add_column(col)
        for r in sorted(flagged, key=lambda r: (r["status"] != "mismatch", r["file"])):
            detail.add_row(
                r["status"], str(r.get("_rel") or r["file"]), str(r["declared"]), str(r["predicted"]),
                f"{r['prob_perfusion']:.3f}", f"{r['prob_sd']:.3f}",
            )  # fmt: skip
        console.print(detail)
    errors = [r for r in rows if str(r["status"]).startswith("error")]
    for r in errors[:20]:
        console.print(f"[magenta]error[/] {r.get('_rel') or r['file']}: {r['status'][7:]}")
    if len(errors) > 20:
        console.print(f"[magenta]... and {len(errors) - 20} more errors (see predictions.csv)[/]")
    console.print(f"Wrote {output / 'predictions.csv'} and {output / 'predictions.json'}")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    return to_plain(value) if value is not None else None


def run(cfg: DictConfig) -> int:
    """The whole command; returns the exit code (0, or 1 for fail_on_mismatch with a mismatch)."""
    t0 = time.perf_counter()
    output = Path(os.path.expanduser(str(cfg.output)))
    if output.exists() and not output.is_dir():
        raise UserError(f"output={output}: exists and is not a folder")
    existing = [
        output / n for n in ("predictions.csv", "predictions.json") if (output / n).exists()
    ]
    if existing and not cfg.get("overwrite", False):
        raise UserError(f"{existing[0]}: already exists; pass overwrite=true to replace it")
    band = check_review_band(_plain(cfg.get("review_band")))
    backend = str(cfg.get("backend") or "auto")
    if backend == "auto":
        backend = "onnx" if cfg.get("onnx") else "torch"
    if backend not in ("torch", "onnx"):
        raise UserError(f"backend must be auto, torch or onnx, got {backend!r}")
    # Cheap checks first: a bad checkpoint path or an empty folder fails before any model loads.
    if backend == "torch":
        model_paths = resolve_checkpoints(_plain(cfg.get("ckpt")))
    else:
        model_paths = resolve_onnx_models(_plain(cfg.get("onnx")))
    files, walk_errors, root = find_inputs(
        cfg.input, _plain(cfg.get("extensions")) or ("dcm", "dicom", "", "png", "tif", "tiff", "npy"),
        exclude=[output],
    )  # fmt: skip
    manifest = None
    if cfg.get("declared_manifest"):
        manifest = read_declared_manifest(str(cfg.declared_manifest))
    keywords = keyword_map_from_config(_plain(cfg.get("declared_keywords")))
    KeywordMatcher(keywords, _plain(cfg.get("declared_ignore")))  # validate before the slow part

    if backend == "torch":
        ens = load_torch_ensemble(model_paths, device=str(cfg.get("device", "cpu")))
    else:
        ens = load_onnx_ensemble(model_paths)
    log.info(
        "%d model(s) (%s backend), %s px, %d file(s) under %s",
        len(ens.members), backend, ens.size, len(files), root,
    )  # fmt: skip

    overlays_dir = None
    if cfg.get("overlays", False):
        if ens.can_cam:
            overlays_dir = output / "overlays"
            if existing and overlays_dir.is_dir():  # overwrite=true: stale overlays would mislead
                for old in overlays_dir.glob("*.png"):
                    old.unlink()
        else:
            log.warning(
                "overlays=true: CAM overlays need the torch backend (ckpt=...); none written"
            )
    output.mkdir(parents=True, exist_ok=True)
    options = PredictOptions(
        review_band=band,
        review_sd=None if cfg.get("review_sd") is None else float(cfg.review_sd),
        batch_size=int(cfg.get("batch_size", 32)),
        overlays_dir=overlays_dir,
        frame_index=None if cfg.get("frame_index") is None else int(cfg.frame_index),
        keywords=keywords,
        ignore=_plain(cfg.get("declared_ignore")),
        series_fields=tuple(_plain(cfg.get("declared_fields")) or SERIES_FIELDS),
        study_fields=tuple(_plain(cfg.get("declared_study_fields")) or ()),
        manifest=manifest,
    )
    rows = predict_files(ens, files, root, options, walk_errors, progress=sys.stderr.isatty())
    summary = summarise(rows)
    header = {
        "version": 1,
        "backend": backend,
        "models": ens.members,
        "image_size": ens.size,
        "preprocess": ens.prep,
        "review_band": list(band) if band else None,
        "review_sd": options.review_sd,
        "input": str(cfg.input),
        "declared_keywords": keywords,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_outputs(rows, output, header)
    print_summary(rows, summary, output)
    if cfg.get("fail_on_mismatch", False) and summary["counts"]["mismatch"] > 0:
        print(
            f"{summary['counts']['mismatch']} mismatching stud(y/ies): exit 1 (fail_on_mismatch=true)",
            file=sys.stderr,
        )
        return 1
    return 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@clean_errors
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    main()
