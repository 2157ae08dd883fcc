"""The node against a real PACS: Orthanc (Debian's package) as the PACS, dcmtk's storescu as the
modality, the node as its own process. What arrived is read back through Orthanc's REST API, and
a Lua filter in Orthanc logs every instance it receives, duplicates included.

Marked ``pacs``: they skip, saying why, where Orthanc or storescu are missing; CI installs both.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import compose, tiny_overrides
from node_helpers import (
    NodeProcess,
    OrthancPacs,
    audit_rows,
    fake_ensemble,
    needs_pacs,
    scratch_checkpoint,
    storescu,
    uids,
    wait_for,
    write_series,
)

pytestmark = [pytest.mark.pacs, needs_pacs]

TERMINAL = {"forwarded", "held", "discarded"}


def all_settled(spool: Path, expected: set[str]):
    """Rows for every expected SOP (+ reports), each forwarded or held."""

    def done():
        rows = audit_rows(spool)
        if not expected <= set(rows):
            return None
        return rows if all(r["state"] in TERMINAL for r in rows.values()) else None

    return done


# --------------------------------------------------------------------------------------------------
# Planted mislabels, a trained tiny model
# --------------------------------------------------------------------------------------------------
TRAIN = (
    "data.sim.difficulty=0", "data.preprocess.size=64", "data.n_perfusion=40",
    "data.n_ventilation=40", "data.split.perfusion=[24,8,8]", "data.split.ventilation=[24,8,8]",
    "data.augment.enabled=false", "trainer.max_epochs=8", "callbacks.model_checkpoint.monitor=val/loss",
    "callbacks.model_checkpoint.mode=min", "cams=false",
)  # fmt: skip
CONFIDENT = 0.1  # beyond the review band's edges by this much in the training run's own test loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained here, and its test images it classified confidently and right."""
    from lung_cls.data.sources import load_studies
    from lung_cls.runs import read_predictions
    from lung_cls.train import train

    base = tmp_path_factory.mktemp("node_trained")
    cfg = compose(tiny_overrides(base / "seed0", "seed=0", *TRAIN))
    train(cfg)
    run_dir = base / "seed0" / "run"
    test = read_predictions(run_dir, split="test")
    studies = {s.id: s for s in load_studies(cfg.data)[0]}
    images: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for sid, label, p in zip(test["id"], test["label"], test["prob_perfusion"], strict=True):
        if (label == 1 and p >= 1 - CONFIDENT) or (label == 0 and p <= CONFIDENT):
            images[int(label)].append(studies[sid].pixels)
    assert images[0] and images[1], f"the tiny run is confident on no image of a class ({run_dir})"
    return {"ckpt": run_dir / "checkpoints" / "best.ckpt", "images": images}


# (true class of the image, SeriesDescription, ProtocolName, radiopharmaceutical, planted?)
PLAN = [
    (1, "LUNG PERFUSION ANT", "LUNG PERFUSION", "Tc-99m MAA", False),
    (0, "LUNG VENT ANT", "LUNG VENTILATION", "Technegas", False),
    (1, "Q ANT", None, "MAA", False),
    (0, "LUNG VENT ANT", None, "Kr-81m", False),
    (1, "LUNG VENT ANT", "LUNG VENTILATION", None, True),  # perfusion image labelled ventilation
    (0, "LUNG PERF ANT", "LUNG PERFUSION", None, True),  # ventilation image labelled perfusion
    (1, "LUNG VENT ANT", None, "Tc-99m DTPA", True),
    (0, "LUNG PERFUSION ANT", None, "Tc-99m MAA", True),
]


