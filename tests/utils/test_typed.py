"""Typed mistakes end in one line naming the key, the value and what fits (lung_cls.utils.typed)."""

from __future__ import annotations

import pytest

from lung_cls.errors import EXIT_BAD_INPUT, ConfigError, UserError, task_wrapper
from lung_cls.utils.typed import SCHEMA, check_values, compose_or_explain, preflight, sweep_jobs
from tests.conftest import compose


def _fails(argv: list[str], capsys, **kwargs) -> str:
    """Run the preflight as the door does; return the one stderr line it printed."""
    with pytest.raises(SystemExit) as exc:
        task_wrapper(preflight)(argv, "train", **kwargs)
    assert exc.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "override, line",
    [
        ("seed=abc", "error: seed='abc': expected an integer"),
        ("model.pretrained=flase", "error: model.pretrained='flase': expected true or false"),
        ("trainer.max_epochs=0", "error: trainer.max_epochs=0: expected an integer >= 1"),
        ("data.sim.difficulty=2", "error: data.sim.difficulty=2: expected a number in [0, 1]"),
        ("data.on_error=ignore", "error: data.on_error='ignore': expected raise or skip"),
        (
            "trainer.max_epoch=3",
            "error: trainer.max_epoch=3: no such key; did you mean trainer.max_epochs=3?",
        ),
        ("modle=vgg16", "error: modle=vgg16: no such key; did you mean model=vgg16?"),
    ],
)
def test_typed_mistake_is_one_line(override, line, capsys):
    err = _fails(
        [override, "model.pretrained=false"][: 1 if "pretrained" in override else 2], capsys
    )
    assert err.strip() == line


def test_unknown_config_option_lists_the_real_ones(capsys):
    err = _fails(["model=vgg17"], capsys)
    assert err.startswith("error: model=vgg17: no such model config; did you mean model=vgg16?")
    assert "resnet18" in err and "_base" not in err
    assert len(err.strip().splitlines()) == 1


def test_data_error_comes_before_the_weights_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _fails(["data=folder"], capsys)  # pretrained=true by default, no weights here
    assert err.strip() == "error: data.root: no data folder given: set data.root=DIR"
    err = _fails(["data=folder", f"data.root={tmp_path / 'nope'}"], capsys)
    assert "data folder does not exist" in err
    err = _fails(["data=manifest"], capsys)
    assert "data.manifest: no manifest given" in err


def test_sweep_values_are_checked_per_job(capsys):
    err = _fails(["-m", "model.pretrained=false", "seed=0,abc"], capsys)
    assert err.strip() == "error: seed='abc': expected an integer"


def test_paper_sweep_without_weights_stops_once_naming_all_four(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    argv = ["-m", "model=vgg16,resnet18,inception_resnet_v2,seresnext101", "seed=0,1,2,3,4"]
    err = _fails(argv, capsys)
    assert err.count("error:") == 1
    first = err.splitlines()[0]
    assert "4 models" in first
    for name in ("vgg16", "resnet18", "inception_resnet_v2", "seresnext101"):
        assert f"{name} (timm/" in first
    assert "model.weights=" not in err and "hf download" in err


def test_good_command_lines_pass():
    preflight(["model.pretrained=false", "seed=3", "trainer.max_epochs=2"], "train")
    preflight(["-m", "experiment=demo"], "train")  # scratch weights: nothing to look up
    preflight(["--help", "seed=abc"], "train")  # help and --cfg never run a job
    preflight(["--cfg", "job", "seed=abc"], "train")


def test_sweep_jobs_are_hydras():
    cfg = compose_or_explain("train", ["experiment=demo"])
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(["experiment=demo", "seed=0,1,2"])
    jobs = sweep_jobs(cfg, parsed)
    # The demo's params (2 models x 2 seeds) with the command line's seeds replacing its own.
    assert len(jobs) == 6
    assert sorted({j for job in jobs for j in job if j.startswith("seed=")}) == [
        "seed=0",
        "seed=1",
        "seed=2",
    ]


def test_every_schema_key_exists_and_the_defaults_fit():
    cfg = compose(["data=phantom"])
    check_values(cfg)  # the shipped defaults are valid
    for key in SCHEMA:
        root = key.split(".")[0]
        assert root in cfg, key


def test_config_error_names_key_value_and_expectation():
    cfg = compose(["seed=abc"])
    with pytest.raises(ConfigError) as err:
        check_values(cfg)
    assert (err.value.key, err.value.value) == ("seed", "abc")
    assert isinstance(err.value, UserError)
