"""Where a series is checked: in the node's own process, or in processes of their own.

The check of one series (its headers, the anterior image through the QA gate and the model, and
the structured report) is a pure function, `check_and_report`: it reads spool files and returns
the verdict and the report's bytes; it writes nothing. The node's main process alone writes the
spool and the audit log, so where the check runs changes nothing about durability: a series is
``received`` in the log until its result has been applied, and a check lost with its process is
simply done again.

``check.processes`` (`CheckPool`, default 1 from ``conf/node.yaml``) runs it in worker processes
that load the model once. Each has its own interpreter, so the model and highdicom no longer hold
the interpreter lock that the receiving (pynetdicom's threads) and the forwarders need: on a
machine with two cores the node then uses both. ``check.processes=0`` checks in a thread of the
node's process, as the tests' in-memory stand-in models need.
"""

from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lung_cls.errors import UserError
from lung_cls.node.check import PASSED, REJECTED, LungRule, Verdict, check_series

if TYPE_CHECKING:
    from lung_cls.node.settings import NodeSettings
    from lung_cls.qa.batch import PredictOptions

log = logging.getLogger("lung_cls.node")


@dataclass
class ReportFile:
    """The node's structured report of one series, encoded, with the UIDs its audit row needs."""

    sop: str
    series: str
    study: str
    patient: str
    sop_class: str
    data: bytes


@dataclass
class Outcome:
    verdict: Verdict
    report: ReportFile | None = None


@dataclass
class CheckContext:
    """What a check needs besides the model (picklable: it travels to the worker processes)."""

    rule: LungRule
    options: PredictOptions
    report: bool
    ae_title: str
    version: str


def model_name(ens: Any) -> str:
    members = getattr(ens, "members", None) or [{}]
    return "+".join(str(m.get("name") or m.get("backbone") or "model") for m in members)


#: What the report needs of each checked instance: its references and the patient / study modules
#: highdicom copies from the first one. (A whole NM header makes highdicom several times slower.)
_EVIDENCE_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientName",
    "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "IssuerOfPatientID",
)  # fmt: skip


def _evidence(ds: Any) -> Any:
    from pydicom.dataset import Dataset

    out = Dataset()
    for keyword in _EVIDENCE_KEYWORDS:
        if keyword in ds:
            setattr(out, keyword, ds.data_element(keyword).value)
    return out


def series_report(
    files: list[tuple[str, Path]], verdict: Verdict, model: str, ctx: CheckContext
) -> ReportFile | None:
    """The SR of one checked series, or None (and a log line) when it cannot be written: the
    series still goes on without it."""
    import pydicom

    from lung_cls.node.report import build_report, encode

    try:
        evidence = [_evidence(pydicom.dcmread(p, stop_before_pixels=True)) for _, p in files]
        sr = build_report(
            evidence,
            {
                "status": verdict.status, "declared": verdict.declared,
                "predicted": verdict.predicted, "prob_perfusion": verdict.prob_perfusion,
                "reason": verdict.reason,
            },
            {"name": model, "version": ctx.version},
            ctx.ae_title,
        )  # fmt: skip
        return ReportFile(
            sop=str(sr.SOPInstanceUID), series=str(sr.SeriesInstanceUID),
            study=str(sr.StudyInstanceUID), patient=str(sr.get("PatientID", "")),
            sop_class=str(sr.SOPClassUID), data=encode(sr),
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001
        log.error("structured report for %s not written (%s)", files[0][0], err)
        return None


def check_and_report(ens: Any, files: list[tuple[str, Path]], ctx: CheckContext) -> Outcome:
    """One series -> its verdict and (with ``ctx.report``, unless it passed unchecked) its SR.
    A check that raises rejects the series (it is held, never checked in a loop)."""
    try:
        verdict = check_series(ens, files, ctx.rule, ctx.options)
    except Exception as err:  # noqa: BLE001 - a broken check holds the series
        log.exception("series of %s: the check failed", files[0][0] if files else "?")
        verdict = Verdict(REJECTED, reason=f"rejected: the check failed ({err})")
    report = None
    if ctx.report and verdict.status != PASSED and files:
        report = series_report(files, verdict, model_name(ens), ctx)
    return Outcome(verdict, report)


def warm_report(ctx: CheckContext) -> None:
    """highdicom takes seconds to import and to build its first report: done before the port
    opens, not on the first series."""
    import tempfile

    import numpy as np

    from lung_cls.data.dicomio import write_nm_dicom

    with tempfile.TemporaryDirectory() as tmp:
        path = write_nm_dicom(
            Path(tmp) / "warm.dcm", np.zeros((8, 8), np.uint16), patient_id="WARM",
            series_description="LUNG",
        )  # fmt: skip
        series_report([("warm", path)], Verdict("ok"), "warm", ctx)


# ---------------------------------------------------------------------- worker processes
_WORKER: dict[str, Any] = {}


def _die_with_parent() -> None:
    """A worker must not outlive a node killed with SIGKILL (Linux: PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed pipe ends it on its next read
        pass


def _init(settings: NodeSettings, ctx: CheckContext, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the node died before the line above
        os._exit(1)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )
    for name in ("lung_cls.data.preprocess", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _WORKER["ctx"] = ctx
    try:
        _WORKER["ens"] = settings.load_ensemble()
        if ctx.report:
            warm_report(ctx)
    except Exception as err:  # noqa: BLE001 - said by the node, in one line, at start
        _WORKER["error"] = str(getattr(err, "message", None) or err) or type(err).__name__


def _ping() -> str | None:
    return _WORKER.get("error")


def _check(files: list[tuple[str, Path]]) -> Outcome:
    if "error" in _WORKER:
        raise RuntimeError(_WORKER["error"])
    return check_and_report(_WORKER["ens"], files, _WORKER["ctx"])


class CheckPool:
    """``processes`` worker processes (spawned, so no lock or thread of the node is copied),
    each with the model loaded once. `start` waits until every worker has loaded it and turns a
    model that does not load into a `UserError`; `restart` replaces a pool a crashed worker broke.
    """

    def __init__(self, settings: NodeSettings, ctx: CheckContext, processes: int) -> None:
        self.settings, self.ctx, self.processes = settings, ctx, processes
        self._pool: ProcessPoolExecutor | None = None

    @property
    def capacity(self) -> int:
        """Series in flight at once: one queued behind each one being checked, so a worker never
        waits for the node to hand it the next."""
        return 2 * self.processes

    def start(self) -> CheckPool:
        import multiprocessing

        self._pool = ProcessPoolExecutor(
            self.processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init, initargs=(self.settings, self.ctx, os.getpid()),
        )  # fmt: skip
        for future in [self._pool.submit(_ping) for _ in range(self.processes)]:
            error = future.result()
            if error:
                self.close()
                raise UserError(f"the check processes could not load the model: {error}")
        return self

    def submit(self, files: list[tuple[str, Path]]) -> Future:
        assert self._pool is not None, "CheckPool.start() first"
        return self._pool.submit(_check, files)

    @property
    def broken(self) -> bool:
        """The pool can take no more work (a worker died): `restart` it. Checks lost with an
        earlier pool do not make this one broken."""
        return self._pool is None or bool(getattr(self._pool, "_broken", False))

    def kill(self) -> None:
        """SIGKILL every worker (a check that hangs): the pool breaks, and its futures fail as
        they do when a worker crashes."""
        if self._pool is not None:
            # The executor's own table of its worker processes (CPython, stable since 3.3).
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                proc.kill()

    def restart(self) -> None:
        log.warning("a check process died; starting new ones")
        self.close()
        self.start()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
