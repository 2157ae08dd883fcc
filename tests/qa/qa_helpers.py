"""Helpers shared by the QA tests: scratch checkpoints, planted DICOM study folders, the CLI.

(A plain module, not a conftest: the test folders share no package, and a second ``conftest``
module would shadow the top-level one that tests import ``compose`` from.)
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from conftest import ROOT, compose

SIM_EASY = {"difficulty": 0.0}

# Planted study list: (class of the image, series description, protocol, radiopharmaceutical,
# planted mismatch?). Perfusion images labelled as ventilation and vice versa are the mislabels.
PLAN = [
    (1, "LUNG VENT ANT", "LUNG VENTILATION", "Technegas", True),
    (1, "LUNG VENT ANT", None, "Tc-99m DTPA", True),
    (1, "LUNG PERFUSION ANT", "LUNG PERFUSION", "Tc-99m MAA", False),
    (1, "Q ANT", None, None, False),
    (1, "LUNG ANT", None, None, False),  # declared unknown
    (0, "LUNG PERFUSION ANT", "LUNG PERFUSION", "Tc-99m MAA", True),
    (0, "LUNG PERF ANT", None, None, True),
    (0, "LUNG VENT ANT", None, "Kr-81m", False),
    (0, "LUNG VENT + MAA ANT", None, None, False),  # declared ambiguous
    (0, "XENON ANT", None, "Xe-133", False),
]
CORRUPT = ("truncated.dcm", "random.dcm")


def save_scratch_checkpoint(
    path: Path, *, size: int = 32, seed: int = 0, reference: bool = True, prep: dict | None = None
) -> Path:
    """A checkpoint in the training format (weights, hparams, run meta via the module's own
    `on_save_checkpoint`), with untrained resnet18 weights."""
    from lung_cls.models.classifier import LungClassifier

    torch.manual_seed(seed)
    model = LungClassifier(
        backbone="resnet18", pretrained=False, optimizer=None, scheduler=None, channels_last=False
    )
    model.run_meta = {
        "data": {"preprocess": prep if prep is not None else {"size": size}},
        "model": {"backbone": "resnet18"},
        "seed": seed,
    }
    if reference:
        yy, xx = np.mgrid[:size, :size]
        blob = 200 * np.exp(
            -(((yy - size / 2) / (size / 4)) ** 2 + ((xx - size / 2) / (size / 5)) ** 2)
        )
        model.reference_image = torch.from_numpy(blob.astype(np.float32))
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0}
    model.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def write_study(path: Path, image: np.ndarray, pid: str, desc: str, **kw) -> Path:
    from lung_cls.data.dicomio import write_nm_dicom

    return write_nm_dicom(
        path, image.astype(np.uint16), patient_id=pid, series_description=desc, **kw
    )


def write_plan(root: Path, images: Mapping[int, Sequence[np.ndarray]]) -> dict[str, dict]:
    """Write the PLAN's studies under ``root/day1`` from ``images[label]`` (used in turn, reused
    when a class has fewer images than the plan needs), plus a truncated DICOM, a random-bytes
    .dcm and a text file. Returns {file name: {"label", "planted", "image"}}."""
    used = {0: 0, 1: 0}
    truth: dict[str, dict] = {}
    for i, (label, desc, protocol, pharm, planted) in enumerate(PLAN):
        k = used[label] % len(images[label])
        used[label] += 1
        name = f"study{i:02d}.dcm"
        write_study(
            root / "day1" / name, images[label][k], f"P{i:02d}", desc,
            protocol_name=protocol, radiopharmaceutical=pharm,
        )  # fmt: skip
        truth[name] = {"label": label, "planted": planted, "image": k}
    good = (root / "day1" / "study00.dcm").read_bytes()
    (root / "day1" / CORRUPT[0]).write_bytes(good[: len(good) // 2])
    (root / "day1" / CORRUPT[1]).write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "day1" / "notes.txt").write_text("not an image")
    return truth


def make_study_dir(root: Path, sim: dict, seed: int = 777) -> dict[str, dict]:
    """PLAN's studies from fresh phantom images (one per study), and the broken files."""
    from lung_cls.data.phantom import simulate_cohort

    n_perf = sum(1 for p in PLAN if p[0] == 1)
    cases = simulate_cohort(sim, n_perf, len(PLAN) - n_perf, seed)
    images = {lab: [c.image for c in cases if c.label == lab] for lab in (0, 1)}
    return write_plan(root, images)


def read_rows(output: Path) -> list[dict[str, str]]:
    with open(output / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def predict_cfg(*overrides: str):
    return compose(list(overrides), config_name="predict")


def run_cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
