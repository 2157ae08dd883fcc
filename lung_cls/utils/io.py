"""Atomic writes and plain containers: the one place that writes result files and turns configs
and NumPy values into plain Python.

Atomic: a reader (the report, a second process, a copy made while a job runs) never sees a
half-written result file. Each writer writes to a temporary file in the same folder and then
renames it over the target, which is atomic on POSIX file systems; on any failure the temporary
file is removed and the previous file, if any, is left as it was.

Plain: the cache key, ``metrics.json``, the phantom's parameters and the W&B config all need plain
dicts/lists/numbers. :func:`to_plain` is the one converter (OmegaConf containers, mappings,
sequences, NumPy and torch scalars); :func:`to_jsonable` is the same with NaN/inf as ``null``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


# --------------------------------------------------------------------------- plain containers
def to_plain(obj: Any, *, json_safe: bool = False, ndigits: int | None = None) -> Any:
    """Mapping/sequence trees -> plain ``dict``/``list``; NumPy/torch scalars -> Python numbers.

    OmegaConf containers are resolved first (``OmegaConf.to_container(resolve=True)``: a ``???``
    value stays the string ``"???"``), without importing OmegaConf for callers that never had one.
    Mapping keys become ``str``; tuples and other sequences become lists, ``str``/``bytes`` stay.
    ``json_safe``: NaN and inf become ``None`` (valid JSON for any reader) and arrays become lists.
    ``ndigits``: floats are rounded (the phantom keeps its sampled parameters at 5 decimals).
    """
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(obj, omegaconf.DictConfig | omegaconf.ListConfig):
        obj = omegaconf.OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(obj[k], json_safe=json_safe, ndigits=ndigits) for k in obj}
    if isinstance(obj, list | tuple) or (
        isinstance(obj, Sequence) and not isinstance(obj, str | bytes)
    ):
        return [to_plain(v, json_safe=json_safe, ndigits=ndigits) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist(), json_safe=json_safe, ndigits=ndigits) if json_safe else obj
    if isinstance(obj, np.generic) or (
        json_safe and hasattr(obj, "item") and callable(obj.item)  # torch scalars
    ):
        obj = obj.item()
    if isinstance(obj, float):
        if json_safe and not math.isfinite(obj):
            return None
        if ndigits is not None:
            return round(obj, ndigits)
    return obj


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf become null so the file is valid JSON for any reader."""
    return to_plain(obj, json_safe=True)


# --------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", *, suffix: str = "", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; it replaces ``path`` only when the block succeeds.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. ``suffix`` is kept at the end of the temporary
    name (``np.savez`` adds ``.npz`` to names without it). The file gets the usual permissions
    (0644 under umask 022), not ``mkstemp``'s 0600.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        text = {"encoding": "utf-8", "newline": newline} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as fh:
            fd = -1  # owned by fh now
            yield fh
        os.replace(tmp, path)
    finally:
        if fd != -1:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2) + "\n")


def write_csv_atomic(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]
) -> Path:
    """A CSV with a header of ``fieldnames``; a row's missing keys are empty cells, extra keys are
    left out."""
    with atomic_open(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fieldnames})
    return Path(path)


def atomic_savez(path: str | os.PathLike, *, compress: bool = True, **arrays: np.ndarray) -> Path:
    """An ``.npz`` of ``arrays``: compressed (result files) or not (the pre-processing cache, which
    is read far more often than it is written)."""
    save = np.savez_compressed if compress else np.savez
    with atomic_open(path, "wb", suffix=".npz") as fh:
        save(fh, **arrays)
    return Path(path)


__all__ = [
    "atomic_open",
    "atomic_savez",
    "atomic_write_json",
    "atomic_write_text",
    "to_jsonable",
    "to_plain",
    "write_csv_atomic",
]
