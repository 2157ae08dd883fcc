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


@dataclass
class ModelCams:
    cams: np.ndarray  # float32 (N, H, W), pooled over seeds
    labels: np.ndarray
    ids: np.ndarray
    images: np.ndarray | None
    masks: dict[str, np.ndarray]
    n_runs: int


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
    return ModelCams(
        cams=np.concatenate([p["cams"] for p in parts]),
        labels=np.concatenate([p["labels"] for p in parts]),
        ids=np.concatenate([p["ids"] for p in parts]),
        images=np.concatenate(images) if all(i is not None for i in images) else None,
        masks={k: np.concatenate([m[k] for m in masks]) for k in sorted(common)},
        n_runs=len(parts),
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


def cam_statistics(
    mc: ModelCams, n_perm: int, seed: int, alpha: float, equal_var: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Difference map and pixel-wise tests of perfusion vs ventilation CAMs, one map per image.

    Each test image's CAMs are averaged over the seeds that tested it
    (:func:`~lung_cls.evaluation.stats.image_means`); the t-tests, BH-FDR and the max-T
    permutations (which shuffle the class labels of whole images) run on those means.

    Returns the maps for Fig. 3 (``mean_cam``, ``diff`` = ventilation mean - perfusion mean,
    ``p_mask`` uncorrected, ``fdr_mask`` Benjamini-Hochberg, ``fwer_mask`` max-T permutations
    when ``n_perm > 0``) and the numbers for ``report.json["cam_statistics"]``: ``unit``,
    ``n_maps`` (image x seed maps), ``n_images``, ``n_perfusion`` / ``n_ventilation`` (images).
    """
    from lung_cls.evaluation.stats import (
        fdr_bh,
        image_means,
        permutation_maxT,
        pixelwise_ttest,
        significant_fractions,
    )

    maps, labels, _, _ = image_means(mc.cams, mc.labels, mc.ids)
    perf, vent = maps[labels == 1], maps[labels == 0]
    fig: dict[str, Any] = {"mean_cam": maps.mean(axis=0)}
    info: dict[str, Any] = {
        "unit": CAM_UNIT,
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
        info["note"] = "fewer than 2 images in a class: no t-test"
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


def all_cam_statistics(
    model_cams: Mapping[str, ModelCams], n_perm: int, seed: int, alpha: float, equal_var: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """:func:`cam_statistics` of every model: the Fig. 3 maps of the models that have CAMs of
    both classes, and the numbers of all of them."""
    stat_figs, stat_info = {}, {}
    for m, mc in model_cams.items():
        fig, info = cam_statistics(mc, n_perm, seed, alpha, equal_var)
        stat_info[m] = info
        if "diff" in fig:
            stat_figs[m] = fig
    return stat_figs, stat_info
