"""Each model's test CAMs pooled over seeds, their class averages, and the pixel-wise statistics.

The paper's CAM sets are the test images of all repetitions of a model: the same image enters
once per seed. Those maps are not independent samples, so the pixel-wise statistics
(:func:`cam_statistics`) first average each image's maps over the seeds that tested it and test
one map per image (the max-T permutations then shuffle whole images). The maps are Grad-CAMs
min-max scaled per image to [0, 1] (pytorch-grad-cam), so every statistic here compares relative
spatial patterns, not activation strength.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lung_cls.report.discover import RunRecord, reason
from lung_cls.runs import CamKey, masks_of, read_cams

#: Class order of the figures and tables: perfusion (label 1) first, as in the paper.
LABELS_SHOWN: tuple[int, int] = (1, 0)


def _class_names() -> tuple[str, str]:
    from lung_cls.evaluation.groundtruth import CLASS_NAMES

    return CLASS_NAMES


#: ``cams.npz`` array of the raw Grad-CAMs (``lung_cls.evaluation.cam.RAW_CAMS_KEY``; named here
#: too so the report does not import torch).
RAW_CAMS_KEY = "cams_raw"
#: The CAM scales the statistics can test.
CAM_SCALES = ("minmax", "raw")
#: Phantom truth masks whose union (over the test images) is the body region tested by default:
#: the lungs and the neck (trachea, oropharynx, esophagus).
BODY_MASKS = ("lungs", "trachea", "oropharynx", "esophagus")


@dataclass
class ModelCams:
    cams: np.ndarray  # float32 (N, H, W), pooled over seeds
    labels: np.ndarray
    ids: np.ndarray
    images: np.ndarray | None
    masks: dict[str, np.ndarray]
    n_runs: int
    raw: np.ndarray | None = None  # float32 (N, H, W) raw CAMs, when every run stored them


def _raw_of(arrays: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray | None:
    raw = arrays.get(RAW_CAMS_KEY)
    if raw is None or raw.shape != shape:
        return None
    return np.nan_to_num(np.asarray(raw, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _read_run_cams(run: RunRecord, shape: tuple[int, ...] | None) -> dict[str, Any]:
    """One run's ``cams.npz`` as the arrays pooling needs; ``ValueError`` naming the file when
    it is unreadable or its maps differ in size (``shape``) from the model's other runs."""
    arrays = read_cams(run.cams_path)
    try:
        cams = np.asarray(arrays[CamKey.CAMS.value], dtype=np.float32)
        if shape is not None and cams.shape[1:] != shape:
            raise ValueError(
                f"map size {cams.shape[1:]} differs from the model's other runs {shape}"
            )
        ids, images = arrays.get(CamKey.IDS.value), arrays.get(CamKey.IMAGES.value)
        return {
            "cams": np.clip(np.nan_to_num(cams), 0.0, 1.0),
            "labels": arrays[CamKey.LABELS.value].astype(np.int64),
            "ids": ids.astype(str)
            if ids is not None
            else np.array([f"{run.name}:{i}" for i in range(len(cams))]),
            "images": images if images is not None and images.shape == cams.shape else None,
            "masks": masks_of(arrays),
            "raw": _raw_of(arrays, cams.shape),
        }
    except (TypeError, ValueError) as err:
        raise ValueError(f"{run.cams_path}: {err}") from None


def load_model_cams(runs: Sequence[RunRecord], notes: list[str]) -> ModelCams | None:
    """All runs' test CAMs of one model, pooled over seeds (the paper's CAM sets).

    A ``cams.npz`` that cannot be read, or whose maps differ in size from the model's other
    runs, is left out with a note; so are truth masks that not every run has. None when no run
    has usable CAMs.
    """
    parts: list[dict[str, Any]] = []
    for r in runs:
        if r.cams_path is None:
            continue
        try:
            parts.append(_read_run_cams(r, parts[0]["cams"].shape[1:] if parts else None))
        except (OSError, ValueError) as err:
            notes.append(f"{r.cams_path}: not used ({reason(err, r.cams_path)})")
    if not parts:
        return None
    masks = [p["masks"] for p in parts]
    common = set.intersection(*(set(m) for m in masks))
    if any(set(m) != common for m in masks):
        notes.append(
            f"truth masks differ between runs of {runs[0].model}; using the shared ones {sorted(common)}"
        )
    images = [p["images"] for p in parts]
    raws = [p["raw"] for p in parts]
    return ModelCams(
        cams=np.concatenate([p["cams"] for p in parts]),
        labels=np.concatenate([p["labels"] for p in parts]),
        ids=np.concatenate([p["ids"] for p in parts]),
        images=np.concatenate(images) if all(i is not None for i in images) else None,
        masks={k: np.concatenate([m[k] for m in masks]) for k in sorted(common)},
        n_runs=len(parts),
        raw=np.concatenate(raws) if all(r is not None for r in raws) else None,
    )


