"""Training checkpoints for the QA tool: find them, load them, read their pre-processing block.

Predict (one checkpoint or an ensemble) and export (exactly one) both start from what a user types
as ``ckpt=``; they share this module so that a checkpoint is found, loaded and reported the same
way in both, and the pre-processing a deployment applies is always the training run's own block.
Torch is imported only when a checkpoint is loaded: resolving paths stays cheap.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lung_cls.errors import UserError
from lung_cls.runs import RunFile

#: Where a run dir keeps the checkpoint a deployment uses.
BEST_CKPT = str(RunFile.BEST_CKPT)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def resolve_checkpoints(spec: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    """``ckpt`` as given -> checkpoint files: a file, a run dir (``checkpoints/best.ckpt``), a
    sweep dir (every ``**/checkpoints/best.ckpt`` below it), a glob, or a list of these."""
    if spec is None or spec == "":
        raise UserError(
            "no checkpoint given: pass ckpt=PATH (a .ckpt file, a run dir or a sweep dir)"
        )
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise UserError("ckpt=[] lists no checkpoint")
    found: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if _is_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UserError(f"ckpt={text}: the pattern matches no file")
            for m in matches:
                found.extend(_checkpoints_at(Path(m)))
        else:
            found.extend(_checkpoints_at(Path(text)))
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in {q.resolve() for q in unique}:
            unique.append(p)
    return unique


def _checkpoints_at(path: Path) -> list[Path]:
    # Found by the checkpoint file, not by `runs.find_run_dirs`: a checkpoint copied out of its run
    # dir (no metrics.json beside it) is still a model to run.
    if path.is_file():
        return [path]
    if path.is_dir():
        own = path / BEST_CKPT
        if own.is_file():
            return [own]
        below = sorted(path.glob(f"**/{BEST_CKPT}"))
        if below:
            return below
        raise UserError(f"{path}: no checkpoint found (expected {BEST_CKPT} in it or below it)")
    raise UserError(f"{path}: checkpoint not found")


def resolve_one_checkpoint(spec: str | os.PathLike) -> Path:
    """``ckpt`` that must name exactly one checkpoint (export): a file or a run dir."""
    paths = resolve_checkpoints(str(spec))
    if len(paths) != 1:
        raise UserError(
            f"ckpt={spec}: export takes one checkpoint, found {len(paths)} "
            f"({', '.join(map(str, paths[:3]))}...); export each run dir on its own"
        )
    return paths[0]


def _load_error_line(err: BaseException) -> str:
    """A checkpoint loader's error as one short line: torch.load's own messages run to a page, so
    only their first line is kept, and one cut off inside a parenthesis gets a plain hint."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if first.count("(") != first.count(")"):
        first = first.split(" (", 1)[0] + " (torch.load failed: not a lung_cls .ckpt file?)"
    return first


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Checkpoint -> ``(net in eval mode, run meta)``; every load failure becomes one `UserError`
    line naming the file."""
    from lung_cls.models.classifier import load_lung_net

    try:
        return load_lung_net(str(path), map_location=device)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except ValueError as err:
        raise UserError(_load_error_line(err)) from None


def preprocessing_block(
    block: Mapping[str, Any] | None, where: str | os.PathLike
) -> dict[str, Any]:
    """A stored ``data.preprocess`` block -> the full pre-processing config (defaults filled in).

    Predict and export never take pre-processing settings from their own command line: a model
    only sees images prepared as in its training run, so the block must be in the model file.
    """
    from lung_cls.data.preprocess import prep_config

    if block is None:
        raise UserError(
            f"{where}: the checkpoint stores no pre-processing config (data.preprocess); "
            "it was not written by this version of lung_cls.train"
        )
    try:
        return prep_config(block)
    except ValueError as err:
        raise UserError(f"{where}: bad pre-processing config in the checkpoint ({err})") from None


def checkpoint_preprocessing(meta: Mapping[str, Any], where: str | os.PathLike) -> dict[str, Any]:
    """The pre-processing config of a loaded checkpoint (`load_checkpoint`'s meta)."""
    data = meta.get("data") or {}
    return preprocessing_block(data.get("preprocess") if isinstance(data, Mapping) else None, where)


def checkpoint_info(path: str | os.PathLike, meta: Mapping[str, Any]) -> dict[str, Any]:
    """What predictions.json tells about a checkpoint member."""
    return {
        "path": str(path),
        "backbone": meta.get("backbone"),
        "name": meta.get("name"),
        "seed": meta.get("seed"),
        "epoch": meta.get("epoch"),
        "pretrained": meta.get("pretrained"),
        "temperature": meta.get("temperature"),
    }
