"""Evaluation: metrics, statistics, Grad-CAM, CAM-vs-truth scores and figures.

Exports are resolved lazily (PEP 562): ``import lung_cls.evaluation`` stays cheap and never pulls
in matplotlib or pytorch_grad_cam (heavy, and matplotlib picks a backend on import); each name
loads its submodule on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # metrics.py - per-run classification metrics
    "binary_metrics": "metrics",
    "roc_points": "metrics",
    "bootstrap_ci": "metrics",
    "summarise_seeds": "metrics",
    "pool_confusion": "metrics",
    "auc_score": "metrics",
    # stats.py - CAM maps and model comparisons
    "pixelwise_ttest": "stats",
    "fdr_bh": "stats",
    "permutation_maxT": "stats",
    "significant_fractions": "stats",
    "delong_test": "stats",
    "mcnemar_test": "stats",
    "holm": "stats",
    # groundtruth.py - CAMs vs phantom truth masks
    "score_cams": "groundtruth",
    "cam_energy_fraction": "groundtruth",
    "pointing_game": "groundtruth",
    # cam.py - Grad-CAM
    "compute_gradcam": "cam",
    "resolve_cam_layer": "cam",
    # figures.py - the paper's figures
    "fig_average_cams": "figures",
    "fig_cam_statistics": "figures",
    "fig_roc": "figures",
    "fig_cam_grid": "figures",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only; nothing is imported at run time
    from lung_cls.evaluation.cam import compute_gradcam, resolve_cam_layer  # noqa: F401
    from lung_cls.evaluation.figures import (  # noqa: F401
        fig_average_cams,
        fig_cam_grid,
        fig_cam_statistics,
        fig_roc,
    )
    from lung_cls.evaluation.groundtruth import (  # noqa: F401
        cam_energy_fraction,
        pointing_game,
        score_cams,
    )
    from lung_cls.evaluation.metrics import (  # noqa: F401
        auc_score,
        binary_metrics,
        bootstrap_ci,
        pool_confusion,
        roc_points,
        summarise_seeds,
    )
    from lung_cls.evaluation.stats import (  # noqa: F401
        delong_test,
        fdr_bh,
        holm,
        mcnemar_test,
        permutation_maxT,
        pixelwise_ttest,
        significant_fractions,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lung_cls.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lung_cls.evaluation.{module}"), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
