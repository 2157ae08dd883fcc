"""The QA tool's library: check new studies before they are archived.

    inputs       find the files, read one study, its declared class, pre-process it as training did
    gate         the header gate: what is not an anterior planar NM lung study is rejected
    ood          the image gate's training-set reference (OOD score) and its decision
    overlay      the radiographer's PNG: the original study, the CAM on it, the header facts
    declared     the class a study's header (or folder, or a manifest) claims
    checkpoints  resolve ``ckpt=``, load a checkpoint, its pre-processing block
    onnx         export a checkpoint to ONNX with its sidecar and parity check; load it back
    backends     members (torch checkpoint | ONNX model) and the ensemble that averages them
    decide       review band, status, summary (pure)
    batch        check a set of files, one file or one image in memory
    output       predictions.csv / .json (atomic) and the console summary
    settings     the predict command's config, read and checked

The commands ``python -m lung_cls.predict`` and ``python -m lung_cls.export`` are thin doors over
these modules. None of them imports torch, onnx or matplotlib at module level, and none imports
this package's names (only its modules), so the curated exports below cannot form a cycle.
(``decide`` the function is not exported: ``lung_cls.qa.decide`` is the module.)
"""

from lung_cls.qa.backends import (
    Ensemble,
    OnnxMember,
    TorchMember,
    load_onnx_ensemble,
    load_torch_ensemble,
)
from lung_cls.qa.batch import (
    PredictOptions,
    check_dataset,
    check_file,
    check_image,
    predict_files,
)
from lung_cls.qa.checkpoints import load_checkpoint, resolve_checkpoints
from lung_cls.qa.decide import check_review_band, decide_batch, summarise
from lung_cls.qa.declared import Declared, KeywordMatcher, dataset_texts, declared_from_texts
from lung_cls.qa.gate import GateSettings, gate_dataset, header_gate
from lung_cls.qa.inputs import find_inputs, preprocess_study
from lung_cls.qa.onnx import export_checkpoint, load_onnx_model
from lung_cls.qa.output import COLUMNS, write_outputs

__all__ = [
    "COLUMNS",
    "Declared",
    "Ensemble",
    "GateSettings",
    "KeywordMatcher",
    "OnnxMember",
    "PredictOptions",
    "TorchMember",
    "check_dataset",
    "check_file",
    "check_image",
    "check_review_band",
    "dataset_texts",
    "decide_batch",
    "declared_from_texts",
    "export_checkpoint",
    "find_inputs",
    "gate_dataset",
    "header_gate",
    "load_checkpoint",
    "load_onnx_ensemble",
    "load_onnx_model",
    "load_torch_ensemble",
    "predict_files",
    "preprocess_study",
    "resolve_checkpoints",
    "summarise",
    "write_outputs",
]
