"""Expected errors and the one task wrapper every command goes through.

Standard library only, on purpose: every door (``python -m lung_cls.X``) imports this first, and a
plain "folder not empty" or "no such file" must not wait for torch to load before it is shown.

Two kinds of failure:

- **expected**: the input or the configuration is wrong and the user can fix it (a corrupt file, a
  missing checkpoint, a typed mistake). One line on stderr, ``error: <what> : <why>``, exit code 2,
  no traceback.
- **unexpected**: the program is broken. The traceback is shown, exit code 1.

``HYDRA_FULL_ERROR=1`` shows the traceback of expected errors too, for developers.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("lung_cls")
F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes of every command.
EXIT_OK = 0
# Ran to the end but found problems (a failed sweep job, a mismatch with fail_on_mismatch).
EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2  # an expected error: bad input or configuration
EXIT_INTERRUPTED = 130  # Ctrl-C


class LungClsError(Exception):
    """Base of the errors that mean "your input or configuration is wrong"."""

    exit_code: int = EXIT_BAD_INPUT


class UserError(LungClsError):
    """Bad input or configuration that the user can fix; shown as one line, never a traceback."""


class DataError(LungClsError):
    """A file that cannot be used, with the reason. ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(self.path, self.reason)  # keeps the error picklable (DDP, joblib)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DataSetupError(UserError, ValueError):
    """The data cannot be split or used as configured; the message says why."""


class ConfigError(UserError):
    """A configuration value of the wrong type or out of range: names the key, the value and what
    is expected, e.g. ``seed=abc: expected an integer``."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key, self.value, self.expected = str(key), value, str(expected)
        super().__init__(self.key, self.value, self.expected)

    def __str__(self) -> str:
        return f"{self.key}={self.value!r}: {self.expected}"


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights were asked for but no copy could be found (nor downloaded)."""


class ParityError(LungClsError):
    """An exported model does not reproduce the PyTorch outputs within tolerance."""

    exit_code = EXIT_PROBLEMS


def _omegaconf_expected() -> tuple[type[BaseException], ...]:
    """OmegaConf's "you left a ``???`` value" error, without importing OmegaConf here."""
    module = sys.modules.get("omegaconf.errors")
    return (module.MissingMandatoryValue,) if module is not None else ()


def expected_cause(err: BaseException | None) -> BaseException | None:
    """The expected error behind ``err``: itself, or the cause that a wrapper hid.

    Hydra's ``instantiate`` wraps whatever a ``_target_`` raised in ``InstantiationException``
    ("Error in call to target ..."); the user must see the error inside it. Returns None when the
    chain holds no expected error, i.e. the program is broken.
    """
    expected = (LungClsError, FileNotFoundError, *_omegaconf_expected())
    for _ in range(8):
        if err is None:
            return None
        if isinstance(err, expected):
            return err
        if type(err).__name__ != "InstantiationException":
            return None
        err = err.__cause__
    return None


def exit_code_of(err: BaseException) -> int:
    return int(getattr(err, "exit_code", EXIT_BAD_INPUT))


def one_line(err: BaseException) -> str:
    """An error as one line (for CSV cells and console rows): its message, newlines folded."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _log_to_files(level: int, message: str) -> None:
    """Write one record to the log files only (the run's ``<task>.log``), not to the console."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def close_loggers() -> None:
    """Close what a run may have opened (W&B), whatever the outcome; never raises.

    Only modules already imported are touched: closing must not load W&B for a command that
    never used it.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        try:
            if getattr(wandb, "run", None) is not None:
                wandb.finish()
        except Exception:  # noqa: BLE001 - closing the logger must never mask the real outcome
            log.debug("wandb.finish failed", exc_info=True)


def task_wrapper(fn: F) -> F:
    """Run a command: expected errors as one line and their exit code, loggers always closed.

    A returned int is the command's exit code (0 = nothing to report); anything else means 0.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            code = fn(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as err:
            cause = expected_cause(err)
            if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            # The first line names the file or key and the reason; a hint may follow on the next.
            message = str(cause).strip() or type(cause).__name__
            _log_to_files(logging.ERROR, message)  # the run's log keeps it; the console...
            print(f"error: {message}", file=sys.stderr)  # ...shows it once
            sys.exit(exit_code_of(cause))
        finally:
            close_loggers()
        if isinstance(code, int) and not isinstance(code, bool) and code != EXIT_OK:
            sys.exit(code)
        return code

    return wrapper  # type: ignore[return-value]


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "ConfigError",
    "DataError",
    "DataSetupError",
    "LungClsError",
    "ParityError",
    "UserError",
    "WeightsNotFoundError",
    "close_loggers",
    "exit_code_of",
    "expected_cause",
    "one_line",
    "task_wrapper",
]
