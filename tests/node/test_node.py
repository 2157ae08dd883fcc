"""The node in-process, with a stand-in model and no PACS (or one that is down): what it stores,
answers, records, holds and queues. dcmtk's storescu/echoscu are the modality."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, compose
from node_helpers import (
    ECHOSCU,
    audit_rows,
    fake_ensemble,
    free_port,
    needs_dcmtk,
    node_env,
    storescu,
    uids,
    wait_for,
    write_series,
)

from lung_cls.errors import ConfigError, UserError
from lung_cls.node.audit import COLUMNS
from lung_cls.node.server import Node
from lung_cls.node.settings import NodeSettings

ISSUE_COLUMNS = {
    "sop_instance_uid", "series_instance_uid", "study_instance_uid", "patient_id", "received_at",
    "declared", "predicted", "prob_perfusion", "status", "forwarded_at", "held_reason",
}  # fmt: skip


def settings(spool: Path, **kw) -> NodeSettings:
    base = dict(
        spool=spool, backend="torch", model_paths=[], port=0, forward_port=free_port(),
        quiet_s=0.3, retry_initial_s=0.2, retry_max_s=0.5, timeout_s=2.0,
    )  # fmt: skip
    base.update(kw)
    return NodeSettings(**base)


@pytest.fixture
def node(tmp_path):
    started: list[Node] = []

    def make(prob: float = 0.95, **kw) -> Node:
        n = Node(settings(tmp_path / "spool", **kw), fake_ensemble(prob)).start()
        started.append(n)
        return n

    yield make
    for n in started:
        if not n._stop.is_set():
            n.stop()


def settled(spool: Path, n: int):
    """Wait until ``n`` rows have left the ``received`` state; return the rows."""

    def done():
        rows = audit_rows(spool)
        return (
            rows
            if len(rows) >= n and all(r["state"] != "received" for r in rows.values())
            else None
        )

    return wait_for(done, 60, what=f"{n} checked instances")


@needs_dcmtk
def test_received_instances_are_spooled_audited_checked_and_held_or_queued(node, tmp_path):
    n = node(prob=0.95)  # the stand-in model says perfusion, confidently
    vent = write_series(tmp_path / "in", "LUNG VENT ANT", n=2, patient="PV")  # mislabelled
    perf = write_series(tmp_path / "in", "LUNG PERFUSION ANT", n=1, patient="PQ")
    bone = write_series(tmp_path / "in", "WHOLE BODY", n=1, protocol_name="BONE SCAN")
    res = storescu(n.port, vent + perf + bone)
    assert res.returncode == 0, res.stderr
    # Acknowledged -> on disk and in the audit log, before any check.
    spool = tmp_path / "spool"
    rows = settled(spool, 4 + 2)  # 4 received + a report for each checked series
    assert ISSUE_COLUMNS <= {c for c, _ in COLUMNS}
    by_file = {p: rows[uids(p)[0]] for p in vent + perf + bone}
    for p, r in by_file.items():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert r["series_instance_uid"] == ds.SeriesInstanceUID
        assert r["study_instance_uid"] == ds.StudyInstanceUID
        assert r["patient_id"] == ds.PatientID and r["calling_ae"] == "MODALITY"
        assert r["received_at"] and r["checked_at"] >= r["received_at"]
    for p in vent:
        r = by_file[p]
        assert (r["status"], r["state"], r["declared"], r["predicted"]) == (
            "mismatch", "held", "ventilation", "perfusion",
        )  # fmt: skip
        assert "declared ventilation" in r["held_reason"] and r["prob_perfusion"] == 0.95
        assert (spool / r["file"]).is_file() and r["file"].startswith("quarantine/")
    r = by_file[perf[0]]
    assert (r["status"], r["declared"], r["held_reason"]) == ("ok", "perfusion", None)
    assert r["state"] in ("queued", "sending")  # the PACS is down: it waits
    r = by_file[bone[0]]
    assert (r["status"], r["declared"], r["prob_perfusion"]) == ("passed", None, None)
    assert "no lung keyword" in r["held_reason"]
    reports = [r for r in rows.values() if r["status"] == "report"]
    assert {r["report_for"] for r in reports} == {uids(vent[0])[1], uids(perf[0])[1]}
    held_report = next(r for r in reports if r["report_for"] == uids(vent[0])[1])
    assert held_report["state"] == "held"
    sr = pydicom.dcmread(spool / held_report["file"])
    assert sr.StudyInstanceUID == pydicom.dcmread(vent[0]).StudyInstanceUID
    assert sr.ContentQualification == "RESEARCH" and "not for diagnostic" in sr.SeriesDescription
    texts = [str(getattr(i, "TextValue", "")) for i in sr.ContentSequence]
    assert "mismatch" in texts and any("NOT FOR DIAGNOSTIC USE" in t for t in texts)


@needs_dcmtk
def test_bad_datasets_get_a_failure_status_and_the_association_goes_on(node, tmp_path):
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import NuclearMedicineImageStorage

    n = node()
    good = write_series(tmp_path / "in", "LUNG PERF ANT", n=2)
    no_pixels = pydicom.dcmread(good[1])
    del no_pixels.PixelData
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(NuclearMedicineImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", n.port, ae_title="LUNG_QA")
    assert assoc.is_established
    try:
        # A file cut in half: its pixel data element claims more bytes than came.
        cut = tmp_path / "cut.dcm"
        raw = write_series(tmp_path / "in", "LUNG PERF ANT")[0].read_bytes()
        cut.write_bytes(raw[: len(raw) // 2])
        status_cut = assoc.send_c_store(cut)
        status_missing = assoc.send_c_store(no_pixels)
        status_good = assoc.send_c_store(pydicom.dcmread(good[0]))
        assert assoc.is_established
    finally:
        assoc.release()
    assert status_cut.Status == 0xC210
    assert status_missing.Status == 0xA900
    assert status_good.Status == 0x0000
    rows = audit_rows(tmp_path / "spool")
    assert set(rows) == {uids(good[0])[0]}  # only the acknowledged one


def test_undecodable_dataset_is_refused(node, tmp_path):
    """The SCP handler on a dataset pydicom cannot decode: failure 0xC210, nothing stored."""

    class Event:
        class assoc:  # noqa: N801 - mimics pynetdicom's event.assoc.requestor.ae_title
            class requestor:  # noqa: N801
                ae_title = "MODALITY"

        @property
        def dataset(self):
            raise ValueError("Deferred read: garbage after the preamble")

        file_meta = None

    n = node()
    assert n.handle_store(Event()) == 0xC210
    assert audit_rows(tmp_path / "spool") == {}


@needs_dcmtk
def test_allow_list_of_calling_ae_titles(node, tmp_path):
    n = node(allow=["CAMERA1"])

    def echo(aet: str) -> int:
        return subprocess.run(
            [ECHOSCU, "-aet", aet, "-aec", "LUNG_QA", "127.0.0.1", str(n.port)],
            capture_output=True, timeout=30,
        ).returncode  # fmt: skip

    assert echo("CAMERA1") == 0
    assert echo("INTRUDER") != 0
    files = write_series(tmp_path / "in", "LUNG PERF ANT")
    assert storescu(n.port, files, aet="INTRUDER").returncode != 0
    assert audit_rows(tmp_path / "spool") == {}


@needs_dcmtk
def test_resend_is_not_stored_twice_and_late_instance_follows_its_series(node, tmp_path):
    n = node(prob=0.95)
    files = write_series(tmp_path / "in", "LUNG VENT ANT", n=3)
    assert storescu(n.port, files[:2]).returncode == 0
    settled(tmp_path / "spool", 2 + 1)
    assert storescu(n.port, files[:2]).returncode == 0  # a re-send: acknowledged, not re-stored
    assert storescu(n.port, files[2:]).returncode == 0  # a late instance of a held series
    rows = settled(tmp_path / "spool", 3 + 1)
    assert len(rows) == 4
    late = rows[uids(files[2])[0]]
    assert (late["status"], late["state"]) == ("mismatch", "held")


@needs_dcmtk
def test_series_without_anterior_view_is_rejected_and_other_modalities_pass(node, tmp_path):
    n = node(prob=0.1)
    no_ant = write_series(tmp_path / "in", "LUNG PERF", views=["POSTERIOR", "LAO"])
    ct = write_series(tmp_path / "in", "CT LUNG", Modality="CT")
    assert storescu(n.port, no_ant + ct).returncode == 0
    rows = settled(tmp_path / "spool", 3 + 1)
    r = rows[uids(no_ant[0])[0]]
    assert (r["status"], r["state"]) == ("rejected", "held")
    assert "no anterior view" in r["held_reason"]
    r = rows[uids(ct[0])[0]]
    assert (r["status"], r["state"]) in {("passed", "queued"), ("passed", "sending")}
    assert "modality CT" in r["held_reason"]


@needs_dcmtk
def test_release_and_discard_record_who_and_when(node, tmp_path):
    n = node(prob=0.95)
    a = write_series(tmp_path / "in", "LUNG VENT ANT", patient="A")
    b = write_series(tmp_path / "in", "LUNG VENT ANT", patient="B")
    assert storescu(n.port, a + b).returncode == 0
    settled(tmp_path / "spool", 2 + 2)
    n.stop()
    spool = tmp_path / "spool"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lung_cls.node.release", "--spool", str(spool), *args],
            cwd=ROOT, env=node_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    listed = cli("list")
    assert listed.returncode == 0 and uids(a[0])[1] in listed.stdout and "mismatch" in listed.stdout
    res = cli("release", uids(a[0])[1], "--by", "radiographer.jones", "--note", "checked: MAA")
    assert res.returncode == 0, res.stderr
    res = cli("discard", uids(b[0])[1], "--by", "dr.smith", "--reason", "wrong patient")
    assert res.returncode == 0, res.stderr
    rows = audit_rows(spool)
    ra, rb = rows[uids(a[0])[0]], rows[uids(b[0])[0]]
    assert (ra["state"], ra["released_by"], ra["release_action"]) == (
        "queued", "radiographer.jones", "released",
    )  # fmt: skip
    assert ra["released_at"] > ra["checked_at"] and (spool / ra["file"]).is_file()
    assert ra["file"].startswith("incoming/")
    report = next(r for r in rows.values() if r["report_for"] == uids(a[0])[1])
    assert report["state"] == "queued"  # the report goes with its series
    assert (rb["state"], rb["released_by"]) == ("discarded", "dr.smith")
    assert not (spool / rb["file"]).exists()
    again = cli("release", uids(b[0])[1])
    assert again.returncode == 2 and "not held" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_restart_takes_in_unrecorded_spool_files(tmp_path):
    """A file written but never recorded (a crash between the two) is taken in at start."""
    from lung_cls.node.spool import Spool

    spool = Spool(tmp_path / "spool")
    f = write_series(tmp_path / "in", "LUNG PERF ANT")[0]
    sop, series = uids(f)
    spool.store(series, sop, f.read_bytes())
    (spool.root / "incoming" / "x").mkdir()
    (spool.root / "incoming" / "x" / ".tmp-1.part").write_bytes(b"half")
    n = Node(settings(spool.root), fake_ensemble(0.95)).start()
    try:
        rows = settled(spool.root, 1 + 1)
        assert rows[sop]["status"] == "ok"
        assert not (spool.root / "incoming" / "x" / ".tmp-1.part").exists()
    finally:
        n.stop()


def test_settings_name_the_bad_key(tmp_path):
    cfg = compose([f"spool={tmp_path / 's'}", "ckpt=[]"], config_name="node")
    with pytest.raises(UserError, match="lists no checkpoint"):
        NodeSettings.from_config(cfg)
    ck = tmp_path / "m.ckpt"
    ck.write_bytes(b"x")
    for override, key in (
        ("listen.ae_title=WAY_TOO_LONG_AE_TITLE", "listen.ae_title"),
        ("forward.port=70000", "forward.port"),
        ("hold=[mismatch,bogus]", "hold"),
        ("series.quiet_s=-1", "series.quiet_s"),
        ("forward.workers=0", "forward.workers"),
    ):
        cfg = compose([f"spool={tmp_path / 's'}", f"ckpt={ck}", override], config_name="node")
        with pytest.raises(ConfigError, match=re.escape(key)):
            NodeSettings.from_config(cfg)


def test_cli_missing_model_is_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "lung_cls.node", f"spool={tmp_path / 's'}",
         f"ckpt={tmp_path / 'missing.ckpt'}"],
        cwd=tmp_path, env=node_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'missing.ckpt'}: checkpoint not found"


class _SlowPacs:
    """A PACS stand-in: every C-STORE succeeds after ``delay_s``; records what was sent and
    which instances were looked up by C-FIND."""

    def __init__(self, delay_s: float = 0.3) -> None:
        import threading

        self.delay_s = delay_s
        self.sent: list[str] = []
        self.asked: list[str] = []
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def send(self, items, on_result=None, before_each=None):
        import time

        from lung_cls.node.forward import SendResult

        with self.lock:
            self.batches.append([sop for sop, _ in items])
        out = []
        for sop, _path in items:
            if before_each:
                before_each(sop)
            time.sleep(self.delay_s / len(items))
            with self.lock:
                self.sent.append(sop)
            res = SendResult(sop, True)
            out.append(res)
            if on_result:
                on_result(res)
        return out

    def has_instance(self, study, series, sop):
        with self.lock:
            self.asked.append(sop)
        return False


def _queued(node: Node, n: int, series: str = "1.2.3") -> list[str]:
    from lung_cls.node.spool import INCOMING, write_atomic

    sops = [f"1.2.3.{k}" for k in range(n)]
    for sop in sops:
        rel = node.spool.rel(INCOMING, series, sop)
        write_atomic(node.spool.path(rel), b"not sent anywhere")
        node.audit.add_received(
            {"sop_instance_uid": sop, "series_instance_uid": series, "file": rel}
        )
    with node.audit.tx() as db:
        db.execute("UPDATE instances SET state='queued'")
    return sops


def test_forward_workers_claim_disjoint_shares_and_reconcile_leaves_theirs_alone(tmp_path):
    """Two forwarders at once: each instance is sent exactly once, the backlog is split between
    the two associations, and an instance one worker has in flight is never looked up (C-FIND)
    or re-queued by the other; one orphaned `sending` row (a crash) is looked up."""
    import threading

    node = Node(settings(tmp_path / "spool", forward_workers=2, forward_batch=32), None)
    node.pacs = pacs = _SlowPacs()
    sops = _queued(node, 20)
    with node.audit.tx() as db:  # an instance left `sending` by a crash
        db.execute("UPDATE instances SET state='sending' WHERE sop_instance_uid=?", (sops[0],))
    counts = []
    workers = [threading.Thread(target=lambda: counts.append(node.forward_once())) for _ in "ab"]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    while node.forward_once():  # what is left, e.g. the re-queued orphan
        pass
    assert sorted(pacs.sent) == sorted(sops), "every instance sent exactly once"
    assert pacs.asked == [sops[0]], "only the orphan is looked up; in-flight rows are not"
    assert len(pacs.batches[0]) < 19 and len(pacs.batches[1]) < 19  # the backlog was shared
    assert set(pacs.batches[0]).isdisjoint(pacs.batches[1])
    rows = audit_rows(tmp_path / "spool")
    assert {r["state"] for r in rows.values()} == {"forwarded"}
    assert {r["deliveries"] for r in rows.values()} == {1}
    assert not node._inflight


def test_both_ends_of_the_nodes_links_are_tuned_against_delayed_ack_stalls(node):
    """TCP_NODELAY (and on Linux TCP_QUICKACK, re-armed after each read) on the node's accepted
    association and on its association to the PACS (`lung_cls.node.tcp`): without them one
    association to Orthanc carried ~16 instances/s, with them ~140 (bench/dicom_link.py)."""
    import socket

    from pynetdicom.sop_class import Verification

    from lung_cls.node.forward import Pacs
    from lung_cls.node.tcp import QUICKACK

    n = node()
    pacs = Pacs("127.0.0.1", n.port, n.s.ae_title, calling_ae="MODALITY", timeout_s=5)
    assoc = pacs._associate([(Verification, ["1.2.840.10008.1.2"])])
    try:
        wait_for(lambda: n._server.active_associations, 10, what="the node's side")
        (theirs,) = n._server.active_associations
        for link in (assoc.dul.socket, theirs.dul.socket):
            assert link.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            if QUICKACK is not None:
                assert getattr(link, "_lung_cls_tuned", False)
        for _ in range(3):  # the wrapped reads still carry whole messages
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
