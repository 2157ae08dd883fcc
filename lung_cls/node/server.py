"""The node: a Storage + Verification SCP that spools, a checker that groups and checks series,
and a forwarder that sends to the PACS.

Three threads share the audit log (`lung_cls.node.audit`), which is also the work list:

* the SCP (pynetdicom, one thread per association) writes each instance durably into the spool
  and records it *before* it answers success; a dataset it cannot decode, or without pixel data,
  gets a failure status and a log line, and the association goes on;
* the checker takes a series once it has been quiet for ``quiet_s`` (or, with
  ``complete_on_release``, once every association that delivered to it has ended), checks it
  (`lung_cls.node.check`) and queues it for the PACS or holds it in quarantine; with ``report`` a
  structured report joins it;
* the forwarder sends queued instances, marks each forwarded as the PACS acknowledges it, and on
  failure backs off (doubling, up to ``retry_max_s``). An instance that was in flight when the
  PACS or the node went away is looked up on the PACS by C-FIND before it is sent again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from lung_cls.node import audit as A
from lung_cls.node.audit import Audit, now_iso
from lung_cls.node.check import PASSED, REJECTED, REPORT, LungRule, Verdict, check_series
from lung_cls.node.forward import Pacs, PacsUnavailable, SendResult
from lung_cls.node.settings import NodeSettings
from lung_cls.node.spool import INCOMING, QUARANTINE, Spool

log = logging.getLogger("lung_cls.node")

# DIMSE failure statuses the SCP answers with.
CANNOT_UNDERSTAND = 0xC210
NOT_AN_IMAGE = 0xA900  # "dataset does not match SOP class": here, no pixel data
OUT_OF_RESOURCES = 0xA700


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
        if self.s.report:
            self._warm_report()
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

    def _warm_report(self) -> None:
        """highdicom takes seconds to import and to build its first report: do it before the
        port opens, not on the first series."""
        import tempfile

        import numpy as np
        import pydicom

        from lung_cls.data.dicomio import write_nm_dicom
        from lung_cls.node.report import build_report, encode

        with tempfile.TemporaryDirectory() as tmp:
            path = write_nm_dicom(
                Path(tmp) / "warm.dcm", np.zeros((8, 8), np.uint16), patient_id="WARM",
                series_description="LUNG",
            )  # fmt: skip
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        encode(build_report([ds], {"status": "ok"}, {"name": "warm"}, self.s.ae_title))

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.s.port

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for t in self._threads:
            t.join(timeout=30)
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
                self._stop.wait(0.1)

    def _ready(self, series: str, last: str) -> bool:
        with self._lock:
            active = self._active.get(series, 0)
            released = series in self._released
        if self.s.complete_on_release and released and active == 0:
            return True
        return _age_s(last) >= self.s.quiet_s

    def check_ready(self) -> int:
        """Check every series that is complete; returns how many."""
        n = 0
        for item in self.audit.pending_series():
            if self._stop.is_set():
                break
            if self._ready(item["series"], item["last"]):
                self.process_series(item["series"])
                with self._lock:
                    self._released.discard(item["series"])
                n += 1
        return n

    def process_series(self, series: str) -> None:
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
        try:
            verdict = check_series(self.ens, files, self.rule, self.s.options)
        except Exception as err:  # noqa: BLE001 - a broken check holds the series, never loops
            log.exception("series %s: the check failed", series)
            verdict = Verdict(REJECTED, reason=f"rejected: the check failed ({err})")
        hold = verdict.status in self.s.hold
        report = None
        if self.s.report and verdict.status != PASSED and files:
            report = self._report(files, verdict)
        self._apply(series, rows, verdict, hold, report)
        log.info(
            "series %s (%d instance(s)): %s%s -> %s", series, len(rows), verdict.status,
            f" [{verdict.reason}]" if verdict.reason else "", "held" if hold else "queued",
        )  # fmt: skip

    def _report(self, files: list[tuple[str, Path]], verdict: Verdict) -> tuple[Any, bytes] | None:
        import pydicom

        from lung_cls.node.report import build_report, encode

        try:
            evidence = [_evidence(pydicom.dcmread(p, stop_before_pixels=True)) for _, p in files]
            members = getattr(self.ens, "members", [{}])
            name = "+".join(str(m.get("name") or m.get("backbone") or "model") for m in members)
            sr = build_report(
                evidence,
                {
                    "status": verdict.status, "declared": verdict.declared,
                    "predicted": verdict.predicted, "prob_perfusion": verdict.prob_perfusion,
                    "reason": verdict.reason,
                },
                {"name": name, "version": self.version},
                self.s.ae_title,
            )  # fmt: skip
            return sr, encode(sr)
        except Exception as err:  # noqa: BLE001 - the series still goes on, without its report
            log.error("structured report for %s not written (%s)", files[0][0], err)
            return None

    def _apply(
        self,
        series: str,
        rows: list[dict[str, Any]],
        v: Verdict,
        hold: bool,
        report: tuple[Any, bytes] | None,
    ) -> None:
        """Files first (idempotent moves), then one transaction for every row of the series."""
        where = QUARANTINE if hold else INCOMING
        moved = {
            r["sop_instance_uid"]: self.spool.move(r["file"], where, series, r["sop_instance_uid"])
            for r in rows
        }
        report_row = None
        if report is not None:
            sr, data = report
            sr_series, sr_sop = str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)
            rel = self.spool.rel(where, sr_series, sr_sop)
            from lung_cls.node.spool import write_atomic

            write_atomic(self.spool.path(rel), data)
            report_row = (sr, rel)
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
            if report_row is not None:
                sr, rel = report_row
                db.execute(
                    "INSERT OR REPLACE INTO instances (sop_instance_uid, series_instance_uid, "
                    "study_instance_uid, patient_id, sop_class_uid, calling_ae, received_at, "
                    "declared, predicted, prob_perfusion, status, review, state, checked_at, "
                    "held_reason, report_for, file) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), str(sr.StudyInstanceUID),
                     str(sr.get("PatientID", "")), str(sr.SOPClassUID), self.s.ae_title, now,
                     v.declared, v.predicted, v.prob_perfusion, REPORT, int(v.review), state, now,
                     v.reason if hold else None, series, rel),
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
