"""``python -m lung_cls.preprocess input=DIR output=DIR [figures=true] [size=224]``

Runs the paper's pre-processing (resize, min-max x 255, lung-centroid centring with the NMI
fallback) on a folder of images or a CSV manifest, so a user can see what the model will see:

* ``output/<same relative path>.png`` - the centred 8-bit image per input file;
* ``output/preprocess.csv`` - file, method (centroid | nmi | none), shift_y, shift_x (px at the
  output size), source, label, reason (why the centroid method was not used);
* ``output/figures/<name>.png`` (``figures=true``) - a panel per image like the paper's Fig. 1:
  normalised, binary (threshold), lung contours with both centroids and their midpoint, centred.

A folder with class subfolders (``class_dirs``) is read as labelled; any other folder is read
label-less. Bad files stop the run with one line naming the file (``on_error=skip`` lists them at
the end instead). The writing lives in `lung_cls.data.preprocess_files`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lung_cls.data.preprocess_files import (  # noqa: F401 - re-exported from their old home
    CSV_COLUMNS,
    data_config_for,
    save_panel,
)
from lung_cls.errors import UserError, task_wrapper
from lung_cls.utils.hydra import quote_path_overrides
from lung_cls.utils.io import to_plain


def run(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The CLI's work; returns a summary (counts, skipped files, output folder)."""
    from lung_cls.data.preprocess import prep_config
    from lung_cls.data.preprocess_files import check_output, write_preprocessed

    inp = Path(str(cfg["input"])).expanduser()
    out = Path(str(cfg["output"])).expanduser()
    try:
        prep = prep_config(to_plain(cfg["prep"]))
    except ValueError as err:
        raise UserError(f"prep: {err}") from None
    check_output(inp, out, bool(cfg.get("overwrite", False)))
    data_cfg = data_config_for(inp, cfg)
    return write_preprocessed(out, data_cfg, prep, figures=bool(cfg.get("figures", False)))


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
@task_wrapper
def main(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)
    summary = run(cfg)
    m = summary["methods"]
    skipped, ignored = summary["skipped"], summary.get("ignored", [])
    total = summary["n"] + len(skipped) + len(ignored)
    console.print(
        f"{total} file(s): {summary['n']} pre-processed -> {escape(summary['output'])} "
        f"({m.get('centroid', 0)} centred by lung centroids, {m.get('nmi', 0)} by the NMI "
        f"fallback, {m.get('none', 0)} not centred), {len(skipped)} skipped, "
        f"{len(ignored)} ignored"
    )
    if skipped:
        console.print(f"[yellow]Skipped {len(skipped)} file(s):[/yellow]")
        for line in skipped:
            console.print(f"  {escape(line)}")
    for name in ignored:
        console.print(f"  ignored: {escape(name)}")


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    main()
