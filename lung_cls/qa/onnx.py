"""ONNX export of a trained checkpoint, its parity check, its sidecar, and loading it back.

An export folder holds:

* ``model.onnx`` - input ``image``: float32 (N, 1, S, S), the pre-processed uint8 image / 255,
  dynamic batch; outputs ``logits`` (N, 2: ventilation, perfusion), ``prob_perfusion`` (N,) and
  ``features`` (N, D), the penultimate-layer features the image gate scores (`lung_cls.qa.ood`).
  The grey-to-RGB adapter and the ImageNet normalisation are inside the graph.
* ``reference.npy`` - the mean centred training image (S, S) 0..255, the target of the NMI fallback
  for studies whose lungs cannot be separated (absent if the checkpoint has none).
* ``model.json`` - the sidecar: the pre-processing config (the training run's ``data.preprocess``,
  with every default filled in), class names, input size, backbone, opset, the SHA-256 of the
  checkpoint and of the ONNX file, the measured PyTorch/ONNX Runtime parity, and ``ood``: the
  checkpoint's training-set reference for the image gate (null for a checkpoint without one).

The export checks itself: ONNX Runtime must reproduce PyTorch's logits and probabilities within
``atol`` (1e-4) on batches of two sizes (so the dynamic batch axis is exercised too); otherwise
nothing is left in the folder and `ParityError` (exit code 1) is raised. Torch, onnx and
onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lung_cls.data.sources import CLASS_NAMES
from lung_cls.errors import ParityError, UserError
from lung_cls.qa.checkpoints import (
    checkpoint_preprocessing,
    load_checkpoint,
    resolve_one_checkpoint,
)
from lung_cls.utils.io import atomic_write_json

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "prob_perfusion")
FEATURES_NAME = "features"
"""Third output: the penultimate-layer features (N, D) the image gate's OOD score is computed on."""
SIDECAR_FORMAT = "lung_cls-onnx"
MODEL_FILE = "model.onnx"
SIDECAR_FILE = "model.json"
REFERENCE_FILE = "reference.npy"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed (checkpoints can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _exportable(net: Any) -> Any:
    """LungNet -> module returning (logits, prob_perfusion): deployments need no softmax code."""
    import torch
    from torch import nn

    class _WithProb(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # The backbone's two halves, so the penultimate features (the image gate's OOD score,
            # lung_cls.qa.ood) come out of the same pass as the logits.
            fmap = self.inner.net.forward_features(self.inner.adapter(x))
            logits = self.inner.net.forward_head(fmap)
            feats = self.inner.net.forward_head(fmap, pre_logits=True).flatten(1)
            return logits, torch.softmax(logits.float(), dim=1)[:, 1], feats

    return _WithProb(net).eval()


def export_graph(net: Any, path: str | os.PathLike, size: int, opset: int = 17) -> None:
    """Trace ``net`` (grey (N, 1, S, S) in, 2 logits out) to ONNX with a dynamic batch axis.

    The TorchScript exporter is used: the torch.export-based one needs ``onnxscript``, which is not
    a dependency. Its tracer warnings (the grey adapter's channel check becomes a constant, right
    for a fixed 1-channel input) are silenced.
    """
    import torch

    module = _exportable(net)
    dummy = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    outputs = [*OUTPUT_NAMES, FEATURES_NAME]
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=int(opset),
            do_constant_folding=True,
            dynamo=False,
        )


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session (``threads``: intra-op threads, None = ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(
    net: Any,
    onnx_path: str | os.PathLike,
    size: int,
    *,
    atol: float = 1e-4,
    batch_sizes: tuple[int, ...] = (1, 4),
    reference: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on random (and, if given, reference-image) inputs.

    Returns the max absolute differences; raises `ParityError` when either exceeds ``atol``.
    """
    import torch

    session = onnx_session(onnx_path)
    g = torch.Generator().manual_seed(seed)
    worst = {"logits": 0.0, "prob_perfusion": 0.0}
    module = _exportable(net)
    for n in batch_sizes:
        x = torch.rand(n, 1, size, size, generator=g)
        if reference is not None and n > 1:
            x[0, 0] = torch.from_numpy(np.asarray(reference, np.float32) / 255.0).clamp(0, 1)
        with torch.no_grad():
            logits_t, prob_t, _ = module(x)
        logits_o, prob_o = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        if logits_o.shape != (n, 2) or prob_o.shape != (n,):
            raise ParityError(
                f"{onnx_path}: ONNX output shapes {logits_o.shape}, {prob_o.shape} for a batch of {n}"
            )
        worst["logits"] = max(worst["logits"], float(np.abs(logits_o - logits_t.numpy()).max()))
        worst["prob_perfusion"] = max(
            worst["prob_perfusion"], float(np.abs(prob_o - prob_t.numpy()).max())
        )
    result = {"atol": atol, "batch_sizes": list(batch_sizes), "max_abs_diff": worst}
    bad = {k: v for k, v in worst.items() if not v <= atol}
    if bad:
        shown = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
        raise ParityError(f"{onnx_path}: ONNX Runtime differs from PyTorch by {shown} (> {atol:g})")
    return result


def export_checkpoint(
    ckpt: str | os.PathLike,
    output: str | os.PathLike,
    *,
    opset: int = 17,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Checkpoint -> ``output/{model.onnx, model.json, reference.npy}``; returns the sidecar.

    Refuses to replace an existing export unless ``overwrite``. The ONNX file is written under a
    temporary name and renamed only after the parity check passed, and the sidecar is written last,
    so a reader never finds a model without its matching sidecar.
    """
    t0 = time.perf_counter()
    ckpt_path = resolve_one_checkpoint(ckpt)
    out = Path(output)
    existing = [p for p in (out / MODEL_FILE, out / SIDECAR_FILE) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: already exists; pass overwrite=true to replace it")
    net, meta = load_checkpoint(ckpt_path)
    prep = checkpoint_preprocessing(meta, ckpt_path)
    size = int(prep["size"])
    reference = meta.get("reference_image")

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".model.{os.getpid()}.onnx"
    try:
        export_graph(net, tmp, size, opset)
        try:
            parity = check_parity(net, tmp, size, atol=atol, reference=reference)
        except ParityError as err:
            raise ParityError(f"export failed its parity check: {err}") from None
        os.replace(tmp, out / MODEL_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    ref_name = _write_reference(out, reference)
    sidecar = build_sidecar(
        out / MODEL_FILE, ckpt_path, meta, prep, opset=opset, parity=parity, reference=ref_name
    )
    sidecar["export_seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(out / SIDECAR_FILE, sidecar)
    return sidecar


def _write_reference(out: Path, reference: np.ndarray | None) -> str | None:
    """``reference.npy`` beside the model, or none: a stale one from an earlier export would
    mislead the NMI fallback, so it is removed when this checkpoint has none."""
    if reference is None:
        (out / REFERENCE_FILE).unlink(missing_ok=True)
        return None
    tmp = out / f".reference.{os.getpid()}.npy"
    np.save(tmp, np.asarray(reference, dtype=np.float32))
    os.replace(tmp, out / REFERENCE_FILE)
    return REFERENCE_FILE


def build_sidecar(
    onnx_path: Path,
    ckpt_path: Path,
    meta: Mapping[str, Any],
    prep: Mapping[str, Any],
    *,
    opset: int,
    parity: Mapping[str, Any],
    reference: str | None,
) -> dict[str, Any]:
    """``model.json``: everything a deployment needs to pre-process like training, and to know
    which checkpoint and library versions the graph came from."""
    import onnx
    import onnxruntime
    import torch

    from lung_cls.qa.ood import to_json

    size = int(prep["size"])
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "onnx": onnx_path.name,
        "onnx_sha256": file_sha256(onnx_path),
        "opset": int(opset),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 1, size, size],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "meaning": "the pre-processed uint8 image (see preprocess) divided by 255",
        },
        "outputs": {
            "logits": {"shape": ["batch", 2], "classes": list(CLASS_NAMES)},
            "prob_perfusion": {"shape": ["batch"], "meaning": "softmax(logits)[:, 1]"},
            FEATURES_NAME: {"shape": ["batch", "D"], "meaning": "penultimate-layer features"},
        },
        # The image gate's training-set reference (lung_cls.qa.ood), thresholds included.
        "ood": to_json(meta["ood_reference"]) if meta.get("ood_reference") else None,
        "pretrained": meta.get("pretrained"),
        "temperature": meta.get("temperature"),
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "image_size": size,
        "backbone": meta.get("backbone"),
        "model_name": meta.get("name"),
        "seed": meta.get("seed"),
        "epoch": meta.get("epoch"),
        "preprocess": dict(prep),
        "reference_image": reference,
        "checkpoint": {
            "path": str(ckpt_path),
            "sha256": file_sha256(ckpt_path),
            "bytes": ckpt_path.stat().st_size,
        },
        "parity": dict(parity),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


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
            p = p / MODEL_FILE
        if not p.is_file():
            raise UserError(f"{p}: ONNX model not found")
        out.append(p)
    return out


def load_onnx_model(path: str | os.PathLike, threads: int | None = None) -> tuple[Any, dict, Any]:
    """``model.onnx`` (or its folder) -> (ONNX Runtime session, sidecar, reference image or None).

    The sidecar is ``<name>.json`` next to the model, else ``model.json``; its ``onnx_sha256`` must
    match the file, so a model never runs with another model's pre-processing parameters.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise UserError(f"{p}: ONNX model not found")
    sidecar_path = p.with_suffix(".json")
    if not sidecar_path.is_file():
        sidecar_path = p.parent / SIDECAR_FILE
    if not sidecar_path.is_file():
        raise UserError(
            f"{p}: no sidecar {p.with_suffix('.json').name} next to it (run lung_cls.export)"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{sidecar_path}: unreadable sidecar ({err})") from None
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{sidecar_path}: not a lung_cls export sidecar")
    digest = sidecar.get("onnx_sha256")
    if digest and digest != file_sha256(p):
        raise UserError(f"{p}: does not match its sidecar {sidecar_path} (SHA-256 differs)")
    reference = None
    if sidecar.get("reference_image"):
        ref_path = p.parent / str(sidecar["reference_image"])
        if not ref_path.is_file():
            raise UserError(f"{ref_path}: reference image named in {sidecar_path} is missing")
        reference = np.load(ref_path, allow_pickle=False)
    try:
        session = onnx_session(p, threads)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types on a bad file
        raise UserError(f"{p}: ONNX Runtime cannot load it ({type(err).__name__}: {err})") from None
    return session, sidecar, reference
