"""The report says what was run (setup box, Table 1 labelled as a comparison of set-ups), shows
the neck measure with its chance level and a coarse-CAM warning, and a sweep in which nothing
finished gets a short failure report with identical errors grouped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from lung_cls.report import build_report
from tests.report.test_report_build import _write_run


def _decorate(run: Path, grid: tuple[int, int], cam_layer: str | None) -> None:
    """What a real run adds: config_resolved.yaml, timing.json, metrics facts, cam_grid."""
    cfg = {
        "data": {
            "source": "phantom",
            "n_perfusion": 394,
            "n_ventilation": 136,
            "sim": {"difficulty": 0.5},
        },
        "model": {"cam_layer": cam_layer},
        "trainer": {"accelerator": "cpu", "precision": "bf16-mixed"},
    }
    (run / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    (run / "timing.json").write_text(
        json.dumps(
            {"run_seconds": 90.0, "device": "cpu: x86_64", "threads": 1, "git_commit": "abc123"}
        )
    )
    m = json.loads((run / "metrics.json").read_text())
    m.update(image_size=64, max_epochs=6, pretrained=False, weights="scratch")
    m["data"] = {"test": {"images": 12, "perfusion": 6, "ventilation": 6, "patients": 12}}
    (run / "metrics.json").write_text(json.dumps(m))
    with np.load(run / "cams.npz") as z:
        arrays = dict(z)
    arrays["cam_grid"] = np.array(grid)
    np.savez(run / "cams.npz", **arrays)


def test_setup_box_caption_neck_table_and_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        _decorate(_write_run(tmp_path, "resnet18", seed, rng), (8, 8), "layer2")
    out = build_report(tmp_path, n_boot=20, n_perm=5, log_wandb=False)
    report = json.loads((out / "report.json").read_text())
    setup = report["setup"]
    assert "phantom" in setup["data"] and setup["input size"] == "64 px"
    assert setup["weights"] == "from scratch" and setup["seeds"] == "0, 1"
    assert setup["git commit"] == "abc123" and "3.0 min" in setup["time taken"]
    html = (out / "report.html").read_text()
    # the box comes before every result, and Table 1 says the set-ups differ
    assert html.index("What was run") < html.index("Table 1")
    assert "a comparison of set-ups that differ" in html
    assert "not a reproduction" in html
    # the paper's figure order: Fig. 2 and 3 before Fig. 4
    assert html.index("Fig. 2") < html.index("Fig. 3") < html.index("Fig. 4")
    # the fake CAMs put 0.8 on the trachea for every ventilation image: the neck bar is met
    neck = report["cam_neck"]["resnet18"]
    assert neck["n"] == 12 and neck["hit_rate"] == 1.0 and neck["passes"] is True
    assert neck["energy_ratio"] > 2 and neck["chance_share"] < 0.2
    assert (out / "cam_neck.md").is_file()
    assert setup["CAM layer"] == "layer2" and "coarser" not in html


def test_coarse_cams_are_flagged(tmp_path: Path) -> None:
    _decorate(_write_run(tmp_path, "resnet18", 0, np.random.default_rng(1)), (2, 2), None)
    out = build_report(tmp_path, n_boot=20, n_perm=5, log_wandb=False)
    report = json.loads((out / "report.json").read_text())
    assert any("2 x 2" in n and "coarser" in n for n in report["notes"])
    assert "coarser than the paper" in (out / "report.html").read_text()
    # half a 2 x 2 cell at 32 px: the masks grow by 8 px, and chance grows with them
    assert report["cam_neck"]["resnet18"]["tolerance_px"] == 8.0


def test_no_finished_run_groups_identical_errors(tmp_path: Path) -> None:
    for seed in range(5):
        run = tmp_path / f"model=vgg16,seed={seed}"
        run.mkdir()
        (run / "metrics.json").write_text(
            json.dumps(
                {
                    "status": "failed",
                    "error": f"WeightsNotFoundError: /home/u/w{seed}.pth: no file (attempt {seed})",
                    "model": "vgg16",
                    "seed": seed,
                }
            )
        )
    other = tmp_path / "model=resnet18,seed=0"
    other.mkdir()
    (other / "metrics.json").write_text(
        json.dumps(
            {"status": "failed", "error": "CUDA out of memory", "model": "resnet18", "seed": 0}
        )
    )
    out = build_report(tmp_path, log_wandb=False)
    groups = json.loads((out / "report.json").read_text())["error_groups"]
    assert [len(g["runs"]) for g in groups] == [5, 1]
    html = (out / "report.html").read_text()
    assert html.count("WeightsNotFoundError") == 1 and "2 distinct error(s)" in html
    assert not (out / "table1.csv").exists()
