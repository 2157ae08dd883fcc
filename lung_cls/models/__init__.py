"""Models: any timm backbone behind a grey-input adapter, wrapped in a LightningModule."""

from lung_cls.models.backbone import GreyInput, LungNet, WeightsNotFoundError, create_backbone
from lung_cls.models.classifier import LungClassifier, load_lung_net, predict_probs

__all__ = [
    "GreyInput",
    "LungClassifier",
    "LungNet",
    "WeightsNotFoundError",
    "create_backbone",
    "load_lung_net",
    "predict_probs",
]
