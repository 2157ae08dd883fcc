"""Grad-CAM for any timm CNN backbone.

Why this module exists: the paper shows class activation maps of the test images, and the QA tool
shows one per new study. Two things make that harder than calling ``pytorch_grad_cam`` directly:

* The CAM layer must be found for *any* timm backbone, not just the four paper models. "The last
  ``Conv2d``" is wrong for timm's VGG (it sits inside the ``pre_logits`` conv head), so the layer is
  taken from timm's ``feature_info[-1]`` - the deepest spatial feature map the model advertises.
* Grad-CAM needs autograd and calls ``backward``, while Lightning's test loop runs inside
  ``torch.inference_mode()``. :func:`compute_gradcam` therefore re-enables autograd locally and
  leaves the network exactly as it found it (weights, ``requires_grad`` flags, ``.grad`` and the
  training flag).

Note for the statistics: ``pytorch_grad_cam`` min-max scales every map *per image* to [0, 1]. A CAM
value is therefore relative to the strongest location in the same image; averages and pixel-wise
tests over images compare these relative maps, not absolute gradient magnitudes.
``compute_gradcam(..., return_raw=True)`` also gives the raw maps (before that library's ReLU and
min-max scaling, bilinearly resized to the input), which runs store as ``cams_raw``
(:data:`RAW_CAMS_KEY`) in ``cams.npz`` so the report can test either (``cam_scale=raw|minmax``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "CAM_METHODS",
    "RAW_CAMS_KEY",
    "cam_layer_choice",
    "cam_method",
    "cam_map_size",
    "compute_gradcam",
    "resolve_cam_layer",
]

#: ``cams.npz`` array of the raw Grad-CAMs: float32 (N, H, W), sum_k w_k A_k before any ReLU or
#: scaling, resized to the input (the report reads it under the same name).
RAW_CAMS_KEY = "cams_raw"


def _raw_gradcam_class(base: type) -> type:
    """``GradCAM`` that also keeps each batch's raw map (``get_cam_image``'s output)."""

    class RawGradCAM(base):  # type: ignore[misc, valid-type]
        def get_cam_image(self, *args: Any, **kwargs: Any) -> np.ndarray:
            cam = super().get_cam_image(*args, **kwargs)
            self.raw_maps.append(np.asarray(cam, dtype=np.float32))
            return cam

    return RawGradCAM


def _resize_maps(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, h', w') -> (N, H, W) bilinear, as pytorch-grad-cam resizes its scaled maps."""
    import cv2

    return np.stack([cv2.resize(np.float32(m), (w, h)) for m in maps]).astype(np.float32)


class _ProbeDone(Exception):
    """Raised from a forward hook to stop the probe forward pass once the layer has fired."""


