"""Helpers of the node tests: a stand-in model, planted series, dcmtk senders, an Orthanc PACS.

(A plain module, not a conftest: see tests/qa/qa_helpers.py.)
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from lung_cls.data.preprocess import prep_config
from lung_cls.node.orthanc import ORTHANC, OrthancPacs, free_port  # noqa: F401 - for the tests

SIZE = 32
STORESCU = shutil.which("storescu")
ECHOSCU = shutil.which("echoscu")

# CI sets LUNG_CLS_REQUIRE_PACS=1 (.ci/run installs Orthanc and dcmtk): there a missing binary fails
# the tests instead of skipping them.
_REQUIRED = os.environ.get("LUNG_CLS_REQUIRE_PACS") == "1"
needs_dcmtk = pytest.mark.skipif(
    (STORESCU is None or ECHOSCU is None) and not _REQUIRED,
    reason="dcmtk's storescu/echoscu not on PATH (apt-get install -y dcmtk)",
)
needs_pacs = pytest.mark.skipif(
    (ORTHANC is None or STORESCU is None) and not _REQUIRED,
    reason="Orthanc and dcmtk's storescu are needed as PACS and modality "
    "(apt-get install -y orthanc dcmtk)",
)


@dataclass
class FixedMember:
    """A stand-in model: P(perfusion) = ``prob`` for every image (or per image mean > ``cut``
    when ``prob`` is None: bright phantoms read as perfusion)."""

    backend: ClassVar[str] = "fake"
    can_cam: ClassVar[bool] = False
    prob: float | None = 0.95
    info: dict[str, Any] = field(default_factory=lambda: {"path": "fake.ckpt", "name": "fake"})
    prep: dict[str, Any] = field(default_factory=lambda: prep_config({"size": SIZE}))
    reference: np.ndarray | None = None

    def probs(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return np.full(len(x), float(self.prob), dtype=np.float64)

    def cams(self, images, targets, batch_size):  # pragma: no cover - never asked
        raise RuntimeError("no CAM")


def fake_ensemble(prob: float = 0.95):
    from lung_cls.qa.backends import Ensemble

    return Ensemble.of([FixedMember(prob=prob)])


@functools.lru_cache(maxsize=1)
def _phantom_cases() -> tuple:
    """Six perfusion and six ventilation studies of the built-in simulator (64 px): real lung
    images, so the QA gate's lung segmentation and image checks pass them as lung studies."""
    from lung_cls.data.phantom import simulate_cohort

    return tuple(simulate_cohort({"size": 64, "difficulty": 0.0}, 6, 6, seed=0, workers=1))


def phantom_image(label: int = 1, seed: int = 0) -> np.ndarray:
    """A simulated anterior lung study of class ``label`` (1 perfusion, 0 ventilation)."""
    cases = [c for c in _phantom_cases() if c.label == label]
    return np.asarray(cases[seed % len(cases)].image)


def write_series(
    folder: Path,
    desc: str,
    *,
    n: int = 1,
    views: Sequence[str] | None = None,
    image: np.ndarray | None = None,
    patient: str = "P1",
    study_uid: str | None = None,
    **kw: Any,
) -> list[Path]:
    """One series of ``n`` instances (views ANTERIOR, POSTERIOR, ... by default) in ``folder``."""
    from pydicom.uid import generate_uid

    from lung_cls.data.dicomio import write_nm_dicom

    views = list(views or ["ANTERIOR", "POSTERIOR", "LAO", "RAO", "LPO", "RPO"][:n])
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, view in enumerate(views):
        img = image if image is not None else phantom_image(seed=i)
        p = write_nm_dicom(
            folder / f"{series_uid}_{i}.dcm", img, patient_id=patient, series_description=desc,
            view=view, series_uid=series_uid, study_uid=study_uid, **kw,
        )  # fmt: skip
        out.append(p)
    return out


def uids(path: Path) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)


def storescu(port: int, files: Sequence[Path], aet: str = "MODALITY", aec: str = "LUNG_QA",
             timeout: float = 120) -> subprocess.CompletedProcess:  # fmt: skip
    """dcmtk's storescu, one association for all ``files`` (as a camera sends a study)."""
    if STORESCU is None:
        raise RuntimeError("storescu is not on PATH (apt-get install -y dcmtk)")
    return subprocess.run(
        [STORESCU, "-aet", aet, "-aec", aec, "-to", "20", "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def wait_for(predicate, timeout: float = 60.0, every: float = 0.1, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def audit_rows(spool: Path) -> dict[str, dict[str, Any]]:
    import sqlite3

    db = sqlite3.connect(str(spool / "audit.sqlite"), timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return {r["sop_instance_uid"]: dict(r) for r in db.execute("SELECT * FROM instances")}
    finally:
        db.close()


def node_env() -> dict[str, str]:
    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


class NodeProcess:
    """``python -m lung_cls.node`` as a real process (so that it can be SIGKILLed)."""

    def __init__(self, folder: Path, model: str, spool: Path, pacs_port: int, *extra: str):
        self.folder, self.spool = folder, spool
        self.port = free_port()
        self.args = [
            model, f"spool={spool}", f"listen.port={self.port}", f"forward.port={pacs_port}",
            "forward.ae_title=ORTHANC", "forward.retry_initial_s=0.5", "forward.retry_max_s=2",
            "forward.timeout_s=5", "series.quiet_s=1.0", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> NodeProcess:
        import sys

        self.starts += 1
        self.log = self.folder / f"node{self.starts}.log"
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lung_cls.node", *self.args], cwd=self.folder, env=node_env(),
            stdout=self.out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(self._ready, 180, 0.2, f"the node to listen (see {self.log})")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"node exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}"
            )
        return "ready:" in self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
            self.out.close()
        self.proc = None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(30)
        self.out.close()
        self.proc = None
        return code


def scratch_checkpoint(path: Path) -> Path:
    """An untrained checkpoint in the training format (tests/qa's helper)."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "tests" / "qa"))
    from qa_helpers import save_scratch_checkpoint

    return save_scratch_checkpoint(path, size=SIZE)