def mean_images(model_cams: Mapping[str, ModelCams]) -> dict[str, np.ndarray]:
    """Per-class average test image over unique image ids (the first model with images).

    Unique ids, because every seed repeats the same test images; the first model, because all
    models of a sweep share one split.
    """
    names = _class_names()
    for mc in model_cams.values():
        if mc.images is None:
            continue
        _, first = np.unique(mc.ids, return_index=True)
        out = {}
        for label in LABELS_SHOWN:
            sel = first[mc.labels[first] == label]
            if sel.size:
                out[names[label]] = mc.images[sel].astype(np.float64).mean(axis=0)
        return out
    return {}


def class_mean_cams(
    model_cams: Mapping[str, ModelCams],
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, int]]]:
    """Per model and class: the mean CAM (classes without maps left out) and the map count."""
    names = _class_names()
    means = {
        m: {
            names[k]: mc.cams[mc.labels == k].mean(axis=0)
            for k in LABELS_SHOWN
            if (mc.labels == k).any()
        }
        for m, mc in model_cams.items()
    }
    counts = {
        m: {names[k]: int((mc.labels == k).sum()) for k in LABELS_SHOWN}
        for m, mc in model_cams.items()
    }
    return means, counts


#: What the pixel-wise tests count as one sample (report.json and the methods text say it).
CAM_UNIT = "image (its CAMs averaged over the seeds that tested it)"


def body_mask(
    mc: ModelCams, how: str | np.ndarray = "auto", threshold: float = 0.1
) -> tuple[np.ndarray, str]:
    """The pixels the CAM statistics test, and a sentence saying where they come from.

    ``how``: ``"auto"`` - on the phantom the union over the test images of the :data:`BODY_MASKS`
    truth masks (lungs and neck), otherwise the pixels where the mean test image reaches
    ``threshold`` x its maximum; ``"none"`` - every pixel; or a bool array (H, W) given by the
    user. Testing the background only adds tests (and FDR/FWER penalty) where no CAM can mean
    anything. Falls back to every pixel, saying so, when a rule selects nothing.
    """
    shape = mc.cams.shape[1:]
    if isinstance(how, np.ndarray):
        if how.shape != shape:
            raise ValueError(f"the CAM mask has shape {how.shape}, the CAMs {shape}")
        return how.astype(bool), "user-given mask"
    if how == "none":
        return np.ones(shape, bool), "every pixel"
    if how != "auto":
        raise ValueError(f"unknown CAM mask rule {how!r}: expected auto, none or a mask array")
    names = [n for n in BODY_MASKS if n in mc.masks]
    if "lungs" in names:
        mask = np.zeros(shape, bool)
        for n in names:
            mask |= mc.masks[n].any(axis=0)
        if mask.any():
            return mask, "union of the test images' truth masks " + "+".join(names)
    if mc.images is not None:
        _, first = np.unique(mc.ids, return_index=True)
        mean = mc.images[first].astype(np.float64).mean(axis=0)
        mask = mean >= threshold * mean.max() if mean.max() > 0 else np.zeros(shape, bool)
        if mask.any():
            return mask, f"mean test image >= {threshold:g} x its maximum"
    return np.ones(shape, bool), "every pixel (no truth masks or images to build a body mask)"