def _find_backbone(net: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(prefix, module)`` of the first module that carries timm's ``feature_info``.

    Lets callers pass either the bare timm model or a wrapper (e.g. a LightningModule holding the
    timm model as an attribute): the prefix turns the backbone-relative module name into one that
    is valid on ``net``.
    """
    for name, module in net.named_modules():
        if getattr(module, "feature_info", None):
            return name, module
    return "", net


def _last_feature_entry(info: Any) -> dict:
    """The last entry of timm's feature_info, whether it is a list of dicts or a FeatureInfo."""
    if hasattr(info, "get_dicts"):  # timm.models.FeatureInfo (features_only models)
        return dict(info.get_dicts()[-1])
    return dict(info[-1])


def _input_channels(net: nn.Module) -> int:
    """Number of input channels, from the first conv layer (falls back to timm's pretrained_cfg)."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[0])


def _probe_output_shape(
    backbone: nn.Module, layer: nn.Module, size: tuple[int, int]
) -> tuple[int, ...]:
    """Shape of ``layer``'s output on one dummy image, stopping the forward pass right there.

    Runs in eval mode (BatchNorm refuses a batch of one in training mode) under ``no_grad`` and
    restores the training flag; weights and BN statistics are untouched.
    """
    captured: dict[str, tuple[int, ...]] = {}

    def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            captured["shape"] = tuple(out.shape)
        else:  # e.g. a tuple from an attention block: not a plain feature map
            captured["shape"] = (-1,)
        raise _ProbeDone

    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, _input_channels(backbone), *size), device=device, dtype=dtype)
    was_training = backbone.training
    handle = layer.register_forward_hook(hook)
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(x)
    except _ProbeDone:
        pass
    finally:
        handle.remove()
        backbone.train(was_training)
    if "shape" not in captured:
        raise ValueError(
            f"{type(backbone).__name__}: the CAM layer never ran in a forward pass at {size} px"
        )
    return captured["shape"]


def _feature_entries(info: Any) -> list[dict]:
    """Every entry of timm's feature_info as a dict, shallow to deep."""
    if hasattr(info, "get_dicts"):
        return [dict(d) for d in info.get_dicts()]
    return [dict(d) for d in info]


def _named_layer(backbone: nn.Module, choice: str | int, name_of: str) -> tuple[str, dict]:
    """``(module name, feature_info entry or {})`` of a ``model.cam_layer`` choice."""
    entries = _feature_entries(getattr(backbone, "feature_info", None) or [])
    text = str(choice).strip()
    if isinstance(choice, int) or text.lstrip("-").isdigit():
        idx = int(text)
        if not entries or not -len(entries) <= idx < len(entries):
            raise ValueError(
                f"model.cam_layer={choice!r}: {name_of} has {len(entries)} feature_info entries "
                f"({', '.join(e.get('module', '?') for e in entries)})"
            )
        return str(entries[idx].get("module")), entries[idx]
    for entry in entries:
        if entry.get("module") == text:
            return text, entry
    return text, {}


def cam_layer_choice(net: nn.Module) -> str | int | None:
    """The ``cam_layer`` a wrapper (``LungNet``) carries, or None (the deepest feature map)."""
    return getattr(net, "cam_layer", None)


def resolve_cam_layer(
    net: nn.Module,
    input_size: int | tuple[int, int] | None = None,
    layer: str | int | None = None,
) -> nn.Module:
    """The Grad-CAM target layer of a timm CNN: by default the module named by ``feature_info[-1]``.

    ``layer`` (else the ``cam_layer`` attribute of ``net``, which ``LungNet`` carries from
    ``model.cam_layer``) picks an earlier one: a module name of the backbone (``"layer3"``) or an
    index into ``feature_info`` (``-2``: the stage before the last, half the stride). An earlier
    layer gives a finer map (at 64 px a ResNet's ``layer4`` is 2 x 2, ``layer2`` 8 x 8) from
    features that are less class-specific; the demo measures the trade
    (``experiments/cam_resolution``).

    ``feature_info[-1]`` is the deepest feature map at the model's final stride (``layer4`` for
    ResNets, ``conv2d_7b`` for Inception-ResNet-v2, the last max-pool ``features.30`` for VGG,
    ``stages.3`` for ConvNeXt ...). It is checked with one probe forward pass to really output an
    ``(N, C, H, W)`` feature map; transformers (token outputs) and channels-last stage outputs are
    refused with a ``ValueError`` that says why, rather than producing a meaningless map.

    Args:
        net: a timm model, or a wrapper module that holds one.
        input_size: probe image size (int or (H, W)); default: the model's pretrained_cfg size.
    """
    choice = layer if layer is not None else cam_layer_choice(net)
    prefix, backbone = _find_backbone(net)
    name_of = type(backbone).__name__
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(
            f"{name_of}: backbone is not supported for Grad-CAM: it has no timm feature_info, so "
            "there is no known spatial feature map to explain (use a timm CNN backbone)"
        )
    if choice is None:
        entry = _last_feature_entry(info)
        module_name = entry.get("module")
    else:
        module_name, entry = _named_layer(backbone, choice, name_of)
    if not module_name:
        raise ValueError(
            f"{name_of}: backbone is not supported for Grad-CAM: feature_info[-1] names no module"
        )
    try:
        layer = backbone.get_submodule(module_name)
    except AttributeError as err:
        where = "feature_info[-1] names" if choice is None else "model.cam_layer names"
        raise ValueError(
            f"{name_of}: backbone is not supported for Grad-CAM: {where} "
            f"'{module_name}', which is not a submodule ({err})"
        ) from err

    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    default_hw = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224))[-2:])
    if input_size is None:
        sizes = [default_hw]
    elif isinstance(input_size, int):
        sizes = [(input_size, input_size), default_hw]
    else:
        sizes = [tuple(int(v) for v in input_size), default_hw]
    shape: tuple[int, ...] | None = None
    probe_error = ""
    for hw in dict.fromkeys(sizes):  # the requested size, then the model's native size
        try:
            shape = _probe_output_shape(backbone, layer, hw)  # type: ignore[arg-type]
            break
        except Exception as err:  # noqa: BLE001 - any forward failure becomes one clear message
            probe_error = (
                f"{name_of}: backbone is not supported for Grad-CAM: a probe forward pass at "
                f"{hw} px failed before reaching '{module_name}' ({type(err).__name__}: {err})"
            )
            log.debug(probe_error)
    if shape is None:
        raise ValueError(probe_error)

    if len(shape) != 4:
        raise ValueError(
            f"{name_of}: backbone is not supported for Grad-CAM: its CAM layer '{module_name}' "
            f"outputs shape {shape}, not a 4-D (N, C, H, W) spatial feature map (token-based "
            "models such as ViTs have no feature map to weight)"
        )
    num_chs = entry.get("num_chs")
    if num_chs is not None and shape[1] != num_chs:
        how = "channels-last (N, H, W, C)" if shape[-1] == num_chs else "unexpected"
        raise ValueError(
            f"{name_of}: backbone is not supported for Grad-CAM: '{module_name}' outputs {shape}, "
            f"a {how} layout where feature_info promises {num_chs} channels in dim 1"
        )
    if shape[-2:] == (1, 1):
        log.warning(
            "%s: the Grad-CAM layer '%s' is 1x1 at %s px, so every map will be constant; "
            "use a larger input",
            name_of,
            module_name,
            hw,
        )
    full_name = f"{prefix}.{module_name}" if prefix else module_name
    log.debug("Grad-CAM layer of %s: %s, output %s at %s px", name_of, full_name, shape, hw)
    return layer


