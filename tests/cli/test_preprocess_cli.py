"""``python -m lung_cls.preprocess``: the paper's pre-processing on a user's folder or manifest
(lung_cls/data/preprocess_files.py) - centred PNGs, preprocess.csv, Fig. 1 panels, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CONF, compose, lungs


def _cli_input(root):
    rng = np.random.default_rng(7)
    from PIL import Image

    for cls in ("perfusion", "ventilation"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            img = lungs(
                off=rng.uniform(-15, 15, 2), rng=rng, bridge=(cls == "ventilation" and i == 0)
            )
            Image.fromarray((img / img.max() * 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    np.save(root / "perfusion" / "2.npy", lungs(rng=rng))


def test_cli_config_and_run(tmp_path):
    from lung_cls.preprocess import run

    _cli_input(tmp_path / "in")
    cfg = compose(
        [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "size=96", "figures=true"],
        config_name="preprocess",
    )
    assert cfg.prep.size == 96 and cfg.prep.threshold == 30
    import yaml

    hydra_cfg = yaml.safe_load((CONF / "preprocess.yaml").read_text())["hydra"]
    assert hydra_cfg["output_subdir"] is None and hydra_cfg["run"]["dir"] == "."
    summary = run(cfg)
    assert summary["n"] == 5 and summary["methods"] == {"centroid": 4, "nmi": 1}
    out = tmp_path / "out"
    from PIL import Image

    img = np.asarray(Image.open(out / "perfusion" / "2.png"))
    assert img.shape == (96, 96) and img.dtype == np.uint8
    rows = (out / "preprocess.csv").read_text().splitlines()
    assert rows[0].startswith("file,method,shift_y,shift_x")
    assert any(r.startswith("ventilation/0.png,nmi,") for r in rows)
    assert len(list((out / "figures").rglob("*.png"))) == 5
    # a non-empty output folder is refused unless overwrite=true
    from lung_cls.errors import UserError

    with pytest.raises(UserError, match="not empty"):
        run(cfg)
    cfg.overwrite = True
    cfg.figures = False
    assert run(cfg)["n"] == 5


def test_cli_label_less_folder_and_manifest(tmp_path):
    from lung_cls.errors import UserError
    from lung_cls.preprocess import data_config_for, run

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        np.save(src / f"x{i}.npy", lungs(rng=np.random.default_rng(i)))
    cfg = compose([f"input={src}", f"output={tmp_path / 'o'}"], config_name="preprocess")
    assert data_config_for(src, cfg)["class_dirs"] is None
    (src / "README.txt").write_text("what these are")
    summary = run(cfg)
    assert summary["n"] == 2 and summary["skipped"] == []
    assert summary["ignored"] == ["README.txt (not an image file by its name)"]
    cfg = compose([f"input={src}", f"output={src / 'o'}"], config_name="preprocess")
    with pytest.raises(UserError, match="inside the input folder"):
        run(cfg)
    (src / "m.csv").write_text("path,label\nx0.npy,perfusion\n")
    cfg = compose([f"input={src / 'm.csv'}", f"output={tmp_path / 'o2'}"], config_name="preprocess")
    assert run(cfg)["n"] == 1
    assert (tmp_path / "o2" / "x0.png").exists()


@pytest.mark.slow
def test_cli_bad_file_is_one_line(tmp_path):
    import subprocess
    import sys

    _cli_input(tmp_path / "in")
    (tmp_path / "in" / "perfusion" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    cmd = [
        sys.executable,
        "-m",
        "lung_cls.preprocess",
        f"input={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2  # bad input, through the one task wrapper
    assert "error: " in proc.stderr and "bad.png: not a readable PNG image" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        cmd + ["on_error=skip"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "Skipped 1 file(s)" in proc.stderr
    # One summary that adds up: every file under the input is pre-processed, skipped or ignored.
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "perfusion" / "bad.png").unlink()
    proc = subprocess.run(
        cmd + ["overwrite=true"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "6 file(s): 5 pre-processed" in proc.stderr and "0 skipped, 1 ignored" in proc.stderr
    assert "ignored: notes.txt (not an image file by its name)" in proc.stderr
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob("*.log"))
