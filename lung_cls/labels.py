"""The two classes and their integer labels, defined once for the whole package.

Standard library only: the doors, the run-dir readers and the QA tool name classes without
loading NumPy or torch. Perfusion is the positive class, as in the paper; a label is an index into
:data:`CLASS_NAMES`, so ``CLASS_NAMES[label]`` is its name everywhere (CSV files, ``metrics.json``,
figures, the phantom's folders).
"""

from __future__ import annotations

VENTILATION: int = 0
PERFUSION: int = 1

CLASS_NAMES: tuple[str, str] = ("ventilation", "perfusion")
"""``CLASS_NAMES[label]`` is the class name: 0 ventilation, 1 perfusion (the positive class)."""

POSITIVE_CLASS: str = CLASS_NAMES[PERFUSION]


def class_name(label: int) -> str:
    """The name of ``label``; a label outside the two classes reads ``class <n>``, so a message
    about bad data can still name it."""
    label = int(label)
    return CLASS_NAMES[label] if 0 <= label < len(CLASS_NAMES) else f"class {label}"


__all__ = ["CLASS_NAMES", "PERFUSION", "POSITIVE_CLASS", "VENTILATION", "class_name"]
