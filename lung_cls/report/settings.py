"""The report's statistical settings, and their check when they come from the command line.

One small frozen record, because three places need the same values: the computations,
``report.json["settings"]`` (so a report says how it was made) and the methods list of
``report.html`` (which quotes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lung_cls.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    n_boot: int = 2000  # stratified bootstrap resamples of the pooled 95% CIs (0: none)
    n_perm: int = 1000  # label permutations of the max-T pixel-wise test (0: skip it)
    seed: int = 0  # seed of the bootstrap and the permutations
    alpha: float = 0.05  # significance level of the pixel-wise tests
    equal_var: bool = True  # Student's pooled-variance t-test (the paper); False: Welch's
    cam_scale: str = "minmax"  # CAMs tested: minmax (pytorch-grad-cam's scaled maps) or raw
    cam_mask: str = "auto"  # pixels tested: auto (body), none (all), or a .npy bool (H, W) file
    cam_mask_threshold: float = 0.1  # auto without truth masks: mean image >= this x its max


def _integer(cfg: Mapping[str, Any], key: str, minimum: int | None = None) -> int:
    value = cfg.get(key)
    ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or (minimum is not None and value < minimum):
        expected = "expected an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ConfigError(key, value, expected)
    return int(value)


def _boolean(cfg: Mapping[str, Any], key: str, allow_none: bool = False) -> bool | None:
    value = cfg.get(key)
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    raise ConfigError(key, value, "expected true or false" + (" or null" if allow_none else ""))


def _path(cfg: Mapping[str, Any], key: str, allow_none: bool = False) -> str | None:
    value = cfg.get(key)
    if (isinstance(value, str) and value.strip()) or (allow_none and value is None):
        return value
    hint = " or null" if allow_none else f" (required: {key}=DIR)"
    raise ConfigError(key, value, "expected a folder path" + hint)


def from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``build_report`` keyword arguments from ``conf/report.yaml``, each checked for its type.

    Raises :class:`~lung_cls.errors.ConfigError` naming the first key that is wrong, e.g.
    ``n_boot='many': expected an integer >= 0``: a typed mistake must not turn into a traceback,
    nor into a silent ``bool("false") == True``.
    """
    alpha = cfg.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ConfigError("alpha", alpha, "expected a number between 0 and 1")
    scale = cfg.get("cam_scale", "minmax")
    if scale not in ("minmax", "raw"):
        raise ConfigError("cam_scale", scale, "expected minmax or raw")
    cam_mask = cfg.get("cam_mask", "auto")
    if not isinstance(cam_mask, str) or not cam_mask.strip():
        raise ConfigError("cam_mask", cam_mask, "expected auto, none or the path of a .npy mask")
    thr = cfg.get("cam_mask_threshold", 0.1)
    if isinstance(thr, bool) or not isinstance(thr, int | float) or not 0 <= thr < 1:
        raise ConfigError("cam_mask_threshold", thr, "expected a number in [0, 1)")
    return {
        "sweep_dir": _path(cfg, "sweep_dir"),
        "out_dir": _path(cfg, "out_dir", allow_none=True),
        "n_boot": _integer(cfg, "n_boot", minimum=0),
        "n_perm": _integer(cfg, "n_perm", minimum=0),
        "seed": _integer(cfg, "seed"),
        "log_wandb": _boolean(cfg, "log_wandb", allow_none=True),
        "alpha": float(alpha),
        "equal_var": _boolean(cfg, "equal_var"),
        "cam_scale": scale,
        "cam_mask": cam_mask,
        "cam_mask_threshold": float(thr),
    }


def load_cam_mask(how: str) -> str | Any:
    """``cam_mask`` as :func:`lung_cls.report.cams.body_mask` takes it: ``auto``/``none`` as
    they are, anything else the path of a bool (H, W) ``.npy`` file, loaded here.

    Raises :class:`~lung_cls.errors.ConfigError` naming the file when it cannot be read or is
    not a 2-D array.
    """
    if how in ("auto", "none"):
        return how
    import numpy as np

    try:
        mask = np.load(how, allow_pickle=False)
    except (OSError, ValueError) as err:
        expected = f"expected auto, none or a readable .npy file ({err})"
        raise ConfigError("cam_mask", how, expected) from None
    if mask.ndim != 2:
        raise ConfigError("cam_mask", how, f"expected a 2-D (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool)
