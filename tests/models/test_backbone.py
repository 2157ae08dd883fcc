"""Backbones (lung_cls/models/backbone.py): every model config builds its network, any timm name
works, pretrained weights come from a local file or a clear error says how to get them."""

from __future__ import annotations

import hydra
import pytest
import torch
from conftest import compose, tiny_overrides

from lung_cls.errors import WeightsNotFoundError
from lung_cls.models.backbone import create_backbone

PAPER_MODELS = {
    "vgg16": "vgg16.tv_in1k",
    "resnet18": "resnet18.tv_in1k",
    "inception_resnet_v2": "inception_resnet_v2.tf_in1k",
    "seresnext101": "seresnext101_32x4d.gluon_in1k",
}


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_model_config_composes_and_instantiates(tmp_path, name):
    cfg = compose(tiny_overrides(tmp_path, f"model={name}", "model.pretrained=false"))
    assert cfg.model.backbone == PAPER_MODELS[name]
    assert cfg.model.name == name
    module = hydra.utils.instantiate(cfg.model)
    size = 128 if name == "inception_resnet_v2" else 64  # its stem needs >= 75 px
    x = torch.rand(2, 1, size, size)
    module.eval()
    with torch.no_grad():
        logits = module(x)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_any_timm_backbone(tmp_path):
    cfg = compose(tiny_overrides(tmp_path, "model=timm", "model.backbone=mobilenetv3_small_050"))
    assert cfg.model.name == "mobilenetv3_small_050"
    module = hydra.utils.instantiate(cfg.model)
    assert module(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_pretrained_weights_load_from_local_file(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    with torch.no_grad():
        src.conv1.weight.fill_(0.123)
    path = tmp_path / "resnet18_weights.pth"
    torch.save(src.state_dict(), path)
    net, origin = create_backbone(
        "resnet18.tv_in1k", pretrained=True, weights=str(path), num_classes=2
    )
    assert origin.startswith("file:")
    assert torch.allclose(net.conv1.weight, torch.full_like(net.conv1.weight, 0.123))
    assert torch.equal(net.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert net.get_classifier().out_features == 2  # the 1000-class head was replaced
    scratch, origin = create_backbone("resnet18.tv_in1k", pretrained=False)
    assert origin == "scratch" and not torch.allclose(scratch.conv1.weight, net.conv1.weight)


def test_missing_weights_error_names_every_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("resnet18.tv_in1k", pretrained=True)
    msg = str(err.value)
    assert (
        "model.weights=" in msg and "model.pretrained=false" in msg and "Hugging Face cache" in msg
    )
    with pytest.raises(WeightsNotFoundError, match="points to no file"):
        create_backbone("resnet18.tv_in1k", pretrained=True, weights=str(tmp_path / "nope.pth"))


def test_invalid_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="not a timm model name"):
        create_backbone("resnet_does_not_exist", pretrained=False)
