"""The node: a Storage + Verification SCP that spools, a checker that groups and checks series,
and forwarders that send to the PACS.

Its threads share the audit log (`lung_cls.node.audit`), which is also the work list:

* the SCP (pynetdicom, one thread per association) writes each instance durably into the spool
  and records it *before* it answers success; a dataset it cannot decode, or without pixel data,
  gets a failure status and a log line, and the association goes on;
* the checker takes a series once it has been quiet for ``quiet_s`` (or, with
  ``complete_on_release``, once every association that delivered to it has ended), has it checked
  (`lung_cls.node.check`; in ``check.processes`` worker processes, `lung_cls.node.workers`, or in
  this thread with 0) and queues it for the PACS or holds it in quarantine; with ``report`` a
  structured report joins it. Only this process writes the spool and the log: a check lost with
  its worker leaves the series ``received`` and it is checked again;
* ``forward.workers`` forwarders send queued instances, each on its own association, mark each
  forwarded as the PACS acknowledges it, and on failure back off (doubling, up to
  ``retry_max_s``). An instance that was in flight when the PACS or the node went away is looked
  up on the PACS by C-FIND before it is sent again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

from lung_cls.node import audit as A
from lung_cls.node import tcp
from lung_cls.node.audit import Audit, now_iso
from lung_cls.node.check import PASSED, REJECTED, REPORT, LungRule, Verdict
from lung_cls.node.forward import Pacs, PacsUnavailable, SendResult
from lung_cls.node.settings import NodeSettings
from lung_cls.node.spool import INCOMING, QUARANTINE, Spool, write_atomic
from lung_cls.node.workers import (
    CheckContext,
    CheckPool,
    Outcome,
    ReportFile,
    check_and_report,
    warm_report,
)

log = logging.getLogger("lung_cls.node")

# DIMSE failure statuses the SCP answers with.
CANNOT_UNDERSTAND = 0xC210
NOT_AN_IMAGE = 0xA900  # "dataset does not match SOP class": here, no pixel data
OUT_OF_RESOURCES = 0xA700

#: Checks of one series lost with their process (a crash) before the series is rejected (held).
MAX_CHECK_ATTEMPTS = 3


def malformed(ds: Any) -> str | None:
    """Why a received dataset cannot be used, or None: every element must decode, and native
    (uncompressed) pixel data must be as long as its rows, columns and frames say."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns (and goes on) on a cut-off element
        for elem in ds.iterall():
            elem.value  # noqa: B018 - decodes the element
    if "PixelData" not in ds:
        return None
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_compressed", False):
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (
            int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.BitsAllocated) // 8
        )  # fmt: skip
    except (AttributeError, TypeError, ValueError) as err:
        return f"image attributes missing or invalid ({err})"
    have = len(ds.PixelData)
    if have < expected:
        return f"pixel data truncated: {have} bytes, {expected} expected"
    return None


def _age_s(iso: str) -> float:
    return time.time() - datetime.fromisoformat(iso).timestamp()


