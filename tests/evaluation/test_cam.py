"""Grad-CAM on the paper's backbones (random weights, tiny inputs): shape, range, no side effects."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lung_cls.evaluation.cam import compute_gradcam, resolve_cam_layer

# timm name -> (expected CAM layer, input size). inception_resnet_v2 needs >= 107 px for a 2x2
# map at conv2d_7b (75-106 px give 1x1, i.e. a constant CAM).
PAPER_MODELS = {
    "vgg16": ("features.30", 64),
    "resnet18": ("layer4", 64),
    "inception_resnet_v2": ("conv2d_7b", 107),
    "seresnext101_32x4d": ("layer4", 64),
}
# Each of these costs several seconds per Grad-CAM call on a busy 2-core CPU (VGG-16: 138 M
# parameters); resnet18 covers the same code path in the fast tier.
_HEAVY = {"vgg16", "inception_resnet_v2", "seresnext101_32x4d"}
MODEL_PARAMS = [
    pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else pytest.param(n)
    for n in PAPER_MODELS
]


@pytest.fixture(scope="module")
def paper_nets() -> dict[str, nn.Module]:
    """Paper models built on first use, once per module (pretrained=False: nothing is downloaded)."""

    class Lazy(dict):
        def __missing__(self, name: str) -> nn.Module:
            torch.manual_seed(0)
            self[name] = timm.create_model(name, pretrained=False, num_classes=2)
            return self[name]

    return Lazy()


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_resolve_cam_layer_paper_models(paper_nets: dict[str, nn.Module], name: str) -> None:
    net = paper_nets[name]
    module_name, size = PAPER_MODELS[name]
    assert resolve_cam_layer(net, input_size=size) is net.get_submodule(module_name)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_gradcam_paper_models(paper_nets: dict[str, nn.Module], name: str, training: bool) -> None:
    net = paper_nets[name]
    size = PAPER_MODELS[name][1]
    net.train(training)
    before = _snapshot(net)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():  # as in Lightning's test loop
        cams = compute_gradcam(net, x, targets=[1, 0])
    assert cams.shape == (2, size, size) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    assert cams.max() > 0.5  # min-max scaled per image: at least one map is not flat
    assert net.training is training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def test_gradcam_matches_manual_computation(paper_nets: dict[str, nn.Module]) -> None:
    """Our wrapper gives textbook Grad-CAM: ReLU(sum_k mean(dY/dA_k) A_k), upsampled, min-max."""
    net = paper_nets["resnet18"].eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    targets = [1, 0]
    cams = compute_gradcam(net, x, targets)

    store: dict[str, torch.Tensor] = {}
    handle = net.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        xr = x.clone().requires_grad_(True)
        logits = net(xr)
        act = store["a"]
        score = logits[torch.arange(2), torch.tensor(targets)].sum()
        (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    raw = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    raw = raw - raw.amin(dim=(2, 3), keepdim=True)
    raw = raw / (raw.amax(dim=(2, 3), keepdim=True) + 1e-7)
    up = F.interpolate(raw, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    up = up - up.amin(dim=(1, 2), keepdim=True)
    up = up / (up.amax(dim=(1, 2), keepdim=True) + 1e-7)
    assert np.allclose(cams, up.detach().numpy(), atol=2e-3)


def test_gradcam_restores_grads_flags_and_wrapper() -> None:
    """A wrapper (input adapter + timm net), frozen params and existing .grad survive the call."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.net = timm.create_model("resnet18", pretrained=False, num_classes=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.expand(-1, 3, -1, -1) * self.scale)

    torch.manual_seed(0)
    model = Wrapper().train()
    model.net.conv1.weight.requires_grad_(False)
    marker = torch.full_like(model.net.fc.weight, 7.0)
    model.net.fc.weight.grad = marker
    assert resolve_cam_layer(model, input_size=64) is model.net.layer4
    x = torch.rand(3, 1, 64, 64)
    cams = compute_gradcam(model, x, targets=np.array([1, 1, 0]), batch_size=2)
    assert cams.shape == (3, 64, 64)
    assert model.training
    assert model.net.conv1.weight.requires_grad is False
    assert model.net.fc.weight.grad is marker and torch.all(marker == 7.0)
    assert model.net.layer1[0].conv1.weight.grad is None


