"""``python -m lung_cls.report sweep_dir=DIR``: the sweep report (config: ``conf/report.yaml``).

The door only parses: Hydra composes the config, :func:`lung_cls.report.settings.from_config`
checks its types, :func:`lung_cls.report.build_report` does the work, and
:func:`lung_cls.errors.task_wrapper` turns expected errors (no such sweep dir, a typed mistake)
into one line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lung_cls.errors import task_wrapper

#: Absolute, so that ``main()`` finds the configs when called from Python too (Hydra resolves a
#: relative config path against the calling module, which differs between the two).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@task_wrapper
def run(cfg: Any) -> None:
    from rich.console import Console

    from lung_cls.report.build import build_report
    from lung_cls.report.settings import from_config

    out = build_report(**from_config(cfg))
    Console().print(f"[bold green]Report written:[/] {out / 'report.html'}")


def main() -> None:
    import hydra

    from lung_cls.utils.hydra import quote_path_overrides

    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="report")(run)()


if __name__ == "__main__":
    main()
