"""Atomic writes and the one plain-container converter (lung_cls/utils/io.py).

Atomic: a reader never sees a half-written result, a failed write keeps the previous file and
leaves no temporary one. Plain: configs and NumPy values become plain Python, once, the same way
for the cache key, metrics.json, the phantom's parameters and W&B.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from lung_cls.utils import io
from lung_cls.utils.io import atomic_open, atomic_savez, to_jsonable, to_plain


# --------------------------------------------------------------------------- atomic writes
def _writers(tmp_path: Path) -> dict[str, tuple[Path, Callable[[int], Any]]]:
    def json_w(v: int) -> Any:
        return io.atomic_write_json(tmp_path / "metrics.json", {"status": "ok", "v": v})

    def csv_w(v: int) -> Any:
        return io.write_csv_atomic(tmp_path / "predictions.csv", [{"id": i, "v": v} for i in range(50)], ["id", "v"])  # fmt: skip

    def npz_w(v: int) -> Any:
        return io.atomic_savez(tmp_path / "cams.npz", cams=np.full((4, 8, 8), v, np.float16))

    return {
        "metrics.json": (tmp_path / "metrics.json", json_w),
        "predictions.csv": (tmp_path / "predictions.csv", csv_w),
        "cams.npz": (tmp_path / "cams.npz", npz_w),
    }


@pytest.mark.parametrize("name", ["metrics.json", "predictions.csv", "cams.npz"])
def test_atomic_writes_keep_the_previous_file(tmp_path, monkeypatch, name):
    path, write = _writers(tmp_path)[name]
    write(1)
    before = path.read_bytes()

    def crash(src, dst):
        # The new content is complete in the temporary file at this point; the crash comes at
        # the rename, the last step.
        assert Path(src).parent == path.parent and Path(src).stat().st_size > 0
        raise OSError("disk pulled out")

    monkeypatch.setattr(io.os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        write(2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no partial or temporary file
    write(3)  # and a later write still works
    assert path.read_bytes() != before


def test_atomic_csv_failing_mid_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "predictions.csv"
    io.write_csv_atomic(path, [{"id": 1}], ["id"])
    before = path.read_bytes()

    def rows():
        yield {"id": 2}
        raise RuntimeError("killed while writing rows")

    with pytest.raises(RuntimeError):
        io.write_csv_atomic(path, rows(), ["id"])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_atomic_open_failure_inside_the_block_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.md"
    io.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="renderer broke"):
        with atomic_open(path) as fh:
            fh.write("half of the new")
            raise RuntimeError("renderer broke")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(path, "a"):
            pass


def test_results_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        io.atomic_write_json(tmp_path / "metrics.json", {"status": "ok"})
        atomic_savez(tmp_path / "cams.npz", cams=np.zeros((1, 2, 2)))
    finally:
        os.umask(mask)
    for name in ("metrics.json", "cams.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_savez_compressed_or_not_reads_back_the_same(tmp_path):
    arrays = {"images": np.zeros((8, 64, 64), np.uint8), "labels": np.arange(8)}
    atomic_savez(tmp_path / "small.npz", **arrays)
    atomic_savez(tmp_path / "fast.npz", compress=False, **arrays)
    for name in ("small.npz", "fast.npz"):
        with np.load(tmp_path / name) as z:
            assert set(z.files) == set(arrays)
            assert all(np.array_equal(z[k], v) for k, v in arrays.items())
    # the cache is written uncompressed (read far more often than written), results compressed
    assert (tmp_path / "fast.npz").stat().st_size > 10 * (tmp_path / "small.npz").stat().st_size


def test_json_is_strict_json(tmp_path):
    io.atomic_write_json(tmp_path / "m.json", {"auc": float("nan"), "inf": math.inf, "n": 1})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"auc": None, "inf": None, "n": 1} and text.endswith("\n")


# --------------------------------------------------------------------------- to_plain
def test_to_plain_resolves_omegaconf_and_keeps_missing_values_visible():
    cfg = OmegaConf.create(
        {"size": 64, "prep": {"size": "${size}", "steps": [1, 2]}, "out": "???", 3: "int key"}
    )
    plain = to_plain(cfg)
    assert plain == {"size": 64, "prep": {"size": 64, "steps": [1, 2]}, "out": "???",
                     "3": "int key"}  # fmt: skip
    assert type(plain["prep"]) is dict and type(plain["prep"]["steps"]) is list
    assert to_plain(OmegaConf.create([{"a": "${oc.env:NO_SUCH_VAR_LUNG_CLS,x}"}])) == [{"a": "x"}]


def test_to_plain_numpy_scalars_become_python_numbers():
    out = to_plain({"i": np.int64(3), "f": np.float32(0.25), "b": np.bool_(True), "t": (1, 2)})
    assert out == {"i": 3, "f": 0.25, "b": True, "t": [1, 2]}
    assert [type(out[k]) for k in ("i", "f", "b", "t")] == [int, float, bool, list]
    arr = np.arange(3)
    assert to_plain({"a": arr})["a"] is arr  # arrays stay arrays unless json_safe
    assert to_plain("text") == "text" and to_plain(b"raw") == b"raw"


def test_to_plain_json_safe_and_rounding():
    assert to_jsonable({"a": np.array([[1.5, np.nan]]), "b": np.float64("inf")}) == {
        "a": [[1.5, None]], "b": None,
    }  # fmt: skip
    assert math.isnan(to_plain({"nan": float("nan")})["nan"])  # kept unless json_safe
    rounded = to_plain(
        {"x": 0.1234567, "y": np.float64(2.718281828), "flag": True, "n": 7}, ndigits=5
    )
    assert rounded == {"x": 0.12346, "y": 2.71828, "flag": True, "n": 7}
    assert type(rounded["flag"]) is bool and type(rounded["n"]) is int  # never rounded to 1 / 7.0


def test_to_jsonable_reads_torch_scalars():
    import torch

    assert to_jsonable({"loss": torch.tensor(0.5), "n": torch.tensor(3)}) == {"loss": 0.5, "n": 3}


def test_io_does_not_import_omegaconf_for_plain_callers():
    code = "import sys, lung_cls.utils.io as io; io.to_plain({'a': (1,)}); print('omegaconf' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
