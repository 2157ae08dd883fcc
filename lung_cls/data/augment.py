"""Seeded random augmentation of a whole batch, on the device that trains.

The paper augmented "size, shape and intensity (colour)" every epoch. Doing it per image on
the CPU in DataLoader workers is the usual bottleneck for small grey images, so here the batch
is augmented after it reaches the device: one ``affine_grid`` + ``grid_sample`` call for the
geometry of all images, then a few element-wise ops for intensity. All random numbers come
from one ``torch.rand`` call with an explicit generator on the batch's device, so a run is
reproducible from its seed and no host-device synchronisation is needed.

Left-right flips are off by default: the heart sits on the patient's left (image right) and
the lungs are not mirror images, so a flip creates anatomy that never occurs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BatchAugment", "from_config"]

# Columns of the per-image random draw; always all of them, so the generator advances by the
# same amount whatever is configured and a config change does not reshuffle other draws.
_N_DRAWS = 10
(_SCALE, _ROT, _SHEAR, _TX, _TY, _GAMMA, _CONTRAST, _BRIGHT, _APPLY, _FLIP) = range(_N_DRAWS)


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    vals = tuple(float(v) for v in value)
    if len(vals) != 2 or not vals[0] <= vals[1]:
        raise ValueError(
            f"BatchAugment: {name} must be a (low, high) pair with low <= high, got {value}"
        )
    return vals[0], vals[1]


class BatchAugment(torch.nn.Module):
    """Random affine (scale, rotation, shear, translation) plus gamma/contrast/brightness.

    Each image gets its own parameters:
      - scale ~ U(scale), isotropic zoom about the image centre (> 1 enlarges);
      - rotation ~ U(-rotate_deg, rotate_deg), shear (x) ~ U(-shear_deg, shear_deg);
      - translation ~ U(-translate, translate) x image size, independently in y and x;
      - gamma ~ log-uniform(gamma) (so 0.8 and 1.25 are equally likely), ``x ** gamma``;
      - contrast ~ U(contrast) around the image's own mean, brightness ~ U(brightness) added;
      - with ``p`` < 1 an image is left untouched with probability 1 - p;
      - hflip (if enabled) with probability 0.5.
    Pixels moved in from outside are 0 (matching the zero fill of the centring step); the
    result is clamped to [0, 1]. Intensity changes also touch the zero background slightly
    (contrast < 1 or brightness > 0 lift it), like a different display window would.

    Geometry is in pixel units, so rotations stay rigid on non-square images. Computation is in
    float32 whatever the input dtype (bf16 included); the output has the input's dtype and, for
    channels_last input, its memory format.

    The module applies its transform whenever called; the caller decides to call it on
    training batches only.
    """

    def __init__(
        self,
        scale: Sequence[float] = (0.9, 1.1),
        rotate_deg: float = 10.0,
        shear_deg: float = 5.0,
        translate: float = 0.05,
        gamma: Sequence[float] = (0.8, 1.25),
        contrast: Sequence[float] = (0.8, 1.2),
        brightness: Sequence[float] = (-0.05, 0.05),
        hflip: bool = False,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        self.scale = _pair("scale", scale)
        self.gamma = _pair("gamma", gamma)
        self.contrast = _pair("contrast", contrast)
        self.brightness = _pair("brightness", brightness)
        if self.scale[0] <= 0 or self.gamma[0] <= 0 or self.contrast[0] < 0:
            raise ValueError(
                "BatchAugment: scale and gamma must be > 0 and contrast >= 0, got "
                f"scale={self.scale}, gamma={self.gamma}, contrast={self.contrast}"
            )
        self.rotate_deg = float(rotate_deg)
        self.shear_deg = float(shear_deg)
        self.translate = float(translate)
        if self.rotate_deg < 0 or not 0 <= self.shear_deg < 90 or not 0 <= self.translate < 1:
            raise ValueError(
                "BatchAugment: need rotate_deg >= 0, 0 <= shear_deg < 90, 0 <= translate < 1; got "
                f"{self.rotate_deg}, {self.shear_deg}, {self.translate}"
            )
        self.hflip = bool(hflip)
        self.p = float(p)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"BatchAugment: p must be in [0, 1], got {p}")

    @property
    def geometric(self) -> bool:
        """Whether any geometric change is configured (else the resampling is skipped)."""
        return (
            self.scale != (1.0, 1.0)
            or self.rotate_deg > 0
            or self.shear_deg > 0
            or self.translate > 0
            or self.hflip
        )

    @property
    def photometric(self) -> bool:
        """Whether any intensity change is configured."""
        return (
            self.gamma != (1.0, 1.0) or self.contrast != (1.0, 1.0) or self.brightness != (0.0, 0.0)
        )

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, rotate_deg={self.rotate_deg}, shear_deg={self.shear_deg}, "
            f"translate={self.translate}, gamma={self.gamma}, contrast={self.contrast}, "
            f"brightness={self.brightness}, hflip={self.hflip}, p={self.p}"
        )

    def sample(
        self, n: int, device: torch.device, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """Per-image parameters (float32, on ``device``); neutral for images not selected by p."""
        u = torch.rand((n, _N_DRAWS), generator=generator, device=device, dtype=torch.float32)

        def uniform(col: int, lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * u[:, col]

        apply = u[:, _APPLY] < self.p
        glo, ghi = math.log(self.gamma[0]), math.log(self.gamma[1])
        params = {
            "scale": uniform(_SCALE, *self.scale),
            "angle": torch.deg2rad(uniform(_ROT, -self.rotate_deg, self.rotate_deg)),
            "shear": torch.deg2rad(uniform(_SHEAR, -self.shear_deg, self.shear_deg)),
            "tx": uniform(_TX, -self.translate, self.translate),
            "ty": uniform(_TY, -self.translate, self.translate),
            "gamma": torch.exp(uniform(_GAMMA, glo, ghi)),
            "contrast": uniform(_CONTRAST, *self.contrast),
            "brightness": uniform(_BRIGHT, *self.brightness),
            # u < 0 never holds: no flips unless configured, without a host->device copy
            "flip": u[:, _FLIP] < (0.5 if self.hflip else 0.0),
        }
        neutral = {"scale": 1.0, "gamma": 1.0, "contrast": 1.0}
        for key, value in params.items():
            if key == "flip":
                params[key] = value & apply
            else:
                params[key] = torch.where(apply, value, neutral.get(key, 0.0))
        return params

    @staticmethod
    def theta(params: Mapping[str, Tensor], height: int, width: int) -> Tensor:
        """``affine_grid`` matrices (N, 2, 3): output -> input coordinates, normalised.

        The forward map (input -> output) in pixel units about the centre is
        ``p_out = R(angle) @ Shear(shear) @ S(scale) @ p_in + t``. ``affine_grid`` wants the
        inverse, expressed in coordinates normalised separately by width and height.
        """
        s, a, sh = params["scale"], params["angle"], params["shear"]
        cos, sin, tan = torch.cos(a), torch.sin(a), torch.tan(sh)
        # L = R @ Sh @ S, with Sh = [[1, tan], [0, 1]]
        l00, l01 = cos * s, (cos * tan - sin) * s
        l10, l11 = sin * s, (sin * tan + cos) * s
        det = l00 * l11 - l01 * l10
        i00, i01, i10, i11 = l11 / det, -l01 / det, -l10 / det, l00 / det
        # to normalised coordinates: x_n = x / (W/2), y_n = y / (H/2); A_n = D^-1 A D
        ar = width / height
        n00, n01, n10, n11 = i00, i01 / ar, i10 * ar, i11
        # translation: a fraction f of the size is 2f in normalised units
        tx_n, ty_n = 2.0 * params["tx"], 2.0 * params["ty"]
        b0 = -(n00 * tx_n + n01 * ty_n)
        b1 = -(n10 * tx_n + n11 * ty_n)
        flip = torch.where(params["flip"], -1.0, 1.0)
        row0 = torch.stack([n00 * flip, n01 * flip, b0 * flip], dim=1)
        row1 = torch.stack([n10, n11, b1], dim=1)
        return torch.stack([row0, row1], dim=1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch (N, C, H, W) with values in [0, 1]; returns the same shape/dtype/device."""
        if x.ndim != 4:
            raise ValueError(
                f"BatchAugment expects a batch (N, C, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"BatchAugment expects a float tensor in [0, 1], got {x.dtype}")
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(
                f"BatchAugment: generator is on {generator.device}, the batch on {x.device}; "
                "create it with torch.Generator(device=batch.device)"
            )
        n, _, h, w = x.shape
        if n == 0:
            return x
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        params = self.sample(n, x.device, generator)
        out = x.float()
        if self.geometric:
            grid = F.affine_grid(self.theta(params, h, w), [n, 1, h, w], align_corners=False)
            out = F.grid_sample(
                out, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        if self.photometric:
            view = (n, 1, 1, 1)
            out = out.clamp(0.0, 1.0) ** params["gamma"].view(view)
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (
                (out - mean) * params["contrast"].view(view)
                + mean
                + params["brightness"].view(view)
            )
        out = out.clamp(0.0, 1.0).to(x.dtype)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def from_config(cfg: Mapping) -> BatchAugment | None:
    """Build the augmentation from a config mapping (e.g. ``data.augment``), or None if disabled.

    Keys: ``enabled`` (default true) and any of BatchAugment's arguments (``scale``,
    ``rotate_deg``, ``shear_deg``, ``translate``, ``gamma``, ``contrast``, ``brightness``,
    ``hflip``, ``p``); missing ones keep the defaults. An unknown key is an error, so a typo
    cannot silently switch an augmentation off.
    """
    if cfg is None:
        return None
    keys = set(cfg.keys())
    if not bool(cfg.get("enabled", True)):
        return None
    allowed = {
        "scale",
        "rotate_deg",
        "shear_deg",
        "translate",
        "gamma",
        "contrast",
        "brightness",
        "hflip",
        "p",
    }
    unknown = sorted(str(k) for k in keys - allowed - {"enabled"})
    if unknown:
        raise ValueError(
            f"augment config: unknown key(s) {unknown}; allowed: enabled, {', '.join(sorted(allowed))}"
        )
    kwargs = {}
    for k in allowed & keys:
        v = cfg[k]
        if k in ("scale", "gamma", "contrast", "brightness"):
            v = tuple(float(a) for a in v)
        kwargs[k] = v
    return BatchAugment(**kwargs)
