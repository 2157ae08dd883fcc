"""The image gate: is this image a lung V/Q scintigram the model was trained on?

A study that passes the header gate may still be another organ under a lung header (a bone-scan
chest view sent with the lung protocol). Two checks, both on the pre-processed image:

* **segmentation**: the two-lung segmentation of pre-processing (`detect_lungs`) must have found two
  plausible lungs (``method == "centroid"``). Where it failed but the model is confident the study
  goes to ``review: lungs not found``; where it failed and the model is unsure too, the study is
  ``rejected: not a lung V/Q image (lungs not found, ...)``;
* **distribution** (out-of-distribution score): at training time, a reference of the training set
  is stored in the checkpoint: for the network's penultimate-layer features *and* for the
  pre-processed image itself (32 x 32), the mean, the top principal axes with their variances and
  the mean residual off those axes. A new image's score per space is its Mahalanobis distance in
  the principal subspace (per axis) plus its residual relative to the training residual (both
  about 1 for a training image). Each space's threshold is calibrated on the *validation* split
  (never seen by the fit): the conformal quantile at ``1 - alpha / 2`` when the split is large
  enough, else its largest score times ``1 + margin``. The row's ``ood_score`` is the larger of the
  two scores over their thresholds: above 1, ``rejected: not a lung V/Q image (OOD score ...)``.
  The validation and test splits' false-rejection rates are stored with the reference.

The reference also holds the training and validation images' pixel hashes and SOP Instance UIDs,
so the QA check can warn when it is run on the model's own training data.

Pure NumPy here (`fit_space`, `space_scores`, `calibrate`, `image_gate`); `build_reference` takes
feature arrays; `attach_reference` (torch) writes it into a checkpoint after training.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REFERENCE_KEY = "lung_cls_ood"
"""Where the reference sits in a checkpoint (and in an ONNX export's model.json: ``ood``)."""
PIXEL_SIZE = 32
MAX_AXES = 32
ALPHA = 0.02
"""Target false-rejection rate of the two spaces together (each gets alpha / 2)."""
MARGIN = 0.1


# ------------------------------------------------------------------------------ one space
def fit_space(x: np.ndarray, max_axes: int = MAX_AXES) -> dict[str, np.ndarray]:
    """Training vectors (N, D) -> mean, principal axes (K, D), their variances, mean residual.

    K = min(max_axes, (N - 1) // 2, D): some variance is always left off the axes, so the
    residual term means something even for a small training set.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"need at least 3 training vectors (N, D), got shape {x.shape}")
    mean = x.mean(axis=0)
    xc = x - mean
    k = max(1, min(int(max_axes), (len(x) - 1) // 2, x.shape[1]))
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    axes = vt[:k]
    total = float((xc**2).sum() / (len(x) - 1))
    var = sv[:k] ** 2 / (len(x) - 1) + 1e-6 * max(total, 1e-12)
    z = xc @ axes.T
    resid = np.maximum((xc**2).sum(axis=1) - (z**2).sum(axis=1), 0.0)
    resid_mean = float(resid.mean()) + 1e-6 * max(total, 1e-12)
    return {
        "mean": mean.astype(np.float32),
        "axes": axes.astype(np.float32),
        "var": var.astype(np.float32),
        "resid_mean": np.float32(resid_mean),
    }


def space_scores(x: np.ndarray, space: Mapping[str, Any]) -> np.ndarray:
    """Vectors (N, D) -> score (N,): Mahalanobis per axis + residual over the training residual."""
    x = np.asarray(x, dtype=np.float64)
    mean = np.asarray(space["mean"], np.float64)
    axes = np.asarray(space["axes"], np.float64)
    var = np.asarray(space["var"], np.float64)
    xc = x - mean
    z = xc @ axes.T
    maha = (z**2 / var).sum(axis=1) / len(var)
    resid = np.maximum((xc**2).sum(axis=1) - (z**2).sum(axis=1), 0.0)
    return 0.5 * (maha + resid / float(space["resid_mean"]))


def calibrate(val_scores: np.ndarray, alpha: float, margin: float = MARGIN) -> tuple[float, str]:
    """Validation scores -> (threshold, how): the conformal quantile (rank ceil((n+1)(1-alpha)))
    when the split has enough images for it, else its largest score times ``1 + margin``."""
    v = np.sort(np.asarray(val_scores, dtype=np.float64))
    n = len(v)
    if n == 0:
        raise ValueError("no validation images to calibrate the OOD threshold on")
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank <= n:
        return float(v[rank - 1]), f"conformal quantile {1 - alpha:.3f} of {n} validation images"
    return float(v[-1] * (1 + margin)), (
        f"largest of {n} validation images x {1 + margin:g} (too few for the {1 - alpha:.3f} "
        "quantile)"
    )


# ------------------------------------------------------------------------------ both spaces
def pixel_vectors(images: np.ndarray, size: int = PIXEL_SIZE) -> np.ndarray:
    """Pre-processed uint8 images (N, S, S) -> (N, size * size) in [0, 1] (area-resized)."""
    from lung_cls.data.preprocess import resize_batch

    imgs = np.asarray(images, dtype=np.float32)
    if imgs.shape[-1] != size:
        imgs = resize_batch(imgs, size, mode="area")
    return imgs.reshape(len(imgs), -1) / 255.0


def build_reference(
    train: Mapping[str, np.ndarray],
    val: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray] | None = None,
    *,
    alpha: float = ALPHA,
    margin: float = MARGIN,
) -> dict[str, Any]:
    """``{"features": (N, D), "pixels": (N, P)}`` of the training, validation (and test) splits ->
    the reference: per space its fit and threshold, and the false-rejection rates measured."""
    spaces: dict[str, Any] = {}
    val_norm, test_norm = [], []
    for name in ("features", "pixels"):
        if name not in train:
            continue
        space = fit_space(train[name])
        thr, how = calibrate(space_scores(val[name], space), alpha / 2, margin)
        space["threshold"] = np.float32(thr)
        spaces[name] = space
        log.debug("OOD %s threshold %.3f (%s)", name, thr, how)
        val_norm.append(space_scores(val[name], space) / thr)
        if test is not None and name in test and len(test[name]):
            test_norm.append(space_scores(test[name], space) / thr)
    if not spaces:
        raise ValueError("no feature space to build an OOD reference from")
    val_s = np.max(val_norm, axis=0)
    out: dict[str, Any] = {
        "version": 1,
        "spaces": spaces,
        "alpha": float(alpha),
        "n_train": int(len(next(iter(train.values())))),
        "n_val": int(len(val_s)),
        "val_false_rejection": float((val_s > 1).mean()),
        "val_score_max": float(val_s.max()),
    }
    if test_norm:
        test_s = np.max(test_norm, axis=0)
        out.update(n_test=int(len(test_s)), test_false_rejection=float((test_s > 1).mean()))
    return out


def ood_scores(
    reference: Mapping[str, Any], features: np.ndarray | None, images: np.ndarray
) -> np.ndarray:
    """The normalised score (N,) of pre-processed images (and their features): the largest of
    the spaces' score / threshold; above 1 the image is not like the training set."""
    parts = []
    spaces = reference["spaces"]
    if "pixels" in spaces:
        parts.append(space_scores(pixel_vectors(images), spaces["pixels"]) / float(
            spaces["pixels"]["threshold"]
        ))  # fmt: skip
    if "features" in spaces and features is not None:
        parts.append(
            space_scores(features, spaces["features"]) / float(spaces["features"]["threshold"])
        )
    return np.max(parts, axis=0)


# ------------------------------------------------------------------------------ the decision
def image_gate(
    prob: float | None,
    segmentation_ok: bool,
    ood: float | None,
    band: tuple[float, float] | None,
) -> tuple[str, str] | None:
    """``(status, gate)`` when the image gate overrides the model's status, else None."""
    if ood is not None and ood > 1.0:
        return f"rejected: not a lung V/Q image (OOD score {ood:.2f} > 1)", "ood"
    if not segmentation_ok:
        unsure = prob is None or (band is not None and band[0] <= prob <= band[1])
        if unsure:
            return "rejected: not a lung V/Q image (lungs not found, model unsure)", "segmentation"
        return "review: lungs not found", "segmentation"
    return None


# ------------------------------------------------------------------------------ storage
def to_storable(ref: Mapping[str, Any]) -> dict[str, Any]:
    """The reference with tensors for arrays: a checkpoint loads with ``weights_only=True``."""
    import torch

    def conv(v: Any) -> Any:
        if isinstance(v, np.ndarray) or isinstance(v, np.floating):
            return torch.from_numpy(np.asarray(v, dtype=np.float32).copy())
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(ref)


def from_stored(ref: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A stored reference (tensors, or lists from JSON) -> NumPy arrays."""
    if not ref:
        return None

    def conv(v: Any) -> Any:
        if hasattr(v, "numpy"):
            return v.detach().cpu().numpy()
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    out = conv(ref)
    for space in out.get("spaces", {}).values():
        for key in ("mean", "axes", "var"):
            space[key] = np.asarray(space[key], dtype=np.float32)
        space["resid_mean"] = float(np.asarray(space["resid_mean"]))
        space["threshold"] = float(np.asarray(space["threshold"]))
    return out


def to_json(ref: Mapping[str, Any]) -> dict[str, Any]:
    """The reference as plain JSON values (an ONNX export's ``model.json``)."""

    def conv(v: Any) -> Any:
        if hasattr(v, "numpy"):
            v = v.detach().cpu().numpy()
        if isinstance(v, np.ndarray):
            return np.round(v.astype(np.float64), 7).tolist()
        if isinstance(v, np.floating | np.integer):
            return v.item()
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(ref)


# ------------------------------------------------------------------------------ training time
def net_outputs(net: Any, x: Any, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-layer features (N, D) and logits (N, C) of a LungNet (grey input adapter + timm
    backbone), both from one pass through the backbone."""
    import torch

    feats, logits = [], []
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                body = net.net.forward_features(net.adapter(x[s : s + batch_size]))
                feats.append(net.net.forward_head(body, pre_logits=True).float().flatten(1))
                logits.append(net.net.forward_head(body).float())
    finally:
        net.train(was)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(feats).cpu().numpy(), torch.cat(logits).cpu().numpy()


def net_features(net: Any, x: Any, batch_size: int = 64) -> np.ndarray:
    """Penultimate-layer features of a LungNet: (N, D)."""
    return net_outputs(net, x, batch_size)[0]


def split_identity(datamodule: Any, split: str) -> dict[str, list[str]]:
    """Pixel hashes and SOP Instance UIDs of a split's images (those the data source knows)."""
    idx = np.unique(datamodule.split_indices(split))
    info = datamodule.prepared.info
    hashes = sorted({str(info[i]["pixel_hash"]) for i in idx if info[i].get("pixel_hash")})
    uids = sorted(
        {str(info[i]["sop_instance_uid"]) for i in idx if info[i].get("sop_instance_uid")}
    )
    return {"pixel_hashes": hashes, "sop_instance_uids": uids}


def attach_reference(ckpt_path: str | os.PathLike, datamodule: Any) -> dict[str, Any]:
    """After training: the OOD reference and the split identities, computed with the weights of
    ``ckpt_path`` (the best checkpoint), written into that checkpoint. Returns the summary."""
    import torch

    from lung_cls.models.classifier import load_lung_net
    from lung_cls.utils.io import atomic_open

    path = Path(ckpt_path)
    net, _ = load_lung_net(str(path))
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "val", "test"):
        idx = np.unique(datamodule.split_indices(split))
        images = datamodule.prepared.images[idx]
        x = datamodule.images01(idx)
        arrays[split] = {"features": net_features(net, x), "pixels": pixel_vectors(images)}
    ref = build_reference(arrays["train"], arrays["val"], arrays["test"])
    ref["train"] = split_identity(datamodule, "train")
    ref["val"] = split_identity(datamodule, "val")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt[REFERENCE_KEY] = to_storable(ref)
    with atomic_open(path, "wb") as fh:
        torch.save(ckpt, fh)
    summary = {k: ref[k] for k in ref if k.endswith("false_rejection") or k.startswith("n_")}
    log.info("OOD reference stored in %s: %s", path, summary)
    return summary


def identity_of(reference: Mapping[str, Any] | None) -> dict[str, dict[str, set[str]]]:
    """``{"train": {"pixel_hashes": set, "sop_instance_uids": set}, "val": ...}``."""
    out: dict[str, dict[str, set[str]]] = {}
    for split in ("train", "val"):
        part = (reference or {}).get(split) or {}
        out[split] = {
            k: set(map(str, part.get(k) or ())) for k in ("pixel_hashes", "sop_instance_uids")
        }
    return out


def split_of(
    identity: Mapping[str, Mapping[str, set[str]]], pixel_hash: str | None, sop_uid: str | None
) -> str | None:
    """``train`` / ``val`` when the image is one of that split's (same pixels or SOP UID)."""
    for split in ("train", "val"):
        part = identity.get(split) or {}
        if pixel_hash and pixel_hash in part.get("pixel_hashes", ()):
            return split
        if sop_uid and sop_uid in part.get("sop_instance_uids", ()):
            return split
    return None


__all__: Sequence[str] = (
    "REFERENCE_KEY",
    "attach_reference",
    "build_reference",
    "calibrate",
    "fit_space",
    "from_stored",
    "identity_of",
    "image_gate",
    "ood_scores",
    "space_scores",
    "split_of",
)


def attach_to_existing(
    ckpt_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Add the reference to a checkpoint trained before the image gate existed: its data set is
    rebuilt from the data config the checkpoint stores (same split, same pre-processing)."""
    import torch
    from omegaconf import OmegaConf

    from lung_cls.data.datamodule import LungScanDataModule

    ckpt = torch.load(Path(ckpt_path), map_location="cpu", weights_only=True)
    meta = ckpt.get("lung_cls") or {}
    if not meta.get("data"):
        from lung_cls.errors import UserError

        raise UserError(f"{ckpt_path}: the checkpoint stores no data config to rebuild its splits")
    dm = LungScanDataModule(
        OmegaConf.create(meta["data"]),
        str(cache_dir) if cache_dir else None,
        int(meta.get("seed", 0)),
    )
    dm.setup()
    return attach_reference(ckpt_path, dm)


def main(argv: Sequence[str]) -> int:
    """``python -m lung_cls.qa.ood CKPT [CACHE_DIR]``: add the reference to an older checkpoint."""
    from lung_cls.errors import UserError

    if not argv or len(argv) > 2:
        raise UserError("usage: python -m lung_cls.qa.ood CKPT [CACHE_DIR]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(attach_to_existing(argv[0], argv[1] if len(argv) > 1 else None))
    return 0


if __name__ == "__main__":
    import sys

    from lung_cls.errors import task_wrapper

    task_wrapper(main)(sys.argv[1:])
