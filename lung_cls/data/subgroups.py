"""Subgroups: one category per image, for the report's per-subgroup table and the stratified split.

A subgroup is a category of an image (neck activity, camera, site, ...). Where it comes from:

* **manifest**: an extra CSV column, named by ``data.subgroup`` (e.g. ``neck``). Every listed
  image needs a value; yes/no-like columns (every value one of 0/1, true/false, yes/no, y/n, t/f,
  any case) are read as ``yes``/``no``, any other column keeps its values as written (stripped) -
  each distinct value is a category.
* **phantom**: ``data.subgroup=neck`` is the truth - ``yes`` where the image's trachea mask is not
  empty after pre-processing (the very masks ``cams.npz`` stores), else ``no`` - so the phantom and a
  manifest with a ``neck`` column give the same thing.
* **folder**: no per-image columns; asking for a subgroup is an error.

``data.split.stratify`` names the column to stratify the split by; it must be the subgroup column
(setting only ``stratify`` reads that column as the subgroup too).

Standard library and NumPy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lung_cls.errors import ConfigError

YES, NO = "yes", "no"
#: The one subgroup the phantom knows (from its truth masks).
PHANTOM_COLUMN = "neck"
PHANTOM_MASK = "trachea"

_TRUE = frozenset({"1", "true", "yes", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "n", "f"})
#: Cell texts that mean "not recorded": an error, like an empty cell (a category of its own, such
#: as ``unknown``, is accepted).
MISSING = frozenset({"", "na", "n/a", "nan", "null", "?"})


def _get(cfg: Mapping[str, Any] | None, key: str) -> Any:
    if cfg is None:
        return None
    try:
        return cfg[key]
    except Exception:  # KeyError, AttributeError, an OmegaConf missing value
        return None


def _column_name(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, "expected a manifest column name or null")
    return value.strip()


def subgroup_column(data_cfg: Mapping[str, Any] | None) -> str | None:
    """The subgroup column the data config asks for (``data.subgroup``, else
    ``data.split.stratify``), or None.

    Raises `ConfigError` when both are set and differ: only one subgroup column is read.
    """
    sub = _column_name("data.subgroup", _get(data_cfg, "subgroup"))
    strat = stratify_column(data_cfg)
    if sub is not None and strat is not None and sub.lower() != strat.lower():
        raise ConfigError(
            "data.split.stratify",
            strat,
            f"the subgroup column is data.subgroup={sub!r}; stratify by that one "
            f"(or set data.subgroup={strat})",
        )
    return sub if sub is not None else strat


def stratify_column(data_cfg: Mapping[str, Any] | None) -> str | None:
    """``data.split.stratify`` (None when unset)."""
    return _column_name("data.split.stratify", _get(_get(data_cfg, "split"), "stratify"))


def is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING


def normalise(values: Sequence[str]) -> list[str]:
    """Cell texts -> categories: a yes/no-like column (every value one of 0/1, true/false,
    yes/no, y/n, t/f) becomes ``yes``/``no``; any other keeps its values, stripped."""
    stripped = [str(v).strip() for v in values]
    lower = [v.lower() for v in stripped]
    if lower and all(v in _TRUE or v in _FALSE for v in lower):
        return [YES if v in _TRUE else NO for v in lower]
    return stripped


def is_binary(values: Iterable[str]) -> bool:
    """Whether the categories are (a subset of) yes/no."""
    return set(values) <= {YES, NO}


def display_order(values: Iterable[str]) -> list[str]:
    """Categories in table order: yes before no, else sorted."""
    vals = set(values)
    if vals and is_binary(vals):
        return [v for v in (YES, NO) if v in vals]
    return sorted(vals)


def describe(column: str, value: str) -> str:
    """A subgroup's row label: ``with neck activity`` / ``without neck activity`` for the neck
    column (as the phantom's report always said), ``<column>: yes`` for other yes/no columns,
    ``<column> = <value>`` otherwise."""
    if column.lower() == PHANTOM_COLUMN and value in (YES, NO):
        return f"{'with' if value == YES else 'without'} neck activity"
    if value in (YES, NO):
        return f"{column}: {value}"
    return f"{column} = {value}"


def from_masks(masks: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The phantom's neck subgroup: ``yes`` where the trachea mask is not empty."""
    if not masks or PHANTOM_MASK not in masks:
        raise ConfigError(
            "data.subgroup", PHANTOM_COLUMN, "the phantom's neck truth needs its trachea masks"
        )
    trachea = np.asarray(masks[PHANTOM_MASK], dtype=bool)
    return np.where(trachea.reshape(len(trachea), -1).any(axis=1), YES, NO).astype(str)


def check_source(data_cfg: Mapping[str, Any], source: str) -> str | None:
    """The subgroup column for this source, or a `ConfigError` where the source cannot give it."""
    column = subgroup_column(data_cfg)
    if column is None:
        return None
    key = "data.subgroup" if _get(data_cfg, "subgroup") is not None else "data.split.stratify"
    if source == "phantom" and column.lower() != PHANTOM_COLUMN:
        raise ConfigError(
            key, column, f"the phantom's only subgroup is {PHANTOM_COLUMN!r} (its trachea truth)"
        )
    if source == "folder":
        raise ConfigError(
            key,
            column,
            "the folder source has no per-image columns; list the images in a CSV manifest "
            f"with a {column!r} column (data=manifest data.manifest=FILE)",
        )
    return column


def counts_by_split(
    labels: np.ndarray, splits: np.ndarray, values: np.ndarray
) -> dict[str, dict[str, dict[str, int]]]:
    """``{split: {class: {value: images}}}`` for ``metrics.json`` ``data.subgroup.by_split``."""
    from lung_cls.labels import class_name

    out: dict[str, dict[str, dict[str, int]]] = {}
    order = display_order(values.tolist())
    for s in ("train", "val", "test", "unused"):
        in_split = splits == s
        out[s] = {
            class_name(c): {v: int((in_split & (labels == c) & (values == v)).sum()) for v in order}
            for c in sorted(int(c) for c in np.unique(labels))
        }
    return out


__all__ = [
    "MISSING",
    "NO",
    "PHANTOM_COLUMN",
    "YES",
    "check_source",
    "counts_by_split",
    "describe",
    "display_order",
    "from_masks",
    "is_binary",
    "is_missing",
    "normalise",
    "stratify_column",
    "subgroup_column",
]
