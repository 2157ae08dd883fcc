"""The pre-archive QA check: does each new study look like the class its header declares?

    python -m lung_cls.predict ckpt=outputs/train/runs/<run> input=/data/today output=qa
    python -m lung_cls.predict ckpt=outputs/train/multiruns/<sweep> input=... output=... overlays=true
    python -m lung_cls.predict ckpt=[a.ckpt,b.ckpt] input=study.dcm output=qa fail_on_mismatch=true
    python -m lung_cls.predict onnx=exported/ input=... output=...        # ONNX Runtime, no torch model

One row per study in ``predictions.csv`` / ``.json``, status ``ok | review | mismatch | error:
<reason>`` (`lung_cls.qa.decide` says when), pre-processed as the checkpoint's training run did.
Bad input: one line on stderr, exit 2; ``fail_on_mismatch=true`` exits 1 when a study mismatches.
The library is `lung_cls.qa`; this door reads the config and calls it.
"""

from __future__ import annotations

import logging
import sys
import time

import hydra
from omegaconf import DictConfig

from lung_cls.errors import EXIT_OK, EXIT_PROBLEMS, task_wrapper
from lung_cls.qa.backends import Ensemble, load_onnx_ensemble, load_torch_ensemble
from lung_cls.qa.batch import PredictOptions, predict_files
from lung_cls.qa.checkpoints import resolve_checkpoints
from lung_cls.qa.decide import STATUSES, UNCERTAIN, check_review_band, decide, summarise
from lung_cls.qa.inputs import find_inputs, preprocess_study
from lung_cls.qa.onnx import resolve_onnx_models
from lung_cls.qa.output import COLUMNS, print_summary, write_outputs
from lung_cls.qa.settings import PredictSettings, model_warnings
from lung_cls.utils.hydra import quote_path_overrides

# The names below `run` and `main` are the library's, re-exported because this module held them
# before the move to lung_cls.qa; they go once nothing imports them from here.
__all__ = [
    "run",
    "main",
    "COLUMNS",
    "STATUSES",
    "UNCERTAIN",
    "Ensemble",
    "PredictOptions",
    "check_review_band",
    "decide",
    "find_inputs",
    "load_onnx_ensemble",
    "load_torch_ensemble",
    "predict_files",
    "preprocess_study",
    "print_summary",
    "resolve_checkpoints",
    "resolve_onnx_models",
    "summarise",
    "write_outputs",
]

log = logging.getLogger("lung_cls.predict")

LOG_FILE = "predict.log"
#: Loggers whose records go to the log file only: pydicom's (tracebacks of undecodable syntaxes,
#: "invalid value" warnings) would otherwise fill the console a radiographer reads.
FILE_ONLY_LOGGERS = ("pydicom", "py.warnings")


def log_to_file(path) -> logging.Handler:
    """Send pydicom's records (and warnings) to ``path`` instead of the console; lung_cls's own
    records go there too (and still to the console, as configured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    for name in FILE_ONLY_LOGGERS:
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.DEBUG)
    logging.getLogger("lung_cls").addHandler(handler)
    return handler


def close_log_file(handler: logging.Handler) -> None:
    for name in (*FILE_ONLY_LOGGERS, "lung_cls"):
        logging.getLogger(name).removeHandler(handler)
    for name in FILE_ONLY_LOGGERS:
        logging.getLogger(name).propagate = True
    logging.captureWarnings(False)
    handler.close()


def run(cfg: DictConfig) -> int:
    """The whole command; returns the exit code (0, or 1 for fail_on_mismatch with a mismatch)."""
    t0 = time.perf_counter()
    job = PredictSettings.from_config(cfg)  # every cheap check, before a model loads
    ens = job.load_ensemble()
    options = job.prepare_output(ens)
    log_file = log_to_file(job.output / LOG_FILE)
    try:
        rows = predict_files(
            ens, job.files, job.root, options, job.walk_errors,
            progress=sys.stderr.isatty(), ignored=job.ignored,
        )  # fmt: skip
    finally:
        close_log_file(log_file)
    summary = summarise(rows)
    warnings = model_warnings(ens, rows)
    for text in warnings:
        log.debug("warning: %s", text)
    write_outputs(rows, job.output, job.header(ens, summary, time.perf_counter() - t0, warnings))
    print_summary(rows, summary, job.output, warnings)
    mismatches = summary["counts"]["mismatch"]
    if job.fail_on_mismatch and mismatches > 0:
        print(
            f"{mismatches} mismatching stud(y/ies): exit 1 (fail_on_mismatch=true)", file=sys.stderr
        )
        return EXIT_PROBLEMS
    return EXIT_OK


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@task_wrapper
def main(cfg: DictConfig) -> int:
    return run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    main()
