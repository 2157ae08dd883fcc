"""The check in worker processes (``check.processes``): the same verdicts as the check in the
node's own process, a worker that dies loses no series, and a model that does not load is one
line at start. No network: instances are put into the spool the way the SCP puts them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pydicom
import pytest
from conftest import compose
from node_helpers import (
    audit_rows,
    fake_ensemble,
    free_port,
    node_env,
    phantom_image,
    scratch_checkpoint,
    wait_for,
    write_series,
)

from lung_cls.errors import ConfigError, UserError
from lung_cls.node.check import REJECTED, Verdict
from lung_cls.node.server import MAX_CHECK_ATTEMPTS, Node
from lung_cls.node.settings import NodeSettings
from lung_cls.node.workers import CheckPool, Outcome, check_and_report


def settings(spool: Path, model: Path | None = None, **kw) -> NodeSettings:
    base = dict(
        spool=spool, backend="torch", model_paths=[model] if model else [], port=0,
        forward_port=free_port(), quiet_s=0.0, timeout_s=2.0,
    )  # fmt: skip
    base.update(kw)
    return NodeSettings(**base)


def received(node: Node, files: list[Path]) -> str:
    """Spool and record ``files`` as the SCP does; returns their series."""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        series, sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        rel = node.spool.store(series, sop, f.read_bytes())
        node.audit.add_received(
            {"sop_instance_uid": sop, "series_instance_uid": series, "file": rel,
             "study_instance_uid": str(ds.StudyInstanceUID), "patient_id": str(ds.PatientID),
             "sop_class_uid": str(ds.SOPClassUID), "calling_ae": "MODALITY"}
        )  # fmt: skip
    return series


def spooled(node: Node, series: str) -> list[tuple[str, Path]]:
    rows = node.audit.series_rows(series, "received")
    return [(r["sop_instance_uid"], node.spool.path(r["file"])) for r in rows]


def checked(node: Node, series: str, timeout: float = 120) -> dict:
    """Run the checker until ``series`` has left ``received``; its rows (and its report's)."""

    def done():
        node.check_ready()
        rows = {s: r for s, r in audit_rows(node.spool.root).items()
                if series in (r["series_instance_uid"], r["report_for"])}  # fmt: skip
        return rows if rows and all(r["state"] != "received" for r in rows.values()) else None

    return wait_for(done, timeout, 0.05, f"series {series} checked")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return scratch_checkpoint(tmp_path_factory.mktemp("model") / "scratch.ckpt")


def test_check_processes_give_the_verdicts_of_the_check_in_process(ckpt, tmp_path):
    """Perfusion and ventilation images, declared either way: the pool's verdict, probability and
    report equal those of `check_and_report` run here on the same files with the same model."""
    s = settings(tmp_path / "spool", ckpt, report=True, check_processes=1)
    node = Node(s, None, version="9.9")
    series = [
        received(node, write_series(tmp_path / f"in{i}", desc, image=phantom_image(label, i)))
        for i, (desc, label) in enumerate(
            [("LUNG PERF ANT", 1), ("LUNG PERF ANT", 0), ("LUNG VENT ANT", 0)]
        )
    ]  # fmt: skip
    here = {sr: check_and_report(s.load_ensemble(), spooled(node, sr), node.ctx) for sr in series}
    node.pool.start()
    try:
        for sr in series:
            rows = checked(node, sr)
            images = [r for r in rows.values() if r["status"] != "report"]
            report = [r for r in rows.values() if r["status"] == "report"]
            v = here[sr].verdict
            assert {r["status"] for r in images} == {v.status}
            assert images[0]["predicted"] == v.predicted
            assert images[0]["prob_perfusion"] == pytest.approx(v.prob_perfusion, abs=1e-6)
            assert len(report) == 1 and here[sr].report is not None
            assert Path(node.spool.path(report[0]["file"])).stat().st_size > 0
    finally:
        node.pool.close()
        node.audit.close()


def test_a_killed_check_process_loses_no_series(ckpt, tmp_path, caplog):
    """SIGKILL the worker while two series are with it (one being checked, one queued): both
    checks are lost, one new pool starts (not one per lost check) and both series are checked (a
    real verdict, not rejected); the same with a worker killed idle."""
    node = Node(settings(tmp_path / "spool", ckpt, report=False, check_processes=1), None)
    node.pool.start()
    try:
        for i, when in enumerate(("busy", "idle")):
            series = [
                received(node, write_series(tmp_path / f"in{i}{k}", "LUNG PERF ANT"))
                for k in range(2 if when == "busy" else 1)
            ]
            victim = next(iter(node.pool._pool._processes.values())).pid
            if when == "idle":
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda: node.pool.broken, 30, 0.05, "the pool to notice")
            if when == "busy":  # stopped first, so that it cannot finish a check before it dies
                os.kill(victim, signal.SIGSTOP)
            node.check_ready()
            if when == "busy":
                assert set(series) <= set(node._checking)
                os.kill(victim, signal.SIGKILL)
            for sr in series:
                rows = checked(node, sr)
                assert {r["status"] for r in rows.values()} <= {"ok", "mismatch", "review"}
                assert {r["state"] for r in rows.values()} <= {"queued", "held"}
            assert victim not in {p.pid for p in node.pool._pool._processes.values()}
        assert caplog.text.count("its check was lost") == 2  # the busy kill, both series
        assert caplog.text.count("a check process died; starting new ones") == 2  # one per kill
        assert not node._lost
    finally:
        node.pool.close()
        node.audit.close()


