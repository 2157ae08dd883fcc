"""Train one model, keep its best validation epoch, test it once, write the run dir.

    python -m lung_cls.train                                   # one run, paper settings
    python -m lung_cls.train -m model=vgg16,resnet18,inception_resnet_v2,seresnext101 seed=0,1,2,3,4
    python -m lung_cls.train -m experiment=demo                # the CPU-sized demo (make demo)
    python -m lung_cls.train --cfg job                         # the whole resolved config

In a multirun a failing job writes ``metrics.json`` with ``status: failed`` and its error, and the
sweep goes on; the report lists the failure. The job lives in ``lung_cls.training``, launching
(plugins, DDP inside a sweep) in ``lung_cls.launch``; this door parses the command line.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lung_cls.errors import task_wrapper
from lung_cls.launch import missing_launcher_plugin, require_launcher_plugin
from lung_cls.training import run, train
from lung_cls.utils.hydra import quote_path_overrides
from lung_cls.utils.typed import preflight


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@task_wrapper
def main(cfg: DictConfig) -> float | None:
    value = run(cfg)
    # A float for Hydra's sweepers, never an int that the task wrapper would take for an exit code.
    return None if value is None else float(value)


__all__ = ["main", "missing_launcher_plugin", "run", "train"]

if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    task_wrapper(require_launcher_plugin)(sys.argv[1:])
    # Typed mistakes, missing data and every model's weights, before the first job starts.
    task_wrapper(preflight)(sys.argv[1:], "train")
    main()
