"""Temperature scaling (Guo et al. 2017): one scalar T fitted on the validation set so that
``P(perfusion) = sigmoid(z / T)`` (z the logit difference, perfusion - ventilation) minimises the
negative log-likelihood. T > 1 softens an overconfident model; the ranking (AUC, accuracy at 0.5)
is unchanged. Runs with ``temperature_scaling=true`` store T in ``metrics.json`` and in the
checkpoint under the top-level ``temperature`` key, which the QA tool reads.
"""

from __future__ import annotations

import math

import numpy as np

#: Checkpoint key of the fitted temperature (a float); absent = 1 (no scaling).
TEMPERATURE_KEY = "temperature"
_EPS = 1e-6


def logits_from_probs(p: np.ndarray) -> np.ndarray:
    """The logit difference z of two-class softmax probabilities: p = sigmoid(z)."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def scale_probs(p: np.ndarray, temperature: float) -> np.ndarray:
    """P(perfusion) after dividing the logit by ``temperature``."""
    return 1.0 / (1.0 + np.exp(-logits_from_probs(p) / float(temperature)))


def nll(y: np.ndarray, p: np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """T in [0.05, 20] minimising the validation NLL (bounded 1-D search on log T).

    Returns ``temperature``, ``nll_before`` and ``nll_after``; T = 1 when there is nothing to fit
    (one class only, or fewer than 2 images).
    """
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    before = nll(y, p) if len(y) else math.nan
    if len(y) < 2 or len(np.unique(y)) < 2:
        return {"temperature": 1.0, "nll_before": before, "nll_after": before}
    z = logits_from_probs(p)

    def loss(log_t: float) -> float:
        return nll(y, 1.0 / (1.0 + np.exp(-z / math.exp(log_t))))

    res = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    t = float(math.exp(res.x))
    return {"temperature": t, "nll_before": before, "nll_after": float(loss(res.x))}
