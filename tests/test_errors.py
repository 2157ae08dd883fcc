"""The error policy (lung_cls/errors.py): which errors are the user's, and the one task wrapper.

Every command goes through ``task_wrapper``: an expected error is one ``error: ...`` line on stderr
and exit 2 (1 for a failed parity check), the traceback only with ``HYDRA_FULL_ERROR=1``, W&B
closed whatever happens. These tests call the wrapper directly; the doors' own tests run the
commands in subprocesses.
"""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import types

import pytest
from conftest import ROOT

from lung_cls import errors
from lung_cls.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_PROBLEMS,
    ConfigError,
    DataError,
    DataSetupError,
    ParityError,
    UserError,
    WeightsNotFoundError,
    close_loggers,
    expected_cause,
    one_line,
    task_wrapper,
)


@pytest.fixture(autouse=True)
def _no_full_error(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


class FakeWandb(types.ModuleType):
    """Stands in for an imported ``wandb`` with an open run; records ``finish`` calls."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__("wandb")
        self.run = object()
        self.finished = 0
        self.fail = fail

    def finish(self) -> None:
        self.finished += 1
        self.run = None
        if self.fail:
            raise RuntimeError("wandb could not sync")


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


# --------------------------------------------------------------------------- the error types
def test_errors_are_defined_once_and_reexported_where_they_used_to_live():
    import lung_cls.data
    import lung_cls.data.datamodule
    import lung_cls.data.sources
    import lung_cls.models
    import lung_cls.models.backbone
    import lung_cls.utils.hydra

    assert lung_cls.data.sources.DataError is DataError
    assert lung_cls.data.DataError is DataError
    assert lung_cls.data.datamodule.DataSetupError is DataSetupError
    assert lung_cls.models.backbone.WeightsNotFoundError is WeightsNotFoundError
    assert lung_cls.models.WeightsNotFoundError is WeightsNotFoundError
    assert lung_cls.utils.hydra.UserError is UserError


def test_hierarchy_keeps_the_builtin_types_callers_catch():
    # Code that caught ValueError / FileNotFoundError before the move still catches these.
    assert issubclass(DataSetupError, ValueError) and issubclass(DataSetupError, UserError)
    assert issubclass(WeightsNotFoundError, FileNotFoundError)
    assert issubclass(WeightsNotFoundError, UserError)
    assert issubclass(ConfigError, UserError) and issubclass(DataError, errors.LungClsError)
    codes = {cls: errors.exit_code_of(cls("x")) for cls in (UserError, DataSetupError)}
    assert set(codes.values()) == {EXIT_BAD_INPUT}
    assert errors.exit_code_of(ParityError("off by 1e-3")) == EXIT_PROBLEMS
    assert errors.exit_code_of(FileNotFoundError("x")) == EXIT_BAD_INPUT


def test_data_error_names_the_file_and_survives_pickling():
    err = DataError("/data/a.dcm", "not a DICOM file")
    assert str(err) == "/data/a.dcm: not a DICOM file"
    back = pickle.loads(pickle.dumps(err))  # DDP workers and joblib send errors between processes
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


def test_config_error_names_key_value_and_expectation():
    err = ConfigError("seed", "abc", "expected an integer")
    assert str(err) == "seed='abc': expected an integer"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_one_line_folds_newlines_and_never_is_empty():
    assert one_line(ValueError("first\n  second\tthird")) == "first second third"
    assert one_line(RuntimeError()) == "RuntimeError"


# --------------------------------------------------------------------------- expected_cause
def test_expected_cause_unwraps_hydra_instantiate_only_for_expected_errors():
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    with pytest.raises(InstantiationException) as missing:
        instantiate({"_target_": "builtins.open", "file": "/nonexistent/lung_cls/weights.pth"})
    cause = expected_cause(missing.value)
    assert isinstance(cause, FileNotFoundError) and "weights.pth" in str(cause)

    with pytest.raises(InstantiationException) as broken:
        instantiate({"_target_": "builtins.int", "x": "not a number"})
    assert expected_cause(broken.value) is None  # a bug, not the user's input

    own = UserError("bad input")
    assert expected_cause(own) is own
    assert expected_cause(RuntimeError("bug")) is None
    assert expected_cause(None) is None


def test_missing_config_value_is_expected():
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    cfg = OmegaConf.create({"out": "???"})
    with pytest.raises(MissingMandatoryValue) as info:
        _ = cfg.out
    assert expected_cause(info.value) is info.value


# --------------------------------------------------------------------------- task_wrapper
def _job(exc: BaseException | None = None, value=None):
    @task_wrapper
    def job():
        if exc is not None:
            raise exc
        return value

    return job


def test_expected_error_is_one_line_and_exit_2(capsys, fake_wandb):
    with pytest.raises(SystemExit) as info:
        _job(DataError("/in/x.png", "not a readable PNG image"))()
    assert info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == "error: /in/x.png: not a readable PNG image\n"
    assert fake_wandb.finished == 1  # closed on the error path too


def test_expected_error_inside_instantiate_shows_itself(capsys):
    from hydra.utils import instantiate

    missing = "/nonexistent/lung_cls/weights.pth"

    @task_wrapper
    def job():
        instantiate({"_target_": "builtins.open", "file": missing})

    with pytest.raises(SystemExit) as info:
        job()
    assert info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and missing in err
    assert "Error in call to target" not in err and len(err.strip().splitlines()) == 1


def test_parity_error_exits_1(capsys):
    with pytest.raises(SystemExit) as info:
        _job(ParityError("ONNX Runtime differs by 3e-3"))()
    assert info.value.code == EXIT_PROBLEMS
    assert "3e-3" in capsys.readouterr().err


def test_unexpected_error_keeps_its_traceback(fake_wandb):
    with pytest.raises(ZeroDivisionError):
        _job(ZeroDivisionError("a bug"))()
    assert fake_wandb.finished == 1


def test_full_error_reraises_expected_errors(monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserError, match="bad input"):
        _job(UserError("bad input"))()
    assert capsys.readouterr().err == ""


def test_ctrl_c_exits_130(capsys, fake_wandb):
    with pytest.raises(SystemExit) as info:
        _job(KeyboardInterrupt())()
    assert info.value.code == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert fake_wandb.finished == 1


@pytest.mark.parametrize(("value", "exits"), [(None, None), (0, None), (1, 1), (3, 3), (0.5, None)])
def test_returned_int_is_the_exit_code(value, exits, fake_wandb):
    job = _job(value=value)
    if exits is None:
        assert job() == value
    else:
        with pytest.raises(SystemExit) as info:
            job()
        assert info.value.code == exits
    assert fake_wandb.finished == 1


def test_error_record_goes_to_the_run_log_not_twice_to_the_console(tmp_path, capsys):
    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with pytest.raises(SystemExit):
            _job(UserError("out=DIR is required"))()
    finally:
        root.removeHandler(handler)
        handler.close()
    assert "out=DIR is required" in log_file.read_text()
    assert capsys.readouterr().err.count("out=DIR is required") == 1


def test_close_loggers_never_raises_and_never_imports_wandb(monkeypatch):
    failing = FakeWandb(fail=True)
    monkeypatch.setitem(sys.modules, "wandb", failing)
    close_loggers()  # the error of finish() is swallowed: it must not mask the real outcome
    assert failing.finished == 1
    monkeypatch.delitem(sys.modules, "wandb")
    close_loggers()
    assert "wandb" not in sys.modules


def test_errors_module_is_standard_library_only():
    """Every door imports it first: a plain "folder not empty" must not wait for torch."""
    code = (
        "import sys, lung_cls.errors; "
        "print(sorted(m for m in ('numpy', 'torch', 'omegaconf', 'hydra', 'lightning') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
