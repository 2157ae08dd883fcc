"""How the report's markdown and HTML show numbers: undefined values as "-", never "nan"."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def finite(x: Any) -> bool:
    """A real, finite number: None, strings, nan and inf are not."""
    return isinstance(x, int | float | np.integer | np.floating) and math.isfinite(float(x))


def fmt(x: Any, digits: int = 1) -> str:
    return f"{float(x):.{digits}f}" if finite(x) else "-"


def fmt_p(p: Any) -> str:
    """A p-value: three decimals, or scientific below 0.001 so small values stay readable."""
    if not finite(p):
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"
