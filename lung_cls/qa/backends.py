"""The model(s) behind a QA check: members that score images, and the ensemble that averages them.

A member is anything with the small `Member` protocol: a torch checkpoint (`TorchMember`, which
can also draw Grad-CAMs) or an exported ONNX model run by ONNX Runtime (`OnnxMember`, no torch
model needed). The `Ensemble` knows nothing about either kind: it checks that the members
pre-process alike, stacks their probabilities and averages their CAMs. A new runtime is a new
member class, not a new branch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from lung_cls.errors import UserError
from lung_cls.qa.checkpoints import (
    checkpoint_info,
    checkpoint_preprocessing,
    load_checkpoint,
    preprocessing_block,
)
from lung_cls.qa.onnx import FEATURES_NAME, INPUT_NAME, OUTPUT_NAMES, load_onnx_model

log = logging.getLogger("lung_cls.predict")


class Member(Protocol):
    """One model of an ensemble, whatever runs it."""

    backend: ClassVar[str]
    """``torch`` or ``onnx``: recorded in predictions.json."""
    can_cam: ClassVar[bool]
    info: dict[str, Any]
    """What predictions.json tells about the member: path, backbone, seed, epoch, ..."""
    prep: dict[str, Any]
    """The resolved pre-processing config of its training run."""
    reference: np.ndarray | None
    """Mean centred training image (S, S) 0..255 for the NMI fallback, or None."""

    def probs(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """float32 (N, 1, S, S) in [0, 1] -> P(perfusion), float64 (N,)."""
        ...

    def cams(self, images: np.ndarray, targets: Sequence[int], batch_size: int) -> np.ndarray:
        """uint8 (N, S, S) -> Grad-CAM of each image for its target class, float32 (N, S, S)."""
        ...

    def features(self, x: np.ndarray, batch_size: int) -> np.ndarray | None:
        """float32 (N, 1, S, S) -> penultimate-layer features (N, D), or None if unavailable."""
        ...

    # Optional: ``probs_features(x, batch_size) -> (probs, features | None)``, both from one pass
    # through the backbone (`Ensemble.probs_and_ood` uses it where a member has it).


def calibrated(probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """P(perfusion) with the member's stored temperature applied (Guo et al. 2017), so the review
    band means what it says; unchanged without one (``None`` or 1)."""
    if temperature is None or float(temperature) == 1.0:
        return probs
    from lung_cls.evaluation.calibration import scale_probs

    return scale_probs(probs, float(temperature))


@dataclass
class TorchMember:
    """A training checkpoint, run by PyTorch."""

    backend: ClassVar[str] = "torch"
    can_cam: ClassVar[bool] = True
    net: Any
    info: dict[str, Any]
    prep: dict[str, Any]
    reference: np.ndarray | None
    device: str = "cpu"
    ood: dict[str, Any] | None = None
    """The training set's OOD reference (`lung_cls.qa.ood`), or None (an older checkpoint)."""
    temperature: float | None = None
    """Temperature fitted on validation at training time (None: probabilities as the net gives)."""

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> TorchMember:
        from lung_cls.qa.ood import from_stored

        net, meta = load_checkpoint(path, device)
        return cls(
            net.to(device).eval(),
            checkpoint_info(path, meta),
            checkpoint_preprocessing(meta, path),
            meta.get("reference_image"),
            device,
            from_stored(meta.get("ood_reference")),
            temperature=meta.get("temperature"),
        )

    def features(self, x: np.ndarray, batch_size: int) -> np.ndarray | None:
        import torch

        from lung_cls.qa.ood import net_features

        return net_features(self.net, torch.from_numpy(x).to(self.device), batch_size)

    def probs_features(self, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """P(perfusion) and the penultimate-layer features from one pass through the backbone
        (`probs` and `features` each run it: twice the time when the image gate needs both)."""
        import torch

        from lung_cls.qa.ood import net_outputs

        feats, logits = net_outputs(self.net, torch.from_numpy(x).to(self.device), batch_size)
        probs = torch.softmax(torch.from_numpy(logits), dim=1)[:, 1] if len(logits) else None
        p = np.zeros(0) if probs is None else probs.double().numpy()
        return calibrated(p, self.temperature), feats

    def probs(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        import torch

        from lung_cls.models.classifier import predict_probs

        xt = torch.from_numpy(x).to(self.device)
        probs = predict_probs(self.net, xt, batch_size=batch_size).double().cpu().numpy()
        return calibrated(probs, self.temperature)

    def cams(self, images: np.ndarray, targets: Sequence[int], batch_size: int) -> np.ndarray:
        import torch

        from lung_cls.evaluation.cam import compute_gradcam, resolve_cam_layer

        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]
        x = x.to(self.device)
        return compute_gradcam(
            self.net, x, targets, batch_size=batch_size, layer=resolve_cam_layer(self.net)
        )


@dataclass
class OnnxMember:
    """An export of `lung_cls.qa.onnx` (model.onnx + model.json), run by ONNX Runtime."""

    backend: ClassVar[str] = "onnx"
    can_cam: ClassVar[bool] = False
    session: Any
    info: dict[str, Any]
    prep: dict[str, Any]
    reference: np.ndarray | None
    ood: dict[str, Any] | None = None
    temperature: float | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> OnnxMember:
        from lung_cls.qa.ood import from_stored

        session, sidecar, reference = load_onnx_model(path, threads)
        info = {
            "path": str(path),
            "backbone": sidecar.get("backbone"),
            "name": sidecar.get("model_name"),
            "seed": sidecar.get("seed"),
            "epoch": sidecar.get("epoch"),
            "checkpoint_sha256": (sidecar.get("checkpoint") or {}).get("sha256"),
            "pretrained": sidecar.get("pretrained"),
            "temperature": sidecar.get("temperature"),
        }
        prep = preprocessing_block(sidecar.get("preprocess"), path)
        ood = from_stored(sidecar.get("ood"))
        return cls(session, info, prep, reference, ood, temperature=sidecar.get("temperature"))

    def features(self, x: np.ndarray, batch_size: int) -> np.ndarray | None:
        names = {o.name for o in self.session.get_outputs()}
        if FEATURES_NAME not in names:
            return None  # an export from before the features output
        feats = [
            self.session.run([FEATURES_NAME], {INPUT_NAME: x[s : s + batch_size]})[0]
            for s in range(0, len(x), batch_size)
        ]
        return np.concatenate(feats).astype(np.float32)

    def probs(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        probs = [
            self.session.run([OUTPUT_NAMES[1]], {INPUT_NAME: x[s : s + batch_size]})[0]
            for s in range(0, len(x), batch_size)
        ]
        return calibrated(np.concatenate(probs).astype(np.float64).reshape(-1), self.temperature)

    def probs_features(
        self, x: np.ndarray, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Both outputs of one ``session.run`` (an export without features: probs and None)."""
        if FEATURES_NAME not in {o.name for o in self.session.get_outputs()}:
            return self.probs(x, batch_size), None
        runs = [
            self.session.run([OUTPUT_NAMES[1], FEATURES_NAME], {INPUT_NAME: x[s : s + batch_size]})
            for s in range(0, len(x), batch_size)
        ]
        probs = np.concatenate([r[0] for r in runs]).astype(np.float64).reshape(-1)
        return calibrated(probs, self.temperature), np.concatenate([r[1] for r in runs]).astype(
            np.float32
        )

    def cams(self, images: np.ndarray, targets: Sequence[int], batch_size: int) -> np.ndarray:
        raise RuntimeError("CAM needs the torch backend")


def _unit(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) pre-processed images -> the members' input, float32 (N, 1, S, S) in [0, 1]."""
    return np.ascontiguousarray(images, dtype=np.float32)[:, None] / np.float32(255.0)


# slots: an attribute set from outside (a misspelt or an old name) fails instead of being ignored.
@dataclass(slots=True)
class Ensemble:
    """What a QA check needs from its model(s): one pre-processing, probabilities per member, CAMs.

    Build it with `Ensemble.of` (or the ``load_*`` helpers), which checks that the members agree.
    """

    runners: list[Member]
    """The member objects that score the images."""
    prep: dict[str, Any]
    """The resolved pre-processing config shared by all members."""
    reference: np.ndarray | None = field(repr=False)
    """Mean centred training image (S, S) 0..255 for the NMI fallback, or None."""

    @classmethod
    def of(cls, members: Sequence[Member]) -> Ensemble:
        if not members:
            raise UserError("no model to run")
        paths = [str(m.info.get("path")) for m in members]
        prep = _agree([m.prep for m in members], paths)
        reference = _mean_reference([m.reference for m in members], int(prep["size"]), paths)
        return cls(list(members), prep, reference)

    @property
    def members(self) -> list[dict[str, Any]]:
        """Per member: path, backbone, name, seed, epoch, (checkpoint_sha256) - the ``models`` of
        predictions.json. (Dicts, as before the move to lung_cls.qa; the objects are `runners`.)"""
        return [m.info for m in self.runners]

    @property
    def backend(self) -> str:
        return "+".join(sorted({m.backend for m in self.runners}))

    @property
    def size(self) -> int:
        return int(self.prep["size"])

    @property
    def can_cam(self) -> bool:
        return all(m.can_cam for m in self.runners)

    def member_probs(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, S, S) pre-processed images -> P(perfusion) per member, float64 (M, N)."""
        x = _unit(images)
        return np.stack([m.probs(x, batch_size) for m in self.runners])

    @property
    def has_ood(self) -> bool:
        """Every member carries a training-set reference: the image gate can score images."""
        return all((getattr(m, "ood", None) or {}).get("spaces") for m in self.runners)

    def ood_scores(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray | None:
        """uint8 (N, S, S) -> the members' mean normalised OOD score (N,) (`lung_cls.qa.ood`:
        above 1 the image is unlike the training set), or None without references."""
        from lung_cls.qa.ood import ood_scores

        if not self.has_ood or len(images) == 0:
            return None
        x = _unit(images)
        per = [ood_scores(m.ood, m.features(x, batch_size), images) for m in self.runners]
        return np.mean(per, axis=0)

    def probs_and_ood(
        self, images: np.ndarray, batch_size: int = 32, gate: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`member_probs` and (with ``gate`` and references) `ood_scores` of the same images,
        each member's backbone run once for both where it can (``probs_features``)."""
        from lung_cls.qa.ood import ood_scores

        x = _unit(images)
        want = gate and self.has_ood and len(images) > 0
        probs, per = [], []
        for m in self.runners:
            fused = getattr(m, "probs_features", None) if want else None
            if fused is not None:
                p, f = fused(x, batch_size)
            else:
                p, f = m.probs(x, batch_size), (m.features(x, batch_size) if want else None)
            probs.append(p)
            if want:
                per.append(ood_scores(m.ood, f, images))
        return np.stack(probs), (np.mean(per, axis=0) if want else None)

    def cams(self, images: np.ndarray, targets: Sequence[int], batch_size: int = 16) -> np.ndarray:
        """Grad-CAM of each image for its target class, averaged over the members: (N, S, S)."""
        if not self.can_cam:
            raise RuntimeError("CAM needs the torch backend")
        total = np.zeros(images.shape, dtype=np.float32)
        for m in self.runners:
            total += m.cams(images, targets, batch_size)
        return total / len(self.runners)


def _agree(preps: list[dict[str, Any]], paths: list[str]) -> dict[str, Any]:
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
    refs: list[np.ndarray | None], size: int, paths: list[str]
) -> np.ndarray | None:
    usable = [np.asarray(r, np.float32) for r in refs if r is not None]
    usable = [r for r in usable if r.shape == (size, size)]
    if not usable:
        log.warning("No reference image in the model(s): the NMI fallback is unavailable")
        return None
    if len(usable) > 1 and max(float(np.abs(r - usable[0]).max()) for r in usable) > 1.0:
        log.warning("Reference images of the members differ; using their mean (%s ...)", paths[0])
    return np.mean(usable, axis=0).astype(np.float32)


def load_torch_ensemble(paths: Sequence[str | os.PathLike], device: str = "cpu") -> Ensemble:
    """Load checkpoints (eval mode) and check that they share one pre-processing config."""
    return Ensemble.of([TorchMember.load(p, device) for p in paths])


def load_onnx_ensemble(
    paths: Sequence[str | os.PathLike], threads: int | None = None, device: str = "cpu"
) -> Ensemble:
    """Load exported models with their ``model.json`` sidecars (and ``reference.npy``).

    ``threads``: ONNX Runtime intra-op threads (None: its default). ``device`` is taken for the
    same signature as `load_torch_ensemble`; ONNX Runtime runs on the CPU here.
    """
    if device != "cpu":
        log.warning("device=%s: the ONNX backend runs on the CPU", device)
    return Ensemble.of([OnnxMember.load(p, threads) for p in paths])


LOADERS: dict[str, Callable[..., Ensemble]] = {
    TorchMember.backend: load_torch_ensemble,
    OnnxMember.backend: load_onnx_ensemble,
}
"""Backend name (``backend=`` of the predict config) -> the loader of its ensemble."""
