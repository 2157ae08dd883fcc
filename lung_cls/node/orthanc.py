"""A throw-away local Orthanc as the PACS: for trying the node, its tests and its benchmark.

`OrthancPacs` writes an Orthanc JSON config (DICOM and HTTP on 127.0.0.1, free ports, storage in
one folder, the node registered as a modality so that it may C-FIND), starts ``Orthanc`` (Debian:
``apt-get install -y orthanc``) and reads back what arrived through the REST API. A Lua filter
appends every instance Orthanc receives to ``received.log`` - duplicates included, which Orthanc's
own index folds - so a caller can count deliveries.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RECEIVED_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open("{log}", "a")
  f:write(tostring(dicom.SOPInstanceUID), "\\n")
  f:close()
  return true
end
"""


class OrthancPacs:
    """Orthanc in ``folder``; ``start()`` / ``stop()``; ``sop_uids()`` what it stores."""

    def __init__(
        self,
        folder: str | Path,
        node_port: int | None = None,
        node_aet: str = "LUNG_QA",
        dicom_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.dicom_port, self.http_port = dicom_port or free_port(), http_port or free_port()
        self.aet = "ORTHANC"
        self.log = self.folder / "received.log"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "received.lua").write_text(RECEIVED_LUA.replace("{log}", str(self.log)))
        config = {
            "Name": "lung-qa-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"node": [node_aet, "127.0.0.1", node_port or 104]},
            "LuaScripts": [str(self.folder / "received.lua")],
            "Plugins": [],
            "StableAge": 1,
        }
        self.config = self.folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.proc: subprocess.Popen | None = None
        self.out: Any = None

    def start(self, timeout: float = 60.0) -> OrthancPacs:
        if ORTHANC is None:
            raise RuntimeError("Orthanc is not on PATH (apt-get install -y orthanc)")
        self.out = open(self.folder / "orthanc.out", "ab")
        self.proc = subprocess.Popen(
            [ORTHANC, str(self.config)], stdout=self.out, stderr=subprocess.STDOUT
        )
        end = time.monotonic() + timeout
        while not self._up():
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer in {timeout:.0f} s ({self.folder})")
            time.sleep(0.2)
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited ({self.proc.returncode}): see {self.folder / 'orthanc.out'}"
            )
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.out is not None:
            self.out.close()
            self.out = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def sop_uids(self) -> set[str]:
        """Every SOPInstanceUID Orthanc stores (REST /instances + simplified-tags)."""
        return {
            self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"]
            for oid in self.get("/instances")
        }

    def deliveries(self) -> list[str]:
        """Every instance received, in order, duplicates included."""
        return self.log.read_text().split() if self.log.exists() else []
