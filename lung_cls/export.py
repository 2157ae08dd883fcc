"""Export a trained checkpoint to ONNX, with everything a deployment needs to pre-process like training.

    python -m lung_cls.export ckpt=outputs/train/runs/<run> output=exported/
    python -m lung_cls.predict onnx=exported/ input=/data/today output=qa

Writes into ``output``:

* ``model.onnx`` - input ``image``: float32 (N, 1, S, S), the pre-processed uint8 image / 255,
  dynamic batch; outputs ``logits`` (N, 2: ventilation, perfusion) and ``prob_perfusion`` (N,).
  The grey-to-RGB adapter and the ImageNet normalisation are inside the graph.
* ``reference.npy`` - the mean centred training image (S, S) 0..255, the target of the NMI fallback
  for studies whose lungs cannot be separated (absent if the checkpoint has none).
* ``model.json`` - the sidecar: the pre-processing config (the training run's ``data.preprocess``,
  with every default filled in), class names, input size, backbone, opset, the SHA-256 of the
  checkpoint and of the ONNX file, and the measured PyTorch/ONNX Runtime parity.

The export checks itself: ONNX Runtime must reproduce PyTorch's logits and probabilities within
``atol`` (1e-4) on batches of two sizes (so the dynamic batch axis is exercised too); otherwise
nothing is left in ``output`` and the command fails (exit 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from lung_cls.data.sources import CLASS_NAMES
from lung_cls.utils.hydra import UserError, clean_errors, quote_path_overrides
from lung_cls.utils.io import atomic_write_json

log = logging.getLogger("lung_cls.export")

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "prob_perfusion")
SIDECAR_FORMAT = "lung_cls-onnx"


class ParityError(RuntimeError):
    """ONNX Runtime does not reproduce PyTorch within the tolerance: the export is not trusted."""


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

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.inner(x)
            return logits, torch.softmax(logits.float(), dim=1)[:, 1]

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
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
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
            logits_t, prob_t = module(x)
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
    from lung_cls.data.preprocess import prep_config
    from lung_cls.models.classifier import load_lung_net
    from lung_cls.predict import one_line, resolve_checkpoints

    t0 = time.perf_counter()
    paths = resolve_checkpoints(str(ckpt))
    if len(paths) != 1:
        raise UserError(
            f"ckpt={ckpt}: export takes one checkpoint, found {len(paths)} "
            f"({', '.join(map(str, paths[:3]))}...); export each run dir on its own"
        )
    ckpt_path = paths[0]
    out = Path(output)
    targets = [out / "model.onnx", out / "model.json"]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: already exists; pass overwrite=true to replace it")
    try:
        net, meta = load_lung_net(str(ckpt_path))
    except FileNotFoundError:
        raise UserError(f"{ckpt_path}: checkpoint not found") from None
    except ValueError as err:
        raise UserError(one_line(err)) from None
    block = (meta.get("data") or {}).get("preprocess")
    if block is None:
        raise UserError(f"{ckpt_path}: the checkpoint stores no pre-processing config")
    prep = prep_config(block)
    size = int(prep["size"])
    reference = meta.get("reference_image")

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".model.{os.getpid()}.onnx"
    try:
        export_graph(net, tmp, size, opset)
        parity = check_parity(net, tmp, size, atol=atol, reference=reference)
        os.replace(tmp, out / "model.onnx")
    finally:
        tmp.unlink(missing_ok=True)
    ref_name = None
    if reference is not None:
        ref_name = "reference.npy"
        ref_tmp = out / f".reference.{os.getpid()}.npy"
        np.save(ref_tmp, np.asarray(reference, dtype=np.float32))
        os.replace(ref_tmp, out / ref_name)
    elif (out / "reference.npy").exists():
        (out / "reference.npy").unlink()  # a stale reference from an earlier export would mislead

    import onnx
    import onnxruntime
    import torch

    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "onnx": "model.onnx",
        "onnx_sha256": file_sha256(out / "model.onnx"),
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
        },
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "image_size": size,
        "backbone": meta.get("backbone"),
        "model_name": meta.get("name"),
        "seed": meta.get("seed"),
        "epoch": meta.get("epoch"),
        "preprocess": prep,
        "reference_image": ref_name,
        "checkpoint": {
            "path": str(ckpt_path),
            "sha256": file_sha256(ckpt_path),
            "bytes": ckpt_path.stat().st_size,
        },
        "parity": parity,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "export_seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(out / "model.json", sidecar)
    return sidecar


def load_onnx_model(path: str | os.PathLike, threads: int | None = None) -> tuple[Any, dict, Any]:
    """``model.onnx`` (or its folder) -> (ONNX Runtime session, sidecar, reference image or None).

    The sidecar is ``<name>.json`` next to the model, else ``model.json``; its ``onnx_sha256`` must
    match the file, so a model never runs with another model's pre-processing parameters.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise UserError(f"{p}: ONNX model not found")
    sidecar_path = p.with_suffix(".json")
    if not sidecar_path.is_file():
        sidecar_path = p.parent / "model.json"
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@clean_errors
def main(cfg: DictConfig) -> None:
    try:
        sidecar = export_checkpoint(
            str(cfg.ckpt),
            str(cfg.output),
            opset=int(cfg.get("opset", 17)),
            atol=float(cfg.get("atol", 1e-4)),
            overwrite=bool(cfg.get("overwrite", False)),
        )
    except ParityError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: export failed its parity check: {err}", file=sys.stderr)
        sys.exit(1)
    diff = sidecar["parity"]["max_abs_diff"]
    log.info(
        "Wrote %s (%s, %d px, opset %d); ONNX Runtime vs PyTorch max |diff|: logits %.2e, "
        "P(perfusion) %.2e (atol %g)",
        Path(str(cfg.output)) / "model.onnx", sidecar["backbone"], sidecar["image_size"],
        sidecar["opset"], diff["logits"], diff["prob_perfusion"], sidecar["parity"]["atol"],
    )  # fmt: skip


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    main()
