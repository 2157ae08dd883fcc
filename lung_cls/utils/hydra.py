"""Hydra glue shared by the entry points: resolvers, sweep dir names, quoting of path overrides.

Light on purpose (OmegaConf, no torch, no ``lung_cls.data``): every door imports it before it
knows whether it will train anything. Errors and the task wrapper live in ``lung_cls.errors``.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from omegaconf import OmegaConf

# Re-exported for code written against the old place; new code imports it from lung_cls.errors.
from lung_cls.errors import UserError


@functools.cache
def cpu_bf16_supported() -> bool:
    """True where the CPU has native bf16 matrix units (AVX512-BF16 or AMX), so autocast pays off."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return False


def _cpu_precision() -> str:
    return "bf16-mixed" if cpu_bf16_supported() else "32-true"


# Overrides that say where or how a job runs, not what it computes: left out of sweep dir names.
_NAME_SKIP_KEYS = {
    "experiment",
    "debug",
    "logger",
    "trainer",
    "hydra/launcher",
    "skip_completed",
    "resume",
    "resumable",  # a checkpoint policy: adding it to re-run a sweep must find the same dirs
    "ckpt_path",
    "overwrite",
    "cams",
    "n_boot",
}
_NAME_SKIP_PREFIXES = ("paths.", "hydra.", "hydra/", "logger.", "callbacks.")


def sweep_subdir(task_overrides: Any) -> str:
    """Run dir name of a sweep job: its overrides ``key=value`` joined by ``,``, sorted by key.

    Like Hydra's ``override_dirname`` but leaves out overrides that only say where or how the job
    runs (paths, launcher, logger, resume flags), so the paper sweep's dirs are exactly
    ``model=resnet18,seed=0`` whatever else is on the command line, and a value can never create
    sub-folders (``/`` becomes ``_``).
    """
    items = []
    for override in task_overrides or []:
        key, sep, value = str(override).partition("=")
        key = key.lstrip("+~")
        if not sep or key in _NAME_SKIP_KEYS or key.startswith(_NAME_SKIP_PREFIXES):
            continue
        items.append((key, value.replace("/", "_").replace(os.sep, "_")))
    return ",".join(f"{k}={v}" for k, v in sorted(items)) or "default"


_OVERRIDE_KEY = re.compile(r"^(\+\+|\+|~)?[A-Za-z_][\w.@/-]*$")
_SWEEP_FUNCTION = re.compile(r"^[A-Za-z_]\w*\(")


def quote_path_overrides(args: list[str]) -> list[str]:
    """Quote override values that hold an ``=``, so run-dir paths can be typed as they are.

    A sweep's run dirs are named by their overrides (``model=resnet18,seed=0``), so a checkpoint path
    such as ``ckpt=outputs/demo/<time>/model=resnet18,seed=0/checkpoints/best.ckpt`` holds ``=`` and
    ``,``, which Hydra's override grammar cannot read unquoted ("mismatched input '='"). An
    unquoted ``=`` inside a value is never valid Hydra syntax except in a sweep function's keyword
    arguments (``interval(start=0, end=1)``), so quoting such a value only turns a parse error
    into the literal string. Values already quoted, lists, dicts and sweep functions are left as
    they are; so is every argument that is not ``key=value`` (flags such as ``-m``).
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if (
            sep
            and "=" in value
            and _OVERRIDE_KEY.match(key)
            and value[:1] not in ("'", '"', "[", "{")
            and not _SWEEP_FUNCTION.match(value)
        ):
            if "'" not in value:
                arg = f"{key}='{value}'"
            elif '"' not in value:
                arg = f'{key}="{value}"'
        out.append(arg)
    return out


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("lung_cls.cpu_precision"):
        OmegaConf.register_new_resolver("lung_cls.cpu_precision", _cpu_precision)
    if not OmegaConf.has_resolver("lung_cls.not"):
        OmegaConf.register_new_resolver("lung_cls.not", lambda value: not value)
    if not OmegaConf.has_resolver("lung_cls.sweep_subdir"):
        OmegaConf.register_new_resolver("lung_cls.sweep_subdir", sweep_subdir)


register_resolvers()


__all__ = [
    "UserError",
    "cpu_bf16_supported",
    "quote_path_overrides",
    "register_resolvers",
    "sweep_subdir",
]