def test_planted_mislabels_are_held_and_the_rest_reach_the_pacs(trained, tmp_path):
    pacs = OrthancPacs(tmp_path / "pacs").start()
    node = NodeProcess(tmp_path, f"ckpt={trained['ckpt']}", tmp_path / "spool", pacs.dicom_port)
    try:
        node.start()
        series: dict[str, dict] = {}  # series uid -> plan entry, files
        used = {0: 0, 1: 0}
        for i, (label, desc, protocol, pharm, planted) in enumerate(PLAN):
            img = trained["images"][label][used[label] % len(trained["images"][label])]
            used[label] += 1
            files = write_series(
                tmp_path / "in", desc, views=["ANTERIOR", "POSTERIOR"], image=img,
                patient=f"P{i:02d}", protocol_name=protocol, radiopharmaceutical=pharm,
                StudyDescription="NM LUNG V/Q",
            )  # fmt: skip
            series[uids(files[0])[1]] = {"planted": planted, "files": files, "desc": desc}
        other = write_series(tmp_path / "in", "WHOLE BODY ANT", protocol_name="BONE", patient="B1")
        # Two cameras sending at once.
        halves = [[f for s in list(series.values())[k::2] for f in s["files"]] for k in (0, 1)]
        results: list = [None, None]
        senders = [
            threading.Thread(target=lambda k=k: results.__setitem__(k, storescu(node.port, halves[k])))
            for k in (0, 1)
        ]  # fmt: skip
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        assert storescu(node.port, other).returncode == 0
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        sent = {uids(f)[0] for s in series.values() for f in s["files"]} | {uids(other[0])[0]}
        rows = wait_for(all_settled(tmp_path / "spool", sent), 120, 0.5, "every instance settled")
        assert node.stop() == 0
        in_pacs = pacs.sop_uids()
        for s in series.values():
            for f in s["files"]:
                r = rows[uids(f)[0]]
                if s["planted"]:
                    assert (r["status"], r["state"]) == ("mismatch", "held"), (s["desc"], r)
                    assert uids(f)[0] not in in_pacs
                else:
                    assert r["status"] == "ok" and r["state"] == "forwarded", (s["desc"], r)
                    assert uids(f)[0] in in_pacs and r["forwarded_at"] >= r["checked_at"]
        assert rows[uids(other[0])[0]]["status"] == "passed"
        assert uids(other[0])[0] in in_pacs
        # Every instance sent is in the PACS or held, never both, never neither.
        held = {s for s, r in rows.items() if r["state"] == "held"}
        assert sent <= in_pacs | held and not (in_pacs & held)
        # The reports: one per checked series, in its study, forwarded with it or held with it.
        reports = {r["report_for"]: r for r in rows.values() if r["status"] == "report"}
        assert set(reports) == set(series)
        for uid, r in reports.items():
            assert r["state"] == ("held" if series[uid]["planted"] else "forwarded")
            assert (r["sop_instance_uid"] in in_pacs) != series[uid]["planted"]
        sr_tags = [
            pacs.get(f"/instances/{o}/simplified-tags") for o in pacs.get("/instances")
        ]  # fmt: skip
        srs = [t for t in sr_tags if t.get("Modality") == "SR"]
        assert len(srs) == sum(not s["planted"] for s in series.values())
        assert all("not for diagnostic use" in t["SeriesDescription"] for t in srs)
        # Each delivered once.
        delivered = pacs.deliveries()
        assert len(delivered) == len(set(delivered)) == len(in_pacs)
    finally:
        node.stop()
        pacs.stop()


# --------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------
def test_in_flight_instances_are_looked_up_before_a_resend(tmp_path):
    """An instance left `sending` by a crash: on the PACS already -> forwarded, not re-sent;
    not on the PACS -> sent once."""
    from lung_cls.node.audit import SENDING
    from lung_cls.node.forward import Pacs
    from lung_cls.node.server import Node
    from lung_cls.node.settings import NodeSettings

    pacs = OrthancPacs(tmp_path / "pacs").start()
    try:
        files = write_series(tmp_path / "in", "WHOLE BODY", n=2, protocol_name="BONE")
        s = NodeSettings(
            spool=tmp_path / "spool", backend="torch", model_paths=[], port=0,
            forward_port=pacs.dicom_port, forward_ae="ORTHANC", quiet_s=0.2,
        )  # fmt: skip
        node = Node(s, fake_ensemble())
        # Both received and queued; the first already reached the PACS before "the crash".
        for f in files:
            sop, series = uids(f)
            rel = node.spool.store(series, sop, f.read_bytes())
            node.audit.add_received(
                {"sop_instance_uid": sop, "series_instance_uid": series, "file": rel,
                 "study_instance_uid": str(__import__("pydicom").dcmread(f).StudyInstanceUID)}
            )  # fmt: skip
        with node.audit.tx() as db:
            db.execute("UPDATE instances SET state=?, status='passed'", (SENDING,))
        Pacs("127.0.0.1", pacs.dicom_port, "ORTHANC").send([(uids(files[0])[0], files[0])])
        node.start()
        sops = {uids(f)[0] for f in files}
        rows = wait_for(all_settled(tmp_path / "spool", sops), 60, 0.2, "both forwarded")
        node.stop()
        assert all(r["state"] == "forwarded" and r["deliveries"] == 1 for r in rows.values())
        assert "C-FIND" in rows[uids(files[0])[0]]["last_error"]
        assert sorted(pacs.deliveries()) == sorted(sops)  # the first one was not sent again
    finally:
        pacs.stop()