class _DeadPool:
    """A pool whose every check dies with its process."""

    capacity = 2
    broken = True  # as a real pool is after a worker died

    def __init__(self) -> None:
        self.restarts = 0

    def submit(self, files) -> Future:
        f: Future = Future()
        f.set_exception(BrokenProcessPool("a worker died"))
        return f

    def restart(self) -> None:
        self.restarts += 1

    def close(self) -> None:
        pass


def test_a_series_that_kills_its_check_every_time_is_held_not_retried_forever(tmp_path):
    node = Node(settings(tmp_path / "spool", report=False), fake_ensemble())
    node.pool = pool = _DeadPool()
    series = received(node, write_series(tmp_path / "in", "LUNG PERF ANT", n=2))
    rows = checked(node, series, timeout=30)
    assert {r["status"] for r in rows.values()} == {REJECTED}
    assert {r["state"] for r in rows.values()} == {"held"}
    assert all(f"failed {MAX_CHECK_ATTEMPTS} times" in r["held_reason"] for r in rows.values())
    assert pool.restarts == MAX_CHECK_ATTEMPTS
    assert not node._checking and not node._lost
    node.audit.close()


class _SharedFatePool:
    """A pool in which one series (``poison``) kills every check in flight with it, as a worker
    crash does; `settle` answers what was handed over since the last call."""

    capacity = 2
    broken = True

    def __init__(self, poison: set[str]) -> None:
        self.poison, self.pending, self.restarts = poison, [], 0
        self.lost: dict[str, int] = {}

    def submit(self, files) -> Future:
        f: Future = Future()
        self.pending.append((f, {sop for sop, _ in files}))
        return f

    def settle(self) -> None:
        doomed = any(sops & self.poison for _, sops in self.pending)
        for f, sops in self.pending:
            if doomed:
                key = "poison" if sops & self.poison else min(sops)
                self.lost[key] = self.lost.get(key, 0) + 1
                f.set_exception(BrokenProcessPool("a worker died"))
            else:
                f.set_result(Outcome(Verdict("ok", "perfusion", "perfusion", 0.9)))
        self.pending = []

    def restart(self) -> None:
        self.restarts += 1

    def close(self) -> None:
        pass


