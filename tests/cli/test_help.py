"""`--help` is one page per command: what it does, usage, common overrides, outputs, where to read
more; no raw config dump, no internal groups, and every override it names exists."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import lung_cls.utils.hydra  # noqa: F401 - registers the resolvers
from tests.conftest import ROOT

COMMANDS = ["train", "predict", "export", "preprocess", "phantom", "report", "node"]


def _help(command: str, overrides: tuple[str, ...] = ()) -> tuple[str, object]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        full = hydra_compose(
            config_name=command, overrides=list(overrides), return_hydra_config=True
        )
    return str(full.hydra.help.template), full


def _has(cfg, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return OmegaConf.is_dict(node) and leaf in list(node.keys())  # a ??? (required) counts


@pytest.mark.parametrize("command", COMMANDS)
def test_help_page_per_command(command):
    text, cfg = _help(command)
    assert text.startswith(f"python -m lung_cls.{command}:")
    for section in ("Usage", "Outputs", "More"):
        assert f"\n{section}\n" in text, section
    assert "$CONFIG" not in text and "$APP_CONFIG_GROUPS" not in text
    assert "_base" not in text and "_common" not in text
    assert max(len(line) for line in text.splitlines()) <= 100
    # Every KEY=VALUE under "Common overrides" is a key or a config group of this command.
    block = text.split("Common overrides\n", 1)[1].split("\n\n", 1)[0]
    choices = set(OmegaConf.select(cfg, "hydra.runtime.choices") or {})
    # Keys that exist with another data source (data=folder data.root=DIR) count too.
    cfgs = [cfg] + (
        [_help(command, (f"data={d}",))[1] for d in ("folder", "manifest")]
        if command == "train"
        else []
    )
    named = re.findall(r"(?:^|\s)([a-z_][\w./]*)=", block)
    assert named
    for key in named:
        exists = key in choices or any(_has(c, key) for c in cfgs)
        assert exists, f"{command} --help names {key}=, which the config does not have"


def test_predict_help_does_not_list_training_groups():
    text, _ = _help("predict")
    assert "trainer=" not in text and "model=" not in text


@pytest.mark.slow
def test_help_through_the_door():
    proc = subprocess.run(
        [sys.executable, "-m", "lung_cls.predict", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("python -m lung_cls.predict:")
    assert len(proc.stdout.splitlines()) < 40