def cam_statistics(
    mc: ModelCams,
    n_perm: int,
    seed: int,
    alpha: float,
    equal_var: bool,
    *,
    scale: str = "minmax",
    mask: str | np.ndarray = "auto",
    mask_threshold: float = 0.1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Difference map and pixel-wise tests of perfusion vs ventilation CAMs, one map per image.

    Each test image's CAMs are averaged over the seeds that tested it
    (:func:`~lung_cls.evaluation.stats.image_means`); the t-tests, BH-FDR and the max-T
    permutations (which shuffle the class labels of whole images) run on those means, at the
    pixels of :func:`body_mask` only. ``scale``: ``"minmax"`` tests pytorch-grad-cam's per-image
    scaled maps (the paper's), ``"raw"`` the maps before its ReLU and scaling (``cams_raw``;
    when a run lacks them the scaled maps are used and a note says so).

    Returns the maps for Fig. 3 (``mean_cam``, ``diff`` = ventilation mean - perfusion mean,
    ``p_mask`` uncorrected, ``fdr_mask`` Benjamini-Hochberg, ``fwer_mask`` max-T permutations
    when ``n_perm > 0``; all False outside the mask) and the numbers for
    ``report.json["cam_statistics"]``: ``unit``, ``cam_scale``, ``mask``, ``n_tests`` (pixels
    tested), ``n_maps`` (image x seed maps), ``n_images``, ``n_perfusion`` / ``n_ventilation``.
    """
    from lung_cls.evaluation.stats import (
        fdr_bh,
        image_means,
        permutation_maxT,
        pixelwise_ttest,
        significant_fractions,
    )

    if scale not in CAM_SCALES:
        raise ValueError(f"unknown CAM scale {scale!r}: expected one of {CAM_SCALES}")
    notes = []
    source = mc.cams
    if scale == "raw":
        if mc.raw is None:
            notes.append("no raw CAMs (cams_raw) in every run: the min-max scaled CAMs were tested")
            scale = "minmax"
        else:
            source = mc.raw
    region, region_text = body_mask(mc, mask, mask_threshold)
    maps, labels, _, _ = image_means(source, mc.labels, mc.ids)
    perf, vent = maps[labels == 1], maps[labels == 0]
    fig: dict[str, Any] = {"mean_cam": maps.mean(axis=0)}
    info: dict[str, Any] = {
        "unit": CAM_UNIT,
        "cam_scale": scale,
        "mask": region_text,
        "n_tests": int(region.sum()),
        "n_pixels_total": int(region.size),
        "n_maps": int(len(mc.cams)),
        "n_images": int(len(maps)),
        "n_perfusion": int(len(perf)),
        "n_ventilation": int(len(vent)),
        "n_runs": mc.n_runs,
    }
    if len(perf) and len(vent):
        fig["diff"] = vent.mean(axis=0) - perf.mean(axis=0)
        info["diff_min"], info["diff_max"] = float(fig["diff"].min()), float(fig["diff"].max())
    if len(perf) < 2 or len(vent) < 2:
        notes.append("fewer than 2 images in a class: no t-test")
        info["note"] = "; ".join(notes)
        return fig, info
    _, p_in = pixelwise_ttest(perf[:, region], vent[:, region], equal_var=equal_var)
    p = np.ones(region.shape)
    p[region] = p_in
    fdr_in, _ = fdr_bh(p_in, alpha)
    fig["fdr_mask"] = np.zeros(region.shape, bool)
    fig["fdr_mask"][region] = fdr_in
    pf_in = None
    if n_perm > 0:
        fwer_in, pf_in = permutation_maxT(
            perf[:, region], vent[:, region], n_perm=n_perm, seed=seed, alpha=alpha,
            equal_var=equal_var,
        )  # fmt: skip
        fig["fwer_mask"] = np.zeros(region.shape, bool)
        fig["fwer_mask"][region] = fwer_in
    fig["p_mask"] = p < alpha
    fig["tested"] = region  # the captions give the share of these, as the table does
    info["significant_fraction"] = significant_fractions(p_in, alpha, pf_in)
    info["min_p"] = float(p_in.min())
    if pf_in is not None:
        info["min_p_fwer"] = float(np.min(pf_in))
    if notes:
        info["note"] = "; ".join(notes)
    return fig, info


def all_cam_statistics(
    model_cams: Mapping[str, ModelCams],
    n_perm: int,
    seed: int,
    alpha: float,
    equal_var: bool,
    **options: Any,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """:func:`cam_statistics` of every model (``options``: its ``scale``, ``mask``,
    ``mask_threshold``): the Fig. 3 maps of the models that have CAMs of both classes, and the
    numbers of all of them."""
    stat_figs, stat_info = {}, {}
    for m, mc in model_cams.items():
        fig, info = cam_statistics(mc, n_perm, seed, alpha, equal_var, **options)
        stat_info[m] = info
        if "diff" in fig:
            stat_figs[m] = fig
    return stat_figs, stat_info