def test_a_series_that_crashes_its_check_is_retried_alone_so_the_others_are_not_blamed(tmp_path):
    """Three series, one of which kills whatever shares the pool with it: after the first crash
    the suspect is checked alone, so it alone is held (3 lost checks) and the others are checked
    (each lost at most once, in the first crash)."""
    node = Node(settings(tmp_path / "spool", report=False), fake_ensemble())
    poison_files = write_series(tmp_path / "p", "LUNG PERF ANT")
    poison = received(node, poison_files)
    others = [received(node, write_series(tmp_path / f"o{i}", "LUNG PERF ANT")) for i in range(2)]
    node.pool = pool = _SharedFatePool({pydicom.dcmread(poison_files[0]).SOPInstanceUID})

    def settled():
        node.check_ready()
        pool.settle()
        node.check_ready()
        rows = audit_rows(node.spool.root).values()
        return rows if all(r["state"] != "received" for r in rows) else None

    rows = {r["series_instance_uid"]: r for r in wait_for(settled, 30, 0.01, "every series")}
    assert rows[poison]["status"] == REJECTED and rows[poison]["state"] == "held"
    assert f"failed {MAX_CHECK_ATTEMPTS} times" in rows[poison]["held_reason"]
    assert [rows[s]["status"] for s in others] == ["ok", "ok"]
    assert pool.lost.pop("poison") == MAX_CHECK_ATTEMPTS
    assert all(n <= 1 for n in pool.lost.values()), pool.lost
    node.audit.close()


def test_late_failures_of_a_replaced_pool_do_not_restart_the_new_one(tmp_path):
    """Two checks of a pool that broke fail one after the other: the first restarts the pool,
    the second (the old pool's, collected after) must not restart the healthy new one."""

    class Pool:
        capacity, broken, restarts = 2, False, 0

        def __init__(self):
            self.futures: list[Future] = []

        def submit(self, files):
            self.futures.append(Future())
            return self.futures[-1]

        def restart(self):
            self.restarts += 1
            self.broken = False

        def close(self):
            pass

    node = Node(settings(tmp_path / "spool", report=False), fake_ensemble())
    node.pool = pool = Pool()
    for i in range(2):
        received(node, write_series(tmp_path / f"in{i}", "LUNG PERF ANT"))
    node.check_ready()
    first, second = pool.futures
    pool.broken = True
    first.set_exception(BrokenProcessPool("a worker died"))
    node._collect()
    second.set_exception(BrokenProcessPool("a worker died"))  # late, from the replaced pool
    node._collect()
    assert pool.restarts == 1
    node.audit.close()


def test_a_hung_check_is_killed_after_check_timeout_s_and_done_again(ckpt, tmp_path, caplog):
    """A worker that stops answering (SIGSTOP: a deadlock, a swapped-out machine) is killed after
    ``check.timeout_s`` and the series is checked again by a new worker: a real verdict."""
    s = settings(tmp_path / "spool", ckpt, report=False, check_processes=1, check_timeout_s=2.0)
    node = Node(s, None)
    node.pool.start()
    try:
        series = received(node, write_series(tmp_path / "in", "LUNG PERF ANT"))
        victim = next(iter(node.pool._pool._processes.values())).pid
        os.kill(victim, signal.SIGSTOP)
        rows = checked(node, series)
        assert {r["status"] for r in rows.values()} <= {"ok", "mismatch", "review"}
        assert "no answer from its check in 2 s" in caplog.text
        assert victim not in {p.pid for p in node.pool._pool._processes.values()}
    finally:
        node.pool.close()
        node.audit.close()


def test_a_model_the_check_processes_cannot_load_is_one_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    pool = CheckPool(settings(tmp_path / "s", bad), None, 1)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="the check processes could not load the model: .*bad"):
        pool.start()
    res = subprocess.run(
        [sys.executable, "-m", "lung_cls.node", f"spool={tmp_path / 's'}", f"ckpt={bad}",
         "listen.port=0", "check.processes=1"],
        cwd=tmp_path, env=node_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the check processes could not load the model: "), res.stderr
    assert str(bad) in last and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "override",
    ["check.processes=-1", "check.processes=65", "check.processes=two", "check.timeout_s=0"],
)
def test_check_keys_are_typed(tmp_path, override):
    ck = tmp_path / "m.ckpt"
    ck.write_bytes(b"x")
    cfg = compose([f"spool={tmp_path / 's'}", f"ckpt={ck}", override], config_name="node")
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + "="):
        NodeSettings.from_config(cfg)


def test_threads_bound_the_torch_backend_too(ckpt, tmp_path):
    """``threads`` is the model's threads in a check process for either backend: torch's
    default (all cores) spun against the node's own threads (0.49 -> 0.30 CPU s per study)."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        settings(tmp_path / "s", ckpt, threads=1).load_ensemble()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