class Node:
    """One running node. ``start()`` opens the port and starts the threads; ``stop()`` ends them."""

    def __init__(self, settings: NodeSettings, ensemble: Any, version: str = "unknown") -> None:
        self.s = settings
        self.ens = ensemble
        self.version = version
        self.spool = Spool(settings.spool)
        self.audit = Audit(self.spool.root / A.AUDIT_NAME)
        self.rule = LungRule(settings.lung_keywords, settings.modalities)
        self.ctx = CheckContext(self.rule, settings.options, settings.report, settings.ae_title,
                                version)  # fmt: skip
        self.pool = (
            CheckPool(settings, self.ctx, settings.check_processes)
            if settings.check_processes > 0 else None
        )  # fmt: skip
        # series -> (future, its rows, when it was handed to a check process)
        self._checking: dict[str, tuple[Any, list[dict[str, Any]], float]] = {}
        self._lost: dict[str, int] = defaultdict(int)  # series -> checks lost with a process
        self._draining = False  # the pool was killed; its checks are still coming back
        self.pacs = Pacs(
            settings.forward_host, settings.forward_port, settings.forward_ae,
            calling_ae=settings.ae_title, timeout_s=settings.timeout_s,
        )  # fmt: skip
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._lock = threading.Lock()
        self._active: dict[str, int] = defaultdict(int)  # series -> open associations on it
        self._by_assoc: dict[int, set[str]] = defaultdict(set)
        self._released: set[str] = set()  # series whose senders all ended
        self.backoff_s = 0.0
        self.failures = 0
        # Forwarder workers claim disjoint batches under this lock; `_inflight` holds the
        # instances a live worker of this process is sending, which `reconcile` leaves alone
        # (only rows `sending` that no worker owns - a crash, a broken link - are looked up).
        self._claim_lock = threading.Lock()
        self._inflight: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Node:
        self.spool.clean_temp()
        self._adopt_orphans()
        if self.pool is not None:
            self.pool.start()  # every worker has loaded the model before the port opens
        elif self.s.report:
            warm_report(self.ctx)
        self._server = self._make_scp()
        workers = [("checker", self._checker)] + [
            (f"forwarder-{k}", self._forwarder) for k in range(self.s.forward_workers)
        ]
        for name, target in workers:
            t = threading.Thread(target=target, name=f"node-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "listening as %s on %s:%d, forwarding to %s@%s:%d, spool %s",
            self.s.ae_title, self.s.host, self.port, self.s.forward_ae, self.s.forward_host,
            self.s.forward_port, self.spool.root,
        )  # fmt: skip
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.s.port

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for t in self._threads:
            t.join(timeout=30)
        if self.pool is not None:
            self.pool.close()  # series still in a process stay `received`: checked at restart
        self.audit.close()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    # ------------------------------------------------------------------ SCP
    def _make_scp(self) -> Any:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.s.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.s.allow:
            ae.require_calling_aet = list(self.s.allow)
        ae.maximum_pdu_size = 0
        handlers = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_RELEASED, self._assoc_ended),
            (evt.EVT_ABORTED, self._assoc_ended),
            (evt.EVT_CONN_CLOSE, self._assoc_ended),
            (evt.EVT_CONN_OPEN, tcp.on_connection),  # no 40 ms delayed-ACK stall per C-STORE
        ]
        return ae.start_server((self.s.host, self.s.port), block=False, evt_handlers=handlers)

    def handle_store(self, event: Any) -> int:
        """One C-STORE: durable in the spool and in the audit log, then success."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop = str(ds.SOPInstanceUID)
            series = str(ds.SeriesInstanceUID)
            study = str(ds.get("StudyInstanceUID", "") or "")
            patient = str(ds.get("PatientID", "") or "")
            sop_class = str(ds.SOPClassUID)
            problem = malformed(ds)
        except Exception as err:  # noqa: BLE001 - whatever a broken dataset raises
            problem = f"dataset cannot be decoded ({type(err).__name__}: {err})"
        if problem is not None:
            log.warning("C-STORE from %s refused: %s", calling, problem)
            return CANNOT_UNDERSTAND
        if not (self.s.accept_non_image or "PixelData" in ds):
            log.warning(
                "C-STORE from %s refused: %s has no pixel data (not an image)", calling, sop
            )
            return NOT_AN_IMAGE
        known = self.audit.get(sop)
        if known is not None:
            log.info("%s received again from %s: already %s, not stored twice", sop, calling,
                     known["state"])  # fmt: skip
            self._touch(event, series)
            return 0x0000
        try:
            rel = self.spool.store(series, sop, bytes(event.encoded_dataset()))
            self.audit.add_received(
                {
                    "sop_instance_uid": sop,
                    "series_instance_uid": series,
                    "study_instance_uid": study,
                    "patient_id": patient,
                    "sop_class_uid": sop_class,
                    "calling_ae": calling,
                    "file": rel,
                }
            )
        except Exception as err:  # noqa: BLE001 - disk full, permissions: the sender must retry
            log.error("C-STORE of %s from %s failed: cannot spool it (%s)", sop, calling, err)
            return OUT_OF_RESOURCES
        self._touch(event, series)
        return 0x0000

    def _touch(self, event: Any, series: str) -> None:
        key = id(event.assoc)
        with self._lock:
            if series not in self._by_assoc[key]:
                self._by_assoc[key].add(series)
                self._active[series] += 1
            self._released.discard(series)

    def _assoc_ended(self, event: Any) -> None:
        with self._lock:
            for series in self._by_assoc.pop(id(event.assoc), set()):
                self._active[series] -= 1
                if self._active[series] <= 0:
                    del self._active[series]
                    self._released.add(series)

    def _adopt_orphans(self) -> None:
        """Spool files without an audit row (a crash between the two; never acknowledged, so
        the sender will re-send them) are taken in, so that nothing on disk is forgotten."""
        import pydicom

        known = {r["file"] for r in self.audit.query("SELECT file FROM instances")}
        for path in self.spool.orphans():
            rel = path.relative_to(self.spool.root).as_posix()
            if rel in known:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                sop = str(ds.SOPInstanceUID)
            except Exception as err:  # noqa: BLE001
                log.warning("%s: unreadable file in the spool, left there (%s)", path, err)
                continue
            if self.audit.get(sop) is None:
                self.audit.add_received(
                    {
                        "sop_instance_uid": sop,
                        "series_instance_uid": str(ds.SeriesInstanceUID),
                        "study_instance_uid": str(ds.get("StudyInstanceUID", "") or ""),
                        "patient_id": str(ds.get("PatientID", "") or ""),
                        "sop_class_uid": str(ds.SOPClassUID),
                        "calling_ae": None,
                        "file": rel,
                    }
                )
                log.info("%s: taken in from the spool after a restart", sop)

    # ------------------------------------------------------------------ checker
    def _checker(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.check_ready()
            except Exception:  # noqa: BLE001 - keep the node alive, say what broke
                log.exception("checker failed; retrying")
                done = 0
            if not done:
                self._idle(0.1)

    def _idle(self, seconds: float) -> None:
        """Wait for a check process to answer, at most ``seconds`` (or for the stop)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        futures = [f for f, _, _ in self._checking.values()]
        if futures:
            wait(futures, timeout=seconds, return_when=FIRST_COMPLETED)
        else:
            self._stop.wait(seconds)

    def _ready(self, series: str, last: str) -> bool:
        with self._lock:
            active = self._active.get(series, 0)
            released = series in self._released
        if self.s.complete_on_release and released and active == 0:
            return True
        return _age_s(last) >= self.s.quiet_s

    def check_ready(self) -> int:
        """Check every series that is complete (with check processes: hand it to them, and
        apply what they have sent back); returns how many.

        A series whose check was lost with its process (a *suspect*: it may be the one that
        kills or hangs the check) goes first, and alone: nothing else is in flight while it is
        checked, so a series that only shared the pool with it is not blamed twice."""
        n = self._collect() if self._checking else 0
        if self._draining:
            if self._checking:
                return n  # the killed pool's checks are not all back yet
            self._draining = False
        pending = self.audit.pending_series()
        if self.pool is not None:
            pending.sort(key=lambda item: item["series"] not in self._lost)  # suspects first
        for item in pending:
            if self._stop.is_set():
                break
            series = item["series"]
            if series in self._checking:
                continue
            if self.pool is not None:
                if len(self._checking) >= self.pool.capacity:
                    break
                if any(s in self._lost for s in self._checking):
                    break  # a suspect is being checked alone
                if series in self._lost and self._checking:
                    break  # the suspect waits until the others are back
            if self._ready(series, item["last"]):
                self.process_series(item["series"])
                with self._lock:
                    self._released.discard(item["series"])
                n += 1
        return n

    def process_series(self, series: str) -> None:
        """Check one series: here (``check.processes=0``) or handed to a check process, whose
        outcome `_collect` applies when it is back."""
        rows = self.audit.series_rows(series, A.RECEIVED)
        if not rows:
            return
        prior = self.audit.series_decision(series)
        if prior is not None:  # late instances follow their series' decision
            verdict = Verdict(
                prior["status"], prior["declared"], None, None, bool(prior["review"]),
                prior["held_reason"],
            )  # fmt: skip
            verdict.predicted, verdict.prob_perfusion = prior["predicted"], prior["prob_perfusion"]
            hold = prior["state"] in (A.HELD, A.DISCARDED)
            self._apply(series, rows, verdict, hold, report=None)
            return
        files = []
        for r in rows:
            path = self.spool.find(r["file"], series, r["sop_instance_uid"])
            if path is not None:
                files.append((r["sop_instance_uid"], path))
        if self.pool is None:
            self._finish(series, rows, check_and_report(self.ens, files, self.ctx))
        else:
            from concurrent.futures.process import BrokenProcessPool

            try:
                future = self.pool.submit(files)
            except BrokenProcessPool:  # a worker died while idle: the pool refuses new work
                self.pool.restart()
                future = self.pool.submit(files)
            self._checking[series] = (future, rows, time.monotonic())

    def _collect(self) -> int:
        """Apply the outcomes the check processes have sent back; returns how many. A check lost
        with its process (a crash) leaves its series ``received``: it is checked again, and
        rejected (held) after ``MAX_CHECK_ATTEMPTS`` lost checks, never retried in a loop."""
        from concurrent.futures.process import BrokenProcessPool

        n, broken = 0, False
        now = time.monotonic()
        hung = [s for s, (f, _, t) in self._checking.items()
                if not f.done() and now - t > self.s.check_timeout_s]  # fmt: skip
        if hung and not self._stop.is_set():
            log.error("series %s: no answer from its check in %.0f s; the check processes are "
                      "killed and started again", ", ".join(hung), self.s.check_timeout_s)  # fmt: skip
            self.pool.kill()  # its futures fail as a crash's do: lost checks, below
            self._draining = True  # nothing new goes to the dying pool
        for series in [s for s, (f, _, _) in self._checking.items() if f.done()]:
            future, rows, _ = self._checking.pop(series)
            try:
                outcome = future.result()
            except Exception as err:  # noqa: BLE001 - the worker died or could not answer
                broken = broken or isinstance(err, BrokenProcessPool)
                self._lost[series] += 1
                log.error("series %s: its check was lost (%s: %s), attempt %d of %d", series,
                          type(err).__name__, err, self._lost[series], MAX_CHECK_ATTEMPTS)  # fmt: skip
                if self._lost[series] < MAX_CHECK_ATTEMPTS:
                    continue
                outcome = Outcome(Verdict(
                    REJECTED, reason=f"rejected: the check process failed "
                    f"{MAX_CHECK_ATTEMPTS} times on this series ({type(err).__name__})",
                ))  # fmt: skip
            self._lost.pop(series, None)
            self._finish(series, rows, outcome)
            n += 1
        if broken and self.pool.broken and not self._stop.is_set():
            self.pool.restart()  # not again for the late failures of a pool already replaced
        return n

    def _finish(self, series: str, rows: list[dict[str, Any]], outcome: Outcome) -> None:
        verdict = outcome.verdict
        hold = verdict.status in self.s.hold
        self._apply(series, rows, verdict, hold, outcome.report)
        log.info(
            "series %s (%d instance(s)): %s%s -> %s", series, len(rows), verdict.status,
            f" [{verdict.reason}]" if verdict.reason else "", "held" if hold else "queued",
        )  # fmt: skip

    def _apply(
        self,
        series: str,
        rows: list[dict[str, Any]],
        v: Verdict,
        hold: bool,
        report: ReportFile | None,
    ) -> None:
        """Files first (idempotent moves), then one transaction for every row of the series."""
        where = QUARANTINE if hold else INCOMING
        moved = {
            r["sop_instance_uid"]: self.spool.move(r["file"], where, series, r["sop_instance_uid"])
            for r in rows
        }
        report_rel = None
        if report is not None:
            report_rel = self.spool.rel(where, report.series, report.sop)
            write_atomic(self.spool.path(report_rel), report.data)
        state = A.HELD if hold else A.QUEUED
        now = now_iso()
        with self.audit.tx() as db:
            for r in rows:
                db.execute(
                    "UPDATE instances SET declared=?, predicted=?, prob_perfusion=?, status=?, "
                    "review=?, state=?, checked_at=?, held_reason=?, file=? "
                    "WHERE sop_instance_uid=? AND state=?",
                    (v.declared, v.predicted, v.prob_perfusion, v.status, int(v.review), state,
                     now, v.reason if (hold or v.status == PASSED) else None,
                     moved[r["sop_instance_uid"]], r["sop_instance_uid"], A.RECEIVED),
                )  # fmt: skip
            if report is not None:
                db.execute(
                    "INSERT OR REPLACE INTO instances (sop_instance_uid, series_instance_uid, "
                    "study_instance_uid, patient_id, sop_class_uid, calling_ae, received_at, "
                    "declared, predicted, prob_perfusion, status, review, state, checked_at, "
                    "held_reason, report_for, file) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (report.sop, report.series, report.study, report.patient, report.sop_class,
                     self.s.ae_title, now, v.declared, v.predicted, v.prob_perfusion, REPORT,
                     int(v.review), state, now, v.reason if hold else None, series, report_rel),
                )  # fmt: skip
            self.audit.event(db, series, "held" if hold else "queued", "node", v.reason)

    # ------------------------------------------------------------------ forwarder
    def _forwarder(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.forward_once()
            except Exception:  # noqa: BLE001
                log.exception("forwarder failed; retrying")
                sent = 0
                self._failed("internal error")
            if self.backoff_s > 0:
                self._stop.wait(self.backoff_s)
            elif not sent:
                self._stop.wait(0.1)

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.backoff_s = min(self.s.retry_max_s, self.s.retry_initial_s * 2 ** (self.failures - 1))
        log.warning("PACS: %s; retrying in %.1f s", why, self.backoff_s)

    def _succeeded(self) -> None:
        if self.failures:
            log.info("PACS reachable again")
        self.failures, self.backoff_s = 0, 0.0

    def reconcile(self) -> None:
        """Instances in flight when the link or the node went away: ask the PACS before any is
        sent again (the PACS may have stored one whose answer never came)."""
        for r in self.audit.by_state(A.SENDING):
            if r["sop_instance_uid"] in self._inflight:
                continue  # a live worker is sending it and will record the outcome
            have = self.pacs.has_instance(
                r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"]
            )
            with self.audit.tx() as db:
                if have:
                    db.execute(
                        "UPDATE instances SET state=?, forwarded_at=?, deliveries=deliveries+1, "
                        "last_error=? WHERE sop_instance_uid=? AND state=?",
                        (A.FORWARDED, now_iso(), "found on the PACS by C-FIND after an "
                         "interrupted transfer", r["sop_instance_uid"], A.SENDING),
                    )  # fmt: skip
                else:
                    db.execute(
                        "UPDATE instances SET state=? WHERE sop_instance_uid=? AND state=?",
                        (A.QUEUED, r["sop_instance_uid"], A.SENDING),
                    )
            if have:
                self.spool.remove(r["file"])
            log.info("%s was in flight: %s", r["sop_instance_uid"],
                     "on the PACS already" if have else "not on the PACS, queued again")  # fmt: skip

    def forward_once(self) -> int:
        """One batch: reconcile what was in flight, then send up to ``forward_batch`` queued
        instances over one association. Several workers (``forward.workers``) call this at once:
        each claims its batch under one lock, so batches are disjoint, and a backlog is shared
        out evenly. Returns how many were forwarded."""
        with self._claim_lock:
            try:
                self.reconcile()
            except PacsUnavailable as err:
                self._failed(str(err))
                return 0
            by_sop = self._claim()
        if not by_sop:
            return 0
        try:
            return self._send_claimed(by_sop)
        finally:
            with self._claim_lock:
                self._inflight.difference_update(by_sop)

    def _claim(self) -> dict[str, dict[str, Any]]:
        """Queued instances for one worker (its share of the backlog, at most ``forward_batch``),
        moved to `sending` and marked in flight. Call with ``_claim_lock`` held."""
        workers = max(1, self.s.forward_workers)
        rows = self.audit.by_state(A.QUEUED, limit=self.s.forward_batch * workers)
        if not rows:
            return {}
        rows = rows[: max(1, min(self.s.forward_batch, -(-len(rows) // workers)))]
        by_sop = {}
        for r in rows:
            path = self.spool.find(r["file"], r["series_instance_uid"], r["sop_instance_uid"])
            if path is None:  # cannot happen unless someone deleted it: say so, do not loop on it
                with self.audit.tx() as db:
                    db.execute(
                        "UPDATE instances SET state=?, held_reason=? WHERE sop_instance_uid=?",
                        (A.HELD, "spool file missing: send it again from the modality",
                         r["sop_instance_uid"]),
                    )  # fmt: skip
                log.error("%s: spool file missing; held", r["sop_instance_uid"])
                continue
            by_sop[r["sop_instance_uid"]] = {**r, "path": path}
        # The whole batch goes to `sending` in one transaction and its outcome is recorded in
        # one more: after a crash in between, the rows still `sending` are looked up on the PACS
        # (`reconcile`) before any is sent again.
        self._set_state(list(by_sop), A.SENDING, A.QUEUED)
        self._inflight.update(by_sop)
        return by_sop

    def _send_claimed(self, by_sop: dict[str, dict[str, Any]]) -> int:
        items = [(sop, r["path"]) for sop, r in by_sop.items()]
        results: dict[str, SendResult] = {}
        reached: set[str] = set()
        error = None
        try:
            self.pacs.send(
                items, on_result=lambda res: results.__setitem__(res.sop, res),
                before_each=reached.add,
            )  # fmt: skip
        except PacsUnavailable as err:
            error = err
        now = now_iso()
        ok = [s for s, res in results.items() if res.ok and s in by_sop]
        refused = [res for s, res in results.items() if not res.ok and s in by_sop]
        in_doubt = reached - set(results)  # C-STORE sent, no answer: the PACS may have it
        untouched = [s for s in by_sop if s not in results and s not in in_doubt]
        with self.audit.tx() as db:
            db.executemany(
                "UPDATE instances SET state=?, forwarded_at=?, deliveries=deliveries+1, "
                "attempts=attempts+1, last_error=NULL WHERE sop_instance_uid=?",
                [(A.FORWARDED, now, s) for s in ok],
            )
            db.executemany(
                "UPDATE instances SET state=?, attempts=attempts+1, last_error=? "
                "WHERE sop_instance_uid=?",
                [(A.QUEUED, f"PACS refused it ({res.detail})", res.sop) for res in refused],
            )
            db.executemany(
                "UPDATE instances SET state=? WHERE sop_instance_uid=? AND state=?",
                [(A.QUEUED, s, A.SENDING) for s in untouched],
            )
        for s in ok:
            self.spool.remove(by_sop[s]["file"])
        if error is not None:
            self._failed(str(error))
        elif refused:
            self._failed(f"{len(refused)} instance(s) refused, e.g. {refused[0].detail}")
        elif ok:
            self._succeeded()
        return len(ok)

    def _set_state(self, sops: list[str], state: str, where: str) -> None:
        with self.audit.tx() as db:
            db.executemany(
                "UPDATE instances SET state=? WHERE sop_instance_uid=? AND state=?",
                [(state, s, where) for s in sops],
            )
