"""The CAM layer is configurable (model.cam_layer, model.output_stride), and the neck measure
that the report shows for the paper's main finding scores what it claims."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lung_cls.evaluation import groundtruth as gt
from lung_cls.evaluation.cam import cam_map_size, compute_gradcam, resolve_cam_layer
from lung_cls.models.backbone import LungNet, create_backbone


@pytest.fixture(scope="module")
def resnet() -> LungNet:
    torch.manual_seed(0)
    net, _ = create_backbone("resnet18", pretrained=False)
    return LungNet(net, 3).eval()


def test_cam_layer_by_name_index_and_default(resnet: LungNet) -> None:
    assert resolve_cam_layer(resnet, input_size=64) is resnet.net.layer4
    assert resolve_cam_layer(resnet, input_size=64, layer="layer2") is resnet.net.layer2
    # feature_info of a ResNet: act1, layer1, layer2, layer3, layer4 -> -3 is layer2.
    assert resolve_cam_layer(resnet, input_size=64, layer=-3) is resnet.net.layer2
    assert resolve_cam_layer(resnet, input_size=64, layer="-2") is resnet.net.layer3
    assert cam_map_size(resnet, resnet.net.layer4, 64) == (2, 2)
    assert cam_map_size(resnet, resnet.net.layer2, 64) == (8, 8)


def test_cam_layer_attribute_is_used_and_bad_choices_are_named(resnet: LungNet) -> None:
    net = LungNet(resnet.net, 3, cam_layer="layer3")
    assert resolve_cam_layer(net, input_size=64) is resnet.net.layer3
    with pytest.raises(ValueError, match="model.cam_layer names 'layer9'"):
        resolve_cam_layer(resnet, input_size=64, layer="layer9")
    with pytest.raises(ValueError, match="5 feature_info entries"):
        resolve_cam_layer(resnet, input_size=64, layer=7)


def test_earlier_layer_gives_a_finer_map(resnet: LungNet) -> None:
    x = torch.rand(2, 1, 64, 64)
    coarse = compute_gradcam(resnet, resnet.adapter(x), [0, 1])
    fine = compute_gradcam(resnet, resnet.adapter(x), [0, 1], layer=resnet.net.layer2)
    # a 2 x 2 map upsampled bilinearly has far fewer distinct values per row than an 8 x 8 one
    assert fine.shape == coarse.shape == (2, 64, 64)
    assert len(np.unique(np.round(fine[0], 4))) > len(np.unique(np.round(coarse[0], 4)))


@pytest.mark.parametrize("method", ["hirescam", "layercam", "gradcam++"])
def test_cam_variants_run_and_stay_in_range(resnet: LungNet, method: str) -> None:
    x = resnet.adapter(torch.rand(2, 1, 64, 64))
    cams = compute_gradcam(resnet, x, [0, 1], layer=resnet.net.layer2, method=method)
    assert cams.shape == (2, 64, 64) and cams.min() >= 0 and cams.max() <= 1


def test_unknown_cam_method_is_named(resnet: LungNet) -> None:
    with pytest.raises(ValueError, match="'scorecam'.*gradcam"):
        compute_gradcam(resnet, torch.rand(1, 3, 32, 32), [0], method="scorecam")


def test_output_stride_16_doubles_the_map_side() -> None:
    net, _ = create_backbone("resnet18", pretrained=False, output_stride=16)
    lung = LungNet(net, 3)
    assert cam_map_size(lung, resolve_cam_layer(lung, input_size=64), 64) == (4, 4)
    with pytest.raises(ValueError, match="output_stride=12"):
        create_backbone("resnet18", pretrained=False, output_stride=12)


def test_classifier_keeps_cam_layer_in_its_hparams() -> None:
    from lung_cls.models.classifier import LungClassifier

    model = LungClassifier("resnet18", pretrained=False, cam_layer="layer2", channels_last=False)
    assert model.hparams.cam_layer == "layer2"
    assert resolve_cam_layer(model.model, input_size=64) is model.model.net.layer2


# --------------------------------------------------------------------------- the neck measure
def _neck_case(n: int = 6, size: int = 32) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    labels = np.array([0] * n + [1] * 2)
    trachea = np.zeros((n + 2, size, size), dtype=bool)
    trachea[:n, 2:12, 15:17] = True  # a thin vertical tube at the top centre, ventilation only
    return labels, {"trachea": trachea, "lungs": np.zeros_like(trachea)}


def test_neck_scores_peak_on_the_trachea_passes() -> None:
    labels, masks = _neck_case()
    cams = np.full(masks["trachea"].shape, 0.05)
    cams[:, 5:9, 14:18] = 1.0
    s = gt.neck_scores(cams, labels, masks, tolerance_px=1)
    assert s["n"] == 6 and s["hit_rate"] == 1.0
    assert s["energy_ratio"] > 2 and s["passes"] is True
    assert math.isclose(s["chance_share"], s["hit_chance"])


def test_neck_scores_flat_map_scores_chance_and_fails() -> None:
    labels, masks = _neck_case()
    s = gt.neck_scores(np.ones(masks["trachea"].shape), labels, masks, tolerance_px=2)
    assert math.isclose(s["energy_ratio"], 1.0)
    assert math.isclose(s["hit_rate"], s["hit_chance"])
    assert s["passes"] is False


def test_neck_scores_without_trachea_mask_is_undefined() -> None:
    labels, masks = _neck_case()
    s = gt.neck_scores(np.ones(masks["lungs"].shape), labels, {"lungs": masks["lungs"]})
    assert s["n"] == 0 and s["passes"] is None and math.isnan(s["energy_ratio"])


def test_coarse_cam_warning_and_cell_tolerance() -> None:
    assert "2 x 2" in gt.coarse_cam_warning((2, 2), "resnet18")
    assert gt.coarse_cam_warning((7, 7), "resnet18") is None
    assert gt.coarse_cam_warning(None, "resnet18") is None
    assert gt.cell_tolerance_px(64, 8) == 4.0
    assert gt.cell_tolerance_px(64, None) == 0.0
