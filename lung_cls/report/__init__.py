"""The sweep report: Table 1 next to the paper, ROC, CAM figures and tests, one ``report.html``.

``python -m lung_cls.report sweep_dir=DIR`` is the door (:mod:`lung_cls.report.__main__`);
:func:`build_report` is the library call behind it, also run by the sweep's Hydra callback.
The rooms, in the order the data passes through them:

- :mod:`~lung_cls.report.discover` - the run dirs of a sweep, read through :mod:`lung_cls.runs`
  (:class:`RunRecord`), and the jobs that never ran;
- :mod:`~lung_cls.report.tables` - Table 1, ROC curves, model comparison, CAM-vs-truth (pure);
- :mod:`~lung_cls.report.cams` - each model's CAMs pooled over seeds, pixel-wise statistics;
- :mod:`~lung_cls.report.figures` - Figs. 2-4 via :mod:`lung_cls.evaluation.figures`;
- :mod:`~lung_cls.report.render` - CSV, markdown, ``report.json`` and ``report.html``, atomically;
- :mod:`~lung_cls.report.build` - :func:`build_report`, the table of contents.
"""

from __future__ import annotations

from typing import Any

from lung_cls.report.build import build_report
from lung_cls.report.discover import RunRecord, SweepNotFoundError, discover_runs
from lung_cls.report.paper import PAPER_TABLE1

__all__ = [
    "PAPER_TABLE1",
    "RunRecord",
    "SweepNotFoundError",
    "build_report",
    "discover_runs",
    "main",
]


def __getattr__(name: str) -> Any:
    # ``main`` lives in the door and is loaded on first use: importing ``__main__`` here would make
    # ``python -m lung_cls.report`` warn that the module was imported before it ran.
    if name == "main":
        from lung_cls.report.__main__ import main

        return main
    raise AttributeError(f"module 'lung_cls.report' has no attribute {name!r}")
