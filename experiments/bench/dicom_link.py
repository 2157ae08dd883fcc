"""One DICOM association, instances per second, with and without `lung_cls.node.tcp.tune`.

    python experiments/bench/dicom_link.py [--instances 60] [--size 224] [--repeats 3]

Two links of the node, each measured as plain pynetdicom and as the node runs it (TCP_NODELAY,
TCP_QUICKACK re-armed after each read), alternating, best of ``--repeats``:

* forward: the node's `Pacs.send` path, pynetdicom SCU -> a local Orthanc (the PACS);
* receive: dcmtk's ``storescu`` (the camera) -> a pynetdicom Storage SCP that answers success
  (the node's receive path without the spool).

Every C-STORE is a request and a response; with Nagle's algorithm on one end and delayed ACKs on
the other, each can wait ~40 ms for an acknowledgement. Prints rates and the tuned/plain ratio.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def write_files(folder: Path, n: int, size: int) -> list[Path]:
    from lung_cls.data.dicomio import write_nm_dicom

    rng = np.random.default_rng(0)
    return [
        write_nm_dicom(
            folder / f"{i:04d}.dcm",
            rng.integers(0, 1000, (size, size)).astype(np.uint16),
            patient_id=f"L{i:04d}",
            series_description="LUNG PERF ANT",
        )  # fmt: skip
        for i in range(n)
    ]


def forward_rate(files: list[Path], pacs_port: int, tuned: bool) -> float:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import NuclearMedicineImageStorage

    from lung_cls.node.tcp import on_connection

    ae = AE(ae_title="LUNG_QA")
    ae.add_requested_context(NuclearMedicineImageStorage, ["1.2.840.10008.1.2.1"])
    handlers = [(evt.EVT_CONN_OPEN, on_connection)] if tuned else []
    assoc = ae.associate("127.0.0.1", pacs_port, ae_title="ORTHANC", evt_handlers=handlers)
    if not assoc.is_established:
        raise SystemExit(f"no association with Orthanc on port {pacs_port}")
    try:
        t = time.perf_counter()
        for f in files:
            status = assoc.send_c_store(f)
            if not status or status.Status != 0:
                raise SystemExit(f"C-STORE of {f} failed: {status}")
        return len(files) / (time.perf_counter() - t)
    finally:
        assoc.release()


def receive_rate(files: list[Path], tuned: bool) -> float:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from lung_cls.node.orthanc import free_port
    from lung_cls.node.tcp import on_connection

    ae = AE(ae_title="LUNG_QA")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000)]
    if tuned:
        handlers.append((evt.EVT_CONN_OPEN, on_connection))
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        t = time.perf_counter()
        res = subprocess.run(
            ["storescu", "-aet", "CAMERA", "-aec", "LUNG_QA", "127.0.0.1", str(port),
             *map(str, files)],
            capture_output=True, text=True,
        )  # fmt: skip
        dt = time.perf_counter() - t
        if res.returncode != 0:
            raise SystemExit(f"storescu failed: {res.stderr.strip()[-500:]}")
        return len(files) / dt
    finally:
        server.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=60)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if shutil.which("Orthanc") is None or shutil.which("storescu") is None:
        raise SystemExit("needs Orthanc and storescu on PATH (apt-get install -y orthanc dcmtk)")
    from lung_cls.node.orthanc import OrthancPacs

    with tempfile.TemporaryDirectory(prefix="bench-link-") as tmp:
        files = write_files(Path(tmp) / "in", args.instances, args.size)
        pacs = OrthancPacs(Path(tmp) / "pacs").start()
        try:
            best = {k: 0.0 for k in ("fwd0", "fwd1", "rcv0", "rcv1")}
            for _ in range(args.repeats):
                for tuned in (False, True):
                    k = int(tuned)
                    best[f"fwd{k}"] = max(
                        best[f"fwd{k}"], forward_rate(files, pacs.dicom_port, tuned)
                    )
                    best[f"rcv{k}"] = max(best[f"rcv{k}"], receive_rate(files, tuned))
        finally:
            pacs.stop()
    print(f"{args.instances} NM instances of {args.size}x{args.size} px, one association, "
          f"best of {args.repeats}")  # fmt: skip
    for name, key in (
        ("forward: pynetdicom -> Orthanc", "fwd"),
        ("receive: storescu -> pynetdicom", "rcv"),
    ):
        plain, tuned = best[f"{key}0"], best[f"{key}1"]
        print(f"{name:32s} plain {plain:6.1f}/s  tuned {tuned:6.1f}/s  ratio {tuned / plain:5.2f}")


if __name__ == "__main__":
    main()
