"""The report's files: markdown and HTML tables, atomic writes, and the checked settings."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lung_cls.errors import ConfigError
from lung_cls.report import figures, render
from lung_cls.report.discover import RunRecord
from lung_cls.report.settings import Settings, from_config


def test_markdown_table_escapes_pipes() -> None:
    df = pd.DataFrame({"model": ["a|b", "c"], "acc": ["1.0 ± -", 2]})
    assert render.df_to_markdown(df) == (
        "| model | acc |\n|---|---|\n| a\\|b | 1.0 ± - |\n| c | 2 |\n"
    )


def test_html_table_shows_undefined_numbers_as_dashes() -> None:
    df = pd.DataFrame({"model": ["<a>"], "p": [0.0123456], "q": [math.nan]})
    text = render.html_table(df)
    assert "<td>0.01235</td>" in text and "<td>-</td>" in text
    assert "&lt;a&gt;" in text and "nan" not in text
    assert render.html_table(pd.DataFrame()) == "<p><em>(empty)</em></p>"


def test_the_page_lists_problems_first_and_quotes_the_settings(tmp_path: Path) -> None:
    runs = [
        RunRecord(name="ok", path=tmp_path, model="m", seed=0, status="ok"),
        RunRecord(name="bad", path=tmp_path, model="m", seed=1, status="failed", error="<boom>"),
    ]
    settings = Settings(n_boot=123, n_perm=45, seed=6, alpha=0.01, equal_var=False)
    sections = [render.roc_section(None), render.notes_section(["a & b"])]
    page = render.html_document(tmp_path / "sw", sections, runs, ["model=m,seed=2"], settings)
    assert page.index('id="failed"') < page.index("Fig. 4: ROC curves")
    assert "Failed, incomplete or missing runs (2)" in page
    assert "<pre>&lt;boom&gt;</pre>" in page and "model=m,seed=2</b> (missing: no run dir)" in page
    assert "from 1 finished run(s) of 2 run dir(s)" in page
    assert "123 resamples" in page and "45 label shuffles, seed 6" in page
    assert "Welch's unequal-variance" in page and "p &lt; 0.01" in page
    assert '<li class="note">a &amp; b</li>' in page
    clean = render.html_document(tmp_path, [], runs[:1], [], Settings())
    assert "None: every run finished." in clean and "Student's pooled-variance" in clean


def _boom(*args, **kwargs):
    raise OSError("disk full")


def _rename_fails_for(*names: str):
    """``os.replace`` that fails when the target is one of ``names`` (the last step of an
    atomic write), and renames everything else."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).name in names:
            raise OSError(f"disk full: {Path(dst).name}")
        return real(src, dst)

    return replace


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("table1.md", lambda out, t1: render.write_table1(out, t1, t1, t1, n_boot=10)),
        ("table1.csv", lambda out, t1: render.write_table1(out, t1, t1, t1, n_boot=10)),
        ("model_comparison.md", lambda out, t1: render.write_comparison(out, t1, t1)),
        ("cam_groundtruth.csv", lambda out, t1: render.write_groundtruth(out, t1, t1)),
        ("report.json", lambda out, t1: render.write_json(out, {"new": 1})),
        ("report.html", lambda out, t1: render.write_html(out, "<html>new</html>")),
    ],
)
def test_a_failed_write_leaves_the_previous_file_whole(
    tmp_path: Path, monkeypatch, name: str, write
) -> None:
    """Each file is written to a temporary file and renamed: when the rename of one file fails,
    that file still holds the previous report's content and no temporary file is left."""
    (tmp_path / name).write_text("previous report\n")
    t1 = pd.DataFrame({"model": ["m"], "acc_pct_mean": [50.0]})
    monkeypatch.setattr("lung_cls.utils.io.os.replace", _rename_fails_for(name))
    with pytest.raises(OSError, match=f"disk full: {name}"):
        write(tmp_path, t1)
    assert (tmp_path / name).read_text() == "previous report\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_report_json_is_strict_json(tmp_path: Path) -> None:
    render.write_json(tmp_path, {"new": float("nan"), "arr": np.arange(2), "x": np.float32(0.5)})
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text, parse_constant=pytest.fail) == {"new": None, "arr": [0, 1], "x": 0.5}


def test_a_figure_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "fig4_roc.png").write_bytes(b"old png")
    curves = {"m": [([0.0, 0.5, 1.0], [0.0, 1.0, 1.0], 0.75)]}
    monkeypatch.setattr("lung_cls.report.figures.os.replace", _boom)
    with pytest.raises(OSError, match="disk full"):
        figures.draw_roc(curves, {}, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "fig4_roc.png").read_bytes() == b"old png"
    assert [p.name for p in tmp_path.iterdir()] == ["fig4_roc.png"]  # no temporary folder left
    path = figures.draw_roc(curves, {}, tmp_path)
    assert path == tmp_path / "fig4_roc.png" and path.read_bytes()[:4] == b"\x89PNG"


GOOD = {
    "sweep_dir": "outputs/x",
    "out_dir": None,
    "n_boot": 2000,
    "n_perm": 1000.0,  # Hydra reads 1e3 as a float
    "seed": 0,
    "alpha": 0.05,
    "equal_var": True,
    "log_wandb": None,
    "cam_scale": "minmax",
    "cam_mask": "auto",
    "cam_mask_threshold": 0.1,
}


def test_settings_from_a_good_config() -> None:
    kwargs = from_config(GOOD)
    assert kwargs == {**GOOD, "n_perm": 1000}
    assert isinstance(kwargs["n_perm"], int)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("n_boot", "many", "n_boot='many': expected an integer >= 0"),
        ("n_boot", -1, "n_boot=-1: expected an integer >= 0"),
        ("n_perm", 2.5, "n_perm=2.5: expected an integer >= 0"),
        ("seed", True, "seed=True: expected an integer"),
        ("alpha", 0, "alpha=0: expected a number between 0 and 1"),
        ("alpha", "0.05", "alpha='0.05': expected a number between 0 and 1"),
        ("equal_var", "no", "equal_var='no': expected true or false"),  # bool("no") is True
        ("log_wandb", 1, "log_wandb=1: expected true or false or null"),
        ("sweep_dir", 5, "sweep_dir=5: expected a folder path (required: sweep_dir=DIR)"),
        ("sweep_dir", None, "sweep_dir=None: expected a folder path (required: sweep_dir=DIR)"),
        ("out_dir", "", "out_dir='': expected a folder path or null"),
        ("cam_scale", "log", "cam_scale='log': expected minmax or raw"),
        ("cam_mask", 3, "cam_mask=3: expected auto, none or the path of a .npy mask"),
        ("cam_mask_threshold", 1.5, "cam_mask_threshold=1.5: expected a number in [0, 1)"),
    ],
)
def test_settings_name_the_wrong_key(key: str, value, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_config({**GOOD, key: value})
    assert str(err.value) == message


def test_cam_mask_file_is_loaded_or_named_in_one_line(tmp_path: Path) -> None:
    from lung_cls.report.settings import load_cam_mask

    assert load_cam_mask("auto") == "auto" and load_cam_mask("none") == "none"
    good = tmp_path / "body.npy"
    np.save(good, np.eye(3))
    assert load_cam_mask(str(good)).dtype == bool
    with pytest.raises(ConfigError, match=r"cam_mask='.*missing\.npy': expected auto, none"):
        load_cam_mask(str(tmp_path / "missing.npy"))
    np.save(good, np.zeros((2, 3, 3)))
    with pytest.raises(ConfigError, match=r"2-D \(H, W\) mask, got shape \(2, 3, 3\)"):
        load_cam_mask(str(good))
