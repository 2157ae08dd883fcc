"""What the paper reports, and the layout of Table 1 that the report shares with it.

Kept apart from the computations so that a reader comparing our numbers with the paper finds
the paper's side in one place (Jeong et al. 2022, Table 1; ``../shared/PAPER.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Paper Table 1 (mean of 5 repetitions): acc, F1, sensitivity, specificity in %, AUC as a fraction.
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "vgg16": {
        "label": "VGG-16",
        "acc": 89.5,
        "f1": 88.6,
        "sensitivity": 82.0,
        "specificity": 97.0,
        "auc": 0.95,
    },
    "resnet18": {
        "label": "ResNet-18",
        "acc": 92.0,
        "f1": 91.6,
        "sensitivity": 87.0,
        "specificity": 97.0,
        "auc": 0.98,
    },
    "seresnext101": {
        "label": "SE-ResNeXt-101",
        "acc": 98.5,
        "f1": 98.5,
        "sensitivity": 99.0,
        "specificity": 98.0,
        "auc": 0.99,
    },
    "inception_resnet_v2": {
        "label": "Inception-ResNet-v2",
        "acc": 98.5,
        "f1": 98.5,
        "sensitivity": 99.0,
        "specificity": 98.0,
        "auc": 0.99,
    },
}
#: The metrics of Table 1; all but AUC are shown in percent.
TABLE_METRICS: tuple[str, ...] = ("acc", "f1", "sensitivity", "specificity", "auc")
PCT_METRICS: tuple[str, ...] = ("acc", "f1", "sensitivity", "specificity")
METRIC_LABEL: dict[str, str] = {
    "acc": "Accuracy (%)",
    "f1": "F1 (%)",
    "sensitivity": "Sensitivity (%)",
    "specificity": "Specificity (%)",
    "auc": "AUC",
}


def column(key: str) -> str:
    """Column stem of a metric in ``table1.csv``: ``acc_pct`` for the percent metrics, ``auc``."""
    return f"{key}_pct" if key in PCT_METRICS else key


def scale(key: str) -> float:
    """Factor from the stored fraction to the table's unit (100 for percent metrics)."""
    return 100.0 if key in PCT_METRICS else 1.0


def digits(key: str) -> int:
    """Decimals shown for our numbers: one for percentages, three for AUC."""
    return 1 if key in PCT_METRICS else 3


def model_order(models: Iterable[str]) -> list[str]:
    """The paper's order first (VGG-16, ResNet-18, SE-ResNeXt-101, Inception-ResNet-v2), then A-Z."""
    models = list(dict.fromkeys(models))
    paper = [m for m in PAPER_TABLE1 if m in models]
    return paper + sorted(m for m in models if m not in PAPER_TABLE1)
