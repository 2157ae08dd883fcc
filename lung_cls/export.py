"""Export a trained checkpoint to ONNX, with everything a deployment needs to pre-process like training.

    python -m lung_cls.export ckpt=outputs/train/runs/<run> output=exported/
    python -m lung_cls.predict onnx=exported/ input=/data/today output=qa

Writes ``model.onnx``, ``model.json`` (the sidecar: pre-processing, classes, checkpoint hash) and
``reference.npy`` (the NMI fallback's target) into ``output``; `lung_cls.qa.onnx` says what each
holds. ONNX Runtime must reproduce PyTorch within ``atol`` (1e-4), else nothing is left in
``output`` and the command exits 1. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lung_cls.errors import ParityError, task_wrapper
from lung_cls.qa.onnx import (
    INPUT_NAME,
    OUTPUT_NAMES,
    SIDECAR_FORMAT,
    check_parity,
    export_checkpoint,
    export_graph,
    file_sha256,
    load_onnx_model,
    onnx_session,
)
from lung_cls.qa.settings import number
from lung_cls.utils.hydra import quote_path_overrides

log = logging.getLogger("lung_cls.export")

# `main` is the door; the rest is the library's, re-exported because this module held it before
# the move to lung_cls.qa.onnx. It goes once nothing imports it from here.
__all__ = [
    "main",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "SIDECAR_FORMAT",
    "ParityError",
    "check_parity",
    "export_checkpoint",
    "export_graph",
    "file_sha256",
    "load_onnx_model",
    "onnx_session",
]


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@task_wrapper
def main(cfg: DictConfig) -> None:
    sidecar = export_checkpoint(
        str(cfg.ckpt),
        str(cfg.output),
        opset=number(cfg, "opset", int, 17, minimum=7),
        atol=number(cfg, "atol", float, 1e-4, minimum=0.0),
        overwrite=bool(cfg.get("overwrite", False)),
    )
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