#: ``model.cam_method`` / ``compute_gradcam(method=)`` values -> pytorch_grad_cam class names.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcam++": "GradCAMPlusPlus",
}


def cam_method(method: str) -> type:
    """The pytorch_grad_cam class of a :data:`CAM_METHODS` name (ValueError naming the choices)."""
    import pytorch_grad_cam

    key = str(method).strip().lower()
    if key not in CAM_METHODS:
        raise ValueError(f"cam method {method!r}: expected one of {', '.join(CAM_METHODS)}")
    return getattr(pytorch_grad_cam, CAM_METHODS[key])


def compute_gradcam(
    net: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[int],
    batch_size: int = 16,
    layer: nn.Module | None = None,
    method: str = "gradcam",
    return_raw: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps of ``inputs`` for the given target class of each image.

    ``inputs`` are the network's own (normalised) inputs ``(N, C, H, W)``; any memory format. Each
    map is explained for an explicit class (the true label in the paper's figures), without
    ``aug_smooth`` (its horizontal flip swaps the left and right lung) or ``eigen_smooth``.

    Safe to call from a Lightning test/predict step: autograd is re-enabled locally, even inside
    ``torch.inference_mode()``. The network is left as found: parameters are frozen during the
    call (gradients flow to the input only, so no ``.grad`` is accumulated), and the
    ``requires_grad`` flags, any existing ``.grad`` tensors and the training flag (Grad-CAM switches
    to eval mode) are restored afterwards.

    ``method`` picks the variant from ``pytorch_grad_cam`` (:data:`CAM_METHODS`): ``gradcam``
    (channel weights = mean gradient; the paper's), ``hirescam`` (gradient x activation per pixel,
    faithful to the model's own computation at that layer), ``layercam`` (positive gradients x
    activation per pixel, made for earlier, finer layers) or ``gradcam++``.

    Returns:
        float32 ``(N, H, W)`` in [0, 1]. ``pytorch_grad_cam`` min-max scales each map per image, so
        values are relative to the image's own maximum. With ``return_raw`` a pair
        ``(scaled, raw)``, ``raw`` the float32 ``(N, H, W)`` maps before ReLU and scaling.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = cam_method(method)

    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
        shape = getattr(inputs, "shape", None)
        raise ValueError(f"compute_gradcam: inputs must be a (N, C, H, W) tensor, got {shape}")
    target_arr = np.asarray(targets).astype(np.int64).reshape(-1)
    n = int(inputs.shape[0])
    if target_arr.shape[0] != n:
        raise ValueError(f"compute_gradcam: {n} images but {target_arr.shape[0]} targets")
    if batch_size < 1:
        raise ValueError(f"compute_gradcam: batch_size must be >= 1, got {batch_size}")
    h, w = int(inputs.shape[-2]), int(inputs.shape[-1])
    if n == 0:
        empty = np.zeros((0, h, w), dtype=np.float32)
        return (empty, empty.copy()) if return_raw else empty

    params = list(net.parameters())
    if not params:
        raise ValueError("compute_gradcam: the network has no parameters")
    device, dtype = params[0].device, params[0].dtype
    was_training = net.training
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    maps: list[np.ndarray] = []
    raws: list[np.ndarray] = []
    cam_class = _raw_gradcam_class(cam_class) if return_raw else cam_class
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device_type=device.type, enabled=False),
        ):
            if layer is None:
                layer = resolve_cam_layer(net, input_size=(h, w))
            for p in params:
                p.requires_grad_(False)
            # clone() inside inference_mode(False) turns a possible inference tensor into a normal
            # one that autograd may record.
            x_all = inputs.clone()
            if x_all.is_floating_point():
                x_all = x_all.to(device=device, dtype=dtype)
            else:
                x_all = x_all.to(device=device, dtype=torch.float32)
            with cam_class(model=net, target_layers=[layer]) as cam:
                cam.raw_maps = raws
                for start in range(0, n, batch_size):
                    xb = x_all[start : start + batch_size].detach().requires_grad_(True)
                    tb = [
                        ClassifierOutputTarget(int(t))
                        for t in target_arr[start : start + batch_size]
                    ]
                    try:
                        out = cam(input_tensor=xb, targets=tb)
                    except IndexError as err:
                        # GradCAM.__exit__ would swallow an IndexError (e.g. a bad class index).
                        raise RuntimeError(f"Grad-CAM failed on images {start}..: {err}") from err
                    maps.append(np.asarray(out, dtype=np.float32))
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        net.train(was_training)
    if sum(len(m) for m in maps) != n:
        raise RuntimeError(f"Grad-CAM returned {sum(len(m) for m in maps)} maps for {n} images")
    result = np.concatenate(maps, axis=0)
    np.nan_to_num(result, copy=False, nan=0.0)
    result = np.clip(result, 0.0, 1.0).astype(np.float32, copy=False)
    if not return_raw:
        return result
    raw = _resize_maps(np.concatenate(raws, axis=0), h, w)
    return result, np.nan_to_num(raw, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def cam_map_size(
    net: nn.Module, layer: nn.Module, input_size: int | tuple[int, int]
) -> tuple[int, int]:
    """``(h, w)`` of ``layer``'s feature map at ``input_size``: the CAM's native resolution.

    Grad-CAM upsamples this map to the input, so a 2 x 2 map drawn at 64 px still has only four
    independent values; the report warns when it is coarser than the paper's 7 x 7.
    """
    _, backbone = _find_backbone(net)
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    shape = _probe_output_shape(backbone, layer, hw)  # type: ignore[arg-type]
    return int(shape[-2]), int(shape[-1])


def randomised_copy(net: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``net`` with every learnable layer re-initialised (the model-parameter
    randomisation test of Adebayo et al. 2018, all layers at once); ``net`` is untouched."""
    import copy

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    # Outside inference mode: Lightning's test hooks run inside it, and a copy made there would
    # hold inference tensors that Grad-CAM's autograd cannot use.
    with torch.inference_mode(False), torch.no_grad():
        rand = copy.deepcopy(net)
        for t in [*rand.parameters(), *rand.buffers()]:
            t.data = t.data.clone()
    try:
        for module in rand.modules():
            with torch.inference_mode(False), torch.no_grad():
                if module is not rand and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                if hasattr(module, "reset_running_stats"):
                    module.reset_running_stats()
    finally:
        torch.random.set_rng_state(gen_state)
    return rand


def map_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps ``(N, H, W)``; nan where a map is flat."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    out = np.full(len(a), np.nan)
    for i in range(len(a)):
        if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
            out[i] = float(spearmanr(a[i], b[i]).statistic)
    return out


def randomisation_check(
    net: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[int],
    cams: np.ndarray,
    batch_size: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """Per image: Spearman similarity of the trained model's CAM to the same model's CAM with
    randomised weights. CAMs that survive randomisation (high similarity) explain the input's
    edges, not what the model learned."""
    rand = randomised_copy(net, seed=seed)
    layer = resolve_cam_layer(rand, input_size=tuple(inputs.shape[-2:]))
    rand_cams = compute_gradcam(rand, inputs, targets, batch_size=batch_size, layer=layer)
    return map_similarity(cams, rand_cams)
