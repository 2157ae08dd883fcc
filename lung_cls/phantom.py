"""``python -m lung_cls.phantom out=DIR [format=dicom|png|npy] [seed=0] [sim.difficulty=0.5]``

Writes the built-in V/Q phantom (`lung_cls.data.phantom`) as files, so it can be used like any
exported data set (``data=folder data.root=DIR`` or ``data=manifest data.manifest=DIR/manifest.csv``)
or opened in a DICOM viewer: ``DIR/perfusion/``, ``DIR/ventilation/`` (one file per image),
``DIR/manifest.csv`` and ``DIR/truth.csv`` (every sampled parameter). Refuses to write into a
non-empty folder unless ``overwrite=true``. The writing lives in `lung_cls.data.phantom_files`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lung_cls.data.phantom_files import (  # noqa: F401 - re-exported from their old home
    FORMATS,
    OWN_OUTPUTS,
    write_cohort,
)
from lung_cls.errors import UserError, task_wrapper
from lung_cls.utils.hydra import quote_path_overrides
from lung_cls.utils.io import to_plain


def run(cfg: DictConfig) -> dict[str, Any]:
    """The command without Hydra's decorator (tests and other tools call this)."""
    from lung_cls.data.phantom import resolve_sim
    from lung_cls.data.phantom_files import write_phantom

    if OmegaConf.is_missing(cfg, "out") or cfg.get("out") in (None, ""):
        raise UserError("out=DIR is required: the folder to write the phantom into")
    fmt = str(cfg.get("format", "dicom")).lower()
    n_p, n_v = int(cfg.n_perfusion), int(cfg.n_ventilation)
    if n_p < 0 or n_v < 0 or n_p + n_v == 0:
        raise UserError(f"n_perfusion={n_p} n_ventilation={n_v}: need at least one image")
    try:
        sim = resolve_sim(to_plain(cfg.sim))
    except ValueError as err:
        raise UserError(f"sim: {err}") from None
    out = Path(str(cfg.out)).expanduser()
    return write_phantom(out, sim, n_p, n_v, int(cfg.seed), fmt, bool(cfg.get("overwrite", False)))


@hydra.main(version_base="1.3", config_path="../conf", config_name="phantom")
@task_wrapper
def main(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.markup import escape

    s = run(cfg)
    Console(soft_wrap=True).print(
        f"[green]phantom[/]: {s['n']} images ({s['n_perfusion']} perfusion, "
        f"{s['n_ventilation']} ventilation, {s['n_patients']} patients, difficulty "
        f"{float(cfg.sim.difficulty):g}, seed {int(cfg.seed)}) as {s['format']} in "
        f"{escape(s['out'])} - simulated at {s['n'] / max(s['seconds_simulate'], 1e-9):.0f} images/s, "
        f"{s['seconds_total']:.1f} s in all"
    )


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    main()
