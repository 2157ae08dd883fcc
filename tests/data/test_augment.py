"""Seeded on-device batch augmentation (lung_cls.data.augment)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lung_cls.data.augment import BatchAugment, from_config

NEUTRAL = dict(
    scale=(1.0, 1.0),
    rotate_deg=0.0,
    shear_deg=0.0,
    translate=0.0,
    gamma=(1.0, 1.0),
    contrast=(1.0, 1.0),
    brightness=(0.0, 0.0),
)


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch(n: int = 6, c: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, c, size, size), generator=gen(seed))


def lopsided(n: int = 32, size: int = 32) -> torch.Tensor:
    """Images with nearly all mass in the left third (like an asymmetric heart shadow)."""
    x = torch.zeros(n, 1, size, size)
    x[:, :, size // 4 : 3 * size // 4, 2 : size // 3] = 0.8
    x[:, :, size // 4 : 3 * size // 4, 2 * size // 3 : size - 2] = 0.1
    return x


def left_fraction(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    left = x[..., :half].sum(dim=(1, 2, 3))
    return left / x.sum(dim=(1, 2, 3))


def test_neutral_ranges_are_identity():
    x = batch()
    aug = BatchAugment(**NEUTRAL)
    assert not aug.geometric and not aug.photometric
    assert torch.equal(aug(x, gen(0)), x)


def test_unselected_images_pass_the_resampling_unchanged():
    # p=0: every image gets neutral parameters, but the affine_grid/grid_sample path still runs
    x = batch()
    out = BatchAugment(p=0.0)(x, gen(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_same_seed_same_output_other_seed_differs():
    x = batch(c=3)
    aug = BatchAugment()
    a, b, c = aug(x, gen(1)), aug(x, gen(1)), aug(x, gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)


def test_output_range_shape_dtype_no_nan():
    x = batch(n=8, c=3)
    x[0] = 0.0  # an all-black image: gamma and contrast must not make NaNs
    x[1] = 1.0
    out = BatchAugment(scale=(0.7, 1.3), rotate_deg=30, brightness=(-0.3, 0.3))(x, gen(3))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_bf16_channels_last_round_trip():
    x = batch(n=4, c=3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = BatchAugment()(x, gen(0))
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = BatchAugment()(x.float().contiguous(), gen(0))
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=0)


def test_hflip_off_by_default_keeps_left_right():
    x = lopsided()
    before = left_fraction(x).mean()
    kept = left_fraction(BatchAugment()(x, gen(0))).mean()
    flipped = left_fraction(BatchAugment(hflip=True)(x, gen(0))).mean()
    assert before > 0.85
    assert abs(kept - before) < 0.05
    assert 0.3 < flipped < 0.7  # about half the images mirrored


def test_theta_translation_and_rigid_rotation_on_non_square_image():
    def params(**kw):
        p = {k: torch.zeros(1) for k in ("angle", "shear", "tx", "ty")}
        p["scale"] = torch.ones(1)
        p["flip"] = torch.zeros(1, dtype=torch.bool)
        p.update({k: torch.tensor([v]) for k, v in kw.items()})
        return p

    def warp(img, p):
        th = BatchAugment.theta(p, *img.shape[-2:])
        grid = F.affine_grid(th, list(img.shape), align_corners=False)
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 4, 2] = 1.0
    out = warp(img, params(tx=0.25))  # a quarter of the width to the right: 2 px
    assert out[0, 0, 4, 4] == pytest.approx(1.0, abs=1e-5)

    img = torch.zeros(1, 1, 8, 16)  # centre (3.5, 7.5); this pixel sits at (dy, dx) = (0.5, 2.5)
    img[0, 0, 4, 10] = 1.0
    out = warp(img, params(angle=math.pi / 2))  # +90 deg: (dx, dy) -> (-dy, dx) = (-0.5, 2.5)
    assert out[0, 0, 6, 7] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-4)


def test_contrast_keeps_each_image_mean():
    x = 0.4 + 0.2 * batch(n=5)  # values in [0.4, 0.6]: no clamping at contrast 0.8-1.2
    aug = BatchAugment(**{**NEUTRAL, "contrast": (0.8, 1.2)})
    out = aug(x, gen(0))
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    assert not torch.allclose(out, x)


def test_from_config():
    assert from_config({"enabled": False, "rotate_deg": 5}) is None
    aug = from_config({"enabled": True, "scale": [0.95, 1.05], "rotate_deg": 3, "hflip": False})
    assert isinstance(aug, BatchAugment)
    assert aug.scale == (0.95, 1.05) and aug.rotate_deg == 3.0 and aug.shear_deg == 5.0
    with pytest.raises(ValueError, match="rotate_degrees"):
        from_config({"rotate_degrees": 3})


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="scale"):
        BatchAugment(scale=(1.1, 0.9))
    with pytest.raises(ValueError, match="p must"):
        BatchAugment(p=1.5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        BatchAugment()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="float"):
        BatchAugment()(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_cuda_generator():
    x = batch(n=16, c=3, size=64).cuda().to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    aug = BatchAugment()
    a, b = aug(x, gen(5, "cuda")), aug(x, gen(5, "cuda"))
    assert a.device == x.device and a.dtype == torch.bfloat16
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
    assert torch.isfinite(a.float()).all() and a.min() >= 0 and a.max() <= 1
    with pytest.raises(ValueError, match="generator"):
        aug(x, gen(5, "cpu"))