def test_pacs_down_then_stopped_30s_and_node_killed_nothing_lost_nothing_twice(tmp_path):
    ckpt = scratch_checkpoint(tmp_path / "scratch.ckpt")
    pacs = OrthancPacs(tmp_path / "pacs")  # not started yet: the PACS is down
    pacs_port = pacs.dicom_port
    node = NodeProcess(tmp_path, f"ckpt={ckpt}", tmp_path / "spool", pacs_port, "forward.batch=4")
    spool = tmp_path / "spool"
    try:
        node.start()
        # 1. PACS down: the node receives, queues and retries.
        first = []
        for i in range(4):
            first += write_series(tmp_path / "a", "WHOLE BODY", n=2, protocol_name="BONE",
                                  patient=f"A{i}")  # fmt: skip
        assert storescu(node.port, first).returncode == 0
        sops_a = {uids(f)[0] for f in first}
        wait_for(lambda: {s for s, r in audit_rows(spool).items() if r["state"] == "queued"}
                 >= sops_a, 60, 0.2, "queued while the PACS is down")  # fmt: skip
        time.sleep(2)  # a few failed retries
        pacs.start()
        wait_for(all_settled(spool, sops_a), 60, 0.3, "forwarded once the PACS is up")
        # 2. A bigger transfer; SIGKILL the node while it receives and forwards, stop the PACS.
        second = []
        for i in range(12):
            second += write_series(tmp_path / "b", "WHOLE BODY", n=3, protocol_name="BONE",
                                   patient=f"B{i}")  # fmt: skip
        sops_b = {uids(f)[0] for f in second}
        sender = threading.Thread(target=lambda: storescu(node.port, second))
        sender.start()
        wait_for(lambda: sum(r["state"] == "forwarded" for s, r in audit_rows(spool).items()
                             if s in sops_b) >= 3, 60, 0.05, "part of the transfer forwarded")  # fmt: skip
        node.kill()
        sender.join()
        pacs.stop()
        stopped_at = time.monotonic()
        acked_before_kill = {s for s in audit_rows(spool) if s in sops_b}
        assert acked_before_kill, "the kill came before anything was received"
        node.start()
        # The modality sends again what it may not have got acknowledged (here: everything).
        assert storescu(node.port, second).returncode == 0
        time.sleep(max(0.0, 30 - (time.monotonic() - stopped_at)))
        pacs.start()
        rows = wait_for(all_settled(spool, sops_a | sops_b), 120, 0.5, "everything settled")
        assert node.stop() == 0
    finally:
        node.stop()
        pacs.stop()
    pacs.start()
    try:
        in_pacs = pacs.sop_uids()
    finally:
        pacs.stop()
    held = {s for s, r in rows.items() if r["state"] == "held"}
    assert (sops_a | sops_b) <= (in_pacs | held) and not (in_pacs & held)  # nothing lost
    delivered = pacs.deliveries()
    assert len(delivered) == len(set(delivered)), "an instance reached the PACS twice"
    assert all(r["deliveries"] == 1 for r in rows.values() if r["state"] == "forwarded")
    assert len(rows) == len(sops_a | sops_b)  # one audit row per instance, re-sends folded
