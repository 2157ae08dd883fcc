"""The node's spool folder: every received instance is a file here before it is acknowledged.

    <spool>/incoming/<series uid>/<sop uid>.dcm     received, waiting for its check or forward
    <spool>/quarantine/<series uid>/<sop uid>.dcm   held: not forwarded until released
    <spool>/audit.sqlite                            the audit log and work list (`audit`)

A file is written to a temporary name in its folder, flushed and fsync'ed, renamed over its final
name and the folder fsync'ed: after `write_atomic` returns, the instance survives a crash (of the
process or the machine), and a reader never sees half a file. Forwarded and discarded files are
removed; the audit rows stay.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

INCOMING = "incoming"
QUARANTINE = "quarantine"

_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


def safe_name(uid: str) -> str:
    """A UID as a file name (UIDs are digits and dots; anything else is replaced)."""
    text = _SAFE.sub("_", str(uid).strip()) or "_"
    return text[:128]


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Spool:
    """Paths and moves inside one spool folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        (self.root / INCOMING).mkdir(parents=True, exist_ok=True)
        (self.root / QUARANTINE).mkdir(parents=True, exist_ok=True)

    def rel(self, where: str, series: str, sop: str) -> str:
        return f"{where}/{safe_name(series)}/{safe_name(sop)}.dcm"

    def path(self, rel: str) -> Path:
        return self.root / rel

    def store(self, series: str, sop: str, data: bytes) -> str:
        """A received instance -> its durable file under incoming/; returns its relative name."""
        rel = self.rel(INCOMING, series, sop)
        write_atomic(self.path(rel), data)
        return rel

    def move(self, rel: str, where: str, series: str, sop: str) -> str:
        """Move a spool file to incoming/ or quarantine/ (atomic rename); the new relative name.
        A file already moved (a crash between the move and the audit update) is found there."""
        new = self.rel(where, series, sop)
        src, dst = self.path(rel), self.path(new)
        if src == dst:
            return new
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
            os.replace(src, dst)
            fsync_dir(dst.parent)
        return new

    def find(self, rel: str, series: str, sop: str) -> Path | None:
        """The file of an instance: where the audit says, or in the other folder."""
        for candidate in (rel, self.rel(INCOMING, series, sop), self.rel(QUARANTINE, series, sop)):
            if candidate and self.path(candidate).is_file():
                return self.path(candidate)
        return None

    def remove(self, rel: str | None) -> None:
        if rel:
            self.path(rel).unlink(missing_ok=True)
            parent = self.path(rel).parent
            try:
                parent.rmdir()  # the series folder, once empty
            except OSError:
                pass

    def orphans(self) -> list[Path]:
        """Files under incoming/ (left by a crash between the write and the audit row: never
        acknowledged, so the sender re-sends them; the node takes them in at start)."""
        return sorted(p for p in (self.root / INCOMING).glob("*/*.dcm") if p.is_file())

    def clean_temp(self) -> None:
        """Remove half-written temporary files a crash left."""
        for p in self.root.glob("*/*/.tmp-*.part"):
            p.unlink(missing_ok=True)
