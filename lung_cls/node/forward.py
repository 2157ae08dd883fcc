"""Sending to the PACS: C-STORE of spooled files over one association, C-FIND of one instance.

`Pacs` is stateless between calls: each batch opens an association, sends, and releases it. A
PACS that cannot be reached raises `PacsUnavailable`; a refused instance comes back as a failed
`SendResult`. The node's forwarder (`lung_cls.node.server`) decides what to retry and when.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lung_cls.node")

#: C-STORE statuses that mean the PACS has the instance (success and the warnings).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class PacsUnavailable(Exception):
    """No association with the PACS (down, refusing us, or gone mid-transfer)."""


@dataclass
class SendResult:
    sop: str
    ok: bool
    detail: str = ""


@dataclass
class Pacs:
    host: str
    port: int
    ae_title: str
    calling_ae: str = "LUNG_QA"
    timeout_s: float = 10.0

    def _ae(self, contexts: Sequence[tuple[str, Sequence[str]]]) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, list(syntaxes))
        return ae

    def _associate(self, contexts: Sequence[tuple[str, Sequence[str]]]) -> Any:
        from pynetdicom import evt

        from lung_cls.node.tcp import on_connection

        ae = self._ae(contexts)
        assoc = ae.associate(
            self.host, int(self.port), ae_title=self.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_connection)],  # see lung_cls.node.tcp
        )  # fmt: skip
        if not assoc.is_established:
            raise PacsUnavailable(
                f"no association with {self.ae_title}@{self.host}:{self.port} "
                f"({'rejected' if assoc.is_rejected else 'unreachable or aborted'})"
            )
        return assoc

    def echo(self) -> bool:
        from pynetdicom.sop_class import Verification

        try:
            assoc = self._associate([(Verification, ["1.2.840.10008.1.2"])])
        except PacsUnavailable:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and status.Status == 0x0000
        finally:
            assoc.release()

    def send(
        self, items: Sequence[tuple[str, Path]], on_result: Any = None, before_each: Any = None
    ) -> list[SendResult]:
        """C-STORE each (SOP instance UID, file) over one association; ``on_result(result)`` is
        called after each instance, so the caller records it before the next is sent;
        ``before_each(sop)`` just before its C-STORE. ``items`` beyond the first 128 SOP class
        contexts are the caller's to split.

        Raises `PacsUnavailable` when no association can be made; an association lost midway
        raises it too, after the results so far were reported (the instance in flight is not:
        the PACS may or may not have it)."""
        from pydicom.filereader import read_file_meta_info
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        # Files are sent as they lie in the spool (pynetdicom streams a path without decoding
        # it); only their file meta is read, for the presentation contexts.
        loaded = []
        results: list[SendResult] = []
        contexts: dict[str, list[str]] = {}
        for sop, path in items:
            try:
                meta = read_file_meta_info(path)
                sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            except Exception as err:  # noqa: BLE001 - a spool file that cannot be read
                res = SendResult(sop, False, f"spool file unreadable: {err}")
                results.append(res)
                if on_result:
                    on_result(res)
                continue
            loaded.append((sop, path))
            syntaxes = contexts.setdefault(sop_class, [])
            for uid in (ts, str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)):
                if uid not in syntaxes:
                    syntaxes.append(uid)
        if not loaded:
            return results
        assoc = self._associate(list(contexts.items())[:128])
        try:
            for sop, path in loaded:
                if not assoc.is_established:
                    raise PacsUnavailable("association lost during the transfer")
                if before_each:
                    before_each(sop)
                try:
                    status = assoc.send_c_store(Path(path))
                except (RuntimeError, ValueError) as err:
                    raise PacsUnavailable(f"C-STORE failed: {err}") from None
                if not status:  # no response: timeout, abort
                    raise PacsUnavailable("no C-STORE response (association aborted?)")
                code = int(status.Status)
                res = SendResult(sop, code in STORED, f"status 0x{code:04X}")
                results.append(res)
                if on_result:
                    on_result(res)
        finally:
            if assoc.is_established:
                assoc.release()
        return results

    def has_instance(self, study: str | None, series: str, sop: str) -> bool:
        """Does the PACS hold this SOP instance? (Study Root C-FIND at IMAGE level.)
        Raises `PacsUnavailable` when it cannot be asked."""
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find

        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study or ""
        query.SeriesInstanceUID = series
        query.SOPInstanceUID = sop
        assoc = self._associate([(Find, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])])
        found = False
        try:
            for status, identifier in assoc.send_c_find(query, Find):
                if not status:
                    raise PacsUnavailable("no C-FIND response")
                if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    found = found or str(identifier.get("SOPInstanceUID", "")) == sop
                elif status.Status not in (0x0000, 0xFF00, 0xFF01):
                    raise PacsUnavailable(f"C-FIND refused (status 0x{int(status.Status):04X})")
        finally:
            if assoc.is_established:
                assoc.release()
        return found
