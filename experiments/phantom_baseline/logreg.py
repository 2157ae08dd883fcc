"""Is the built-in phantom a non-trivial task? A plain logistic-regression baseline.

Generates the default cohort (394 perfusion, 136 ventilation), min-max normalises each image,
downsamples it to 32 x 32 (8 x 8 block means; no centring) and fits scikit-learn's
LogisticRegression in stratified 5-fold cross-validation. A linear model on raw pixels should
be clearly below 100 % (the paper's CNNs score 89-99 %); if it were near 100 %, the phantom
would leak a shortcut. It also reports how often the paper's centring threshold (30 after
min-max x 255) finds two separate lungs, which the NMI fallback has to cover otherwise.

    python experiments/phantom_baseline/logreg.py              # default difficulty + 0, 0.5, 1
    python experiments/phantom_baseline/logreg.py --seeds 0 1 2
    python experiments/phantom_baseline/logreg.py --ablations  # which cues carry it
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from lung_cls.data.phantom import default_sim, simulate_cohort


def features(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Min-max normalise each image, then block-mean it down to size x size."""
    x = images.astype(np.float32)
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    x = (x - lo) / np.maximum(hi - lo, 1e-6)
    n, h, w = x.shape
    f = h // size
    return x.reshape(n, size, f, size, f).mean(axis=(2, 4)).reshape(n, -1)


def separable(image: np.ndarray, threshold: float = 30.0) -> bool:
    """Two lung-sized regions above the paper's threshold (min-max x 255 >= 30)?"""
    x = image.astype(np.float32)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6) * 255.0
    lab, n = ndimage.label(x >= threshold)
    if n < 2:
        return False
    sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1]
    return bool(sizes[1] >= 0.25 * sizes[0] and sizes[1] >= 0.005 * x.size)


NO_VENT_FEATURES = {
    "features": {
        "ventilation": {
            "trachea": {"p": 0.0},
            "oropharynx": {"p": 0.0},
            "esophagus": {"p": 0.0},
            "stomach": {"p": 0.0},
            "hotspots": {"p": 0.0, "p_copd": 0.0},
        }
    }
}
SAME_LUNG_LOOK = {"difficulty_effects": {"class_contrast": [0.0, 0.0]}}
SAME_COUNTS = {
    "camera": {
        "counts": {k: {"median": 500000, "range": [300000, 1000000]} for k in ("dtpa", "technegas")}
    }
}
ABLATIONS = {
    "no ventilation-only features": [NO_VENT_FEATURES],
    "... and the same lung look": [NO_VENT_FEATURES, SAME_LUNG_LOOK],
    "... and the same counts": [NO_VENT_FEATURES, SAME_LUNG_LOOK, SAME_COUNTS],
}


def _overlay(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def evaluate(difficulty: float, seed: int, overrides: list[dict] | None = None) -> dict:
    sim = default_sim()
    for over in overrides or []:
        sim = _overlay(sim, over)
    sim["difficulty"] = difficulty
    t = time.perf_counter()
    cases = simulate_cohort(sim, 394, 136, seed)
    dt = time.perf_counter() - t
    images = np.stack([c.image for c in cases])
    y = np.array([c.label for c in cases])
    clf = LogisticRegression(max_iter=5000)  # plain: default L2, C=1, no feature scaling
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    acc = cross_val_score(clf, features(images), y, cv=cv, scoring="accuracy")
    sep = np.array([separable(im) for im in images])
    return {
        "acc_mean": float(acc.mean()),
        "acc_sd": float(acc.std(ddof=1)),
        "sep_q": float(sep[y == 1].mean()),
        "sep_v": float(sep[y == 0].mean()),
        "img_per_s": len(cases) / dt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--ablations", action="store_true", help="which cues carry it: switch them off in turn"
    )
    args = ap.parse_args()
    if args.ablations:
        table = Table(title="Ablations (seed 0): the same baseline with cues switched off")
        for col in ("phantom", "difficulty 0", "difficulty 1"):
            table.add_column(col, justify="right")
        for name, overrides in ABLATIONS.items():
            accs = [evaluate(d, 0, overrides) for d in (0.0, 1.0)]
            cells = [f"{100 * r['acc_mean']:.1f} +- {100 * r['acc_sd']:.1f}" for r in accs]
            table.add_row(name, *cells)
        Console().print(table)
        return
    default_d = float(default_sim()["difficulty"])
    levels = [(f"{d:g}" + (" (default)" if d == default_d else ""), d)
              for d in sorted({0.0, 0.5, 1.0, default_d})]  # fmt: skip
    table = Table(title="Logistic regression on 32x32 min-max pixels, stratified 5-fold CV")
    for col in ("difficulty", "seed", "accuracy %", "lungs split at 30: Q / V %", "images/s"):
        table.add_column(col, justify="right")
    for name, d in levels:
        for seed in args.seeds:
            r = evaluate(d, seed)
            table.add_row(
                name,
                str(seed),
                f"{100 * r['acc_mean']:.1f} +- {100 * r['acc_sd']:.1f}",
                f"{100 * r['sep_q']:.0f} / {100 * r['sep_v']:.0f}",
                f"{r['img_per_s']:.0f}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
