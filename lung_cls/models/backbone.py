"""Build any timm backbone, with the input adapter that turns a grey [0, 1] image into what the
backbone was trained on.

Pretrained weights come from ``lung_cls.utils.weights`` (a local file, the local caches, and the
hub before the first job; see there), which imports neither Lightning nor this package, so the
training command can check every model of a sweep before it starts.
"""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

from lung_cls.errors import WeightsNotFoundError  # re-exported: backbone.WeightsNotFoundError
from lung_cls.utils.weights import check_pretrained, find_local_weights, resolve_weights

log = logging.getLogger(__name__)


def create_backbone(
    backbone: str,
    *,
    pretrained: bool,
    weights: str | None = None,
    num_classes: int = 2,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    output_stride: int | None = None,
) -> tuple[nn.Module, str]:
    """Create a timm model with a fresh ``num_classes`` head. Returns ``(model, weights_origin)``.

    ``output_stride`` (8, 16 or 32; None = the model's own, 32 for the paper's CNNs) is passed to
    timm, which dilates the last stages instead of striding them: the last feature map, and so the
    Grad-CAM, is 2x (16) or 4x (8) finer on each side, at more compute in those stages.
    """
    if not timm.is_model(backbone):
        raise ValueError(
            f"model.backbone='{backbone}' is not a timm model name (see timm.list_models())"
        )
    kwargs: dict = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    kwargs.update(output_stride_kwargs(backbone, output_stride))
    if not pretrained:
        return timm.create_model(backbone, pretrained=False, **kwargs), "scratch"
    path, origin = resolve_weights(backbone, weights)
    model = timm.create_model(
        backbone, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs
    )
    log.info("Loaded %s weights from %s (%s)", backbone, path, origin)
    return model, f"{origin}:{path}"


def output_stride_kwargs(backbone: str, output_stride: int | None) -> dict:
    """``{"output_stride": n}`` for timm, or ``{}`` for the model's own stride; checked first."""
    if output_stride is None:
        return {}
    if isinstance(output_stride, bool) or output_stride not in (8, 16, 32):
        raise ValueError(f"model.output_stride={output_stride!r}: expected 8, 16, 32 or null")
    return {} if int(output_stride) == 32 else {"output_stride": int(output_stride)}


class GreyInput(nn.Module):
    """Grey image in [0, 1], shape (N, 1, H, W) -> the backbone's channels and normalisation.

    Part of the model (not the data pipeline) so that an exported model, the predictor and Grad-CAM
    all see exactly what training saw.
    """

    def __init__(self, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.in_chans = in_chans
        if in_chans == 1 and len(mean) != 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)
        return (x - self.mean) / self.std


class LungNet(nn.Module):
    """Input adapter + timm backbone: grey [0, 1] (N, 1, H, W) -> 2 logits (ventilation, perfusion).

    ``cam_layer`` names the Grad-CAM layer (``model.cam_layer``): a module name of the backbone
    (``layer3``), an index into timm's ``feature_info`` (``-2``: one stage before the last), or
    None for the deepest feature map; :func:`lung_cls.evaluation.cam.resolve_cam_layer` reads it.
    """

    def __init__(self, net: nn.Module, in_chans: int, cam_layer: str | int | None = None) -> None:
        super().__init__()
        data_cfg = timm.data.resolve_model_data_config(net)
        self.adapter = GreyInput(in_chans, tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
        self.net = net
        self.cam_layer = cam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))


__all__ = [
    "GreyInput",
    "LungNet",
    "WeightsNotFoundError",
    "check_pretrained",
    "create_backbone",
    "find_local_weights",
    "resolve_weights",
]