@pytest.mark.parametrize(
    ("name", "module_name"),
    [
        ("efficientnet_b0", "blocks.6"),
        pytest.param("densenet121", "features.norm5", marks=pytest.mark.slow),
        ("convnext_atto", "stages.3"),
    ],
)
def test_other_timm_cnns(name: str, module_name: str) -> None:
    net = timm.create_model(name, pretrained=False, num_classes=2)
    assert resolve_cam_layer(net, input_size=64) is net.get_submodule(module_name)
    cams = compute_gradcam(net, torch.randn(2, 3, 64, 64), [0, 1])
    assert cams.shape == (2, 64, 64) and 0.0 <= cams.min() and cams.max() <= 1.0


def test_vit_is_refused_with_reason() -> None:
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2)
    with pytest.raises(ValueError, match="not supported for Grad-CAM.*(4-D|token)"):
        resolve_cam_layer(net, input_size=64)
    with pytest.raises(ValueError, match="not supported for Grad-CAM"):
        compute_gradcam(net, torch.randn(1, 3, 224, 224), [1])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no timm feature_info"):
        resolve_cam_layer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    net = timm.create_model("resnet18", pretrained=False, num_classes=2)
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        compute_gradcam(net, torch.randn(2, 3, 32, 32), [1])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        compute_gradcam(net, torch.randn(3, 32, 32), [1, 0, 1])
    assert compute_gradcam(net, torch.randn(0, 3, 32, 32), []).shape == (0, 32, 32)


def test_gradcam_raw_maps_are_the_unscaled_weighted_activations(
    paper_nets: dict[str, nn.Module],
) -> None:
    """``return_raw``: sum_k mean(dY/dA_k) A_k before ReLU and min-max, upsampled; the scaled
    maps are unchanged by asking for it."""
    net = paper_nets["resnet18"].eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    targets = [0, 1]
    scaled, raw = compute_gradcam(net, x, targets, return_raw=True)
    assert np.array_equal(scaled, compute_gradcam(net, x, targets))
    store: dict[str, torch.Tensor] = {}
    handle = net.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = net(x.clone().requires_grad_(True))
        score = logits[torch.arange(2), torch.tensor(targets)].sum()
        (grad,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    ref = (grad.mean(dim=(2, 3), keepdim=True) * store["a"]).sum(dim=1, keepdim=True)
    up = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    up = up.detach().numpy()
    assert raw.shape == (2, 64, 64) and raw.dtype == np.float32
    assert np.allclose(raw, up, atol=1e-4 * max(1.0, float(np.abs(up).max())))
    assert raw.min() < 0 < raw.max()  # unlike the scaled maps, raw keeps sign and magnitude


def test_run_artifacts_explain_the_true_class_and_keep_raw_cams(tmp_path, monkeypatch) -> None:
    """The CAM of each test image is computed for its true label, never the other class, and
    cams.npz holds the raw maps beside the scaled ones."""
    from types import SimpleNamespace

    import lung_cls.evaluation.cam as cam_mod
    from lung_cls.evaluation.callbacks import RunArtifacts
    from lung_cls.runs import read_cams

    seen: dict[str, list[int]] = {}

    def fake(net, x, targets, batch_size=16, layer=None, method="gradcam", return_raw=False):
        seen["targets"] = [int(t) for t in targets]
        scaled = np.full((len(targets), 8, 8), 0.5, np.float32)
        return (scaled, scaled * 0 - 2.0) if return_raw else scaled

    monkeypatch.setattr(cam_mod, "compute_gradcam", fake)
    monkeypatch.setattr(cam_mod, "resolve_cam_layer", lambda net, **kw: None)
    monkeypatch.setattr(cam_mod, "cam_map_size", lambda net, layer, size: (2, 2))
    monkeypatch.setattr(
        cam_mod, "randomisation_check", lambda net, x, t, cams, bs: np.zeros(len(t), np.float32)
    )
    data = SimpleNamespace(
        labels=np.array([1, 0, 1, 0]),
        images=np.zeros((4, 8, 8), np.uint8),
        ids=np.array(list("abcd")),
        masks=None,
    )
    module = SimpleNamespace(
        model=SimpleNamespace(net=None, named_modules=lambda: iter(())), device="cpu"
    )
    RunArtifacts(str(tmp_path), {})._write_cams(
        module, data, np.array([2, 1, 0, 3]), np.array([0.9, 0.2, 0.8, 0.4])
    )
    assert seen["targets"] == [1, 0, 1, 0]
    arrays = read_cams(tmp_path)
    assert arrays["labels"].tolist() == [1, 0, 1, 0]
    assert np.all(arrays[cam_mod.RAW_CAMS_KEY] == -2.0)
