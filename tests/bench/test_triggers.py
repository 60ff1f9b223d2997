"""Triggers: uint8 in, new uint8 out, deterministic, and each one changes the image the way its paper says."""

from __future__ import annotations

import pytest
import torch

from bench.attacks import (
    TRIGGERS,
    apply_trigger,
    blend_trigger,
    ctrl_positions,
    ctrl_trigger,
    patch_trigger,
    trigger_mask,
    wanet_trigger,
)
from bench.attacks.triggers import _RGB_TO_YUV, _dct_matrix


def _smooth(n: int = 2, size: int = 32, channels: int = 3) -> torch.Tensor:
    """Mid-range gradients plus a little texture: natural-ish, and far from 0/255 so nothing clamps."""
    g = torch.linspace(40, 210, size)
    base = [(g[None, :] + g[:, None]) / 2, (g[None, :] + g.flip(0)[:, None]) / 2, g[:, None].expand(size, size)]
    gen = torch.Generator().manual_seed(0)
    imgs = [torch.stack(base[:channels]) + 8 * torch.rand(channels, size, size, generator=gen) for _ in range(n)]
    return torch.stack(imgs).round().to(torch.uint8)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean()
    return float(10 * torch.log10(255.0**2 / mse))


@pytest.mark.parametrize("name", sorted(TRIGGERS))
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 32), (3, 64)])
def test_trigger_contract(name, channels, size):
    x = _smooth(3, size, channels)
    before = x.clone()
    out = apply_trigger(name, x)
    assert out.dtype == torch.uint8
    # CTRL perturbs chroma, so grayscale input comes back as RGB (the one documented shape change).
    expected_c = 3 if name == "ctrl" else channels
    assert out.shape == (3, expected_c, size, size)
    assert torch.equal(x, before), "input must not be modified"
    assert torch.equal(out, apply_trigger(name, x)), "same arguments must give identical output"
    ref = x.expand(-1, expected_c, -1, -1)
    assert (out.float() - ref.float()).abs().mean() > 0


def test_patch_is_exactly_the_square():
    x = _smooth()
    out = patch_trigger(x)
    mask = trigger_mask("patch", 32)
    assert mask.dtype == torch.bool and mask.shape == (32, 32)
    assert mask.sum() == 100 and mask[21:31, 21:31].all()
    assert (out[..., mask] == 255).all()
    assert torch.equal(out[..., ~mask], x[..., ~mask])


def test_patch_scales_with_image_size():
    out = patch_trigger(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    assert torch.equal(out[0, 0] == 255, trigger_mask("patch", 64))
    assert (out[0, 0, 42:62, 42:62] == 255).all() and out.sum() == 20 * 20 * 255
    custom = trigger_mask("patch", 32, size=4, start=0)
    assert custom.sum() == 16 and custom[:4, :4].all()


def test_mask_is_everything_for_global_triggers():
    for name in ("blend", "wanet", "ctrl"):
        assert trigger_mask(name, 16).all()


def test_blend_endpoints_and_custom_pattern():
    x = _smooth()
    pattern = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    assert torch.equal(blend_trigger(x, alpha=0.0), x)
    assert torch.equal(blend_trigger(x, alpha=1.0, pattern=pattern), pattern.expand_as(x))
    half = blend_trigger(x, alpha=0.5, pattern=pattern[:1])  # one channel broadcasts
    assert torch.equal(half, ((x.float() + 7) / 2).round().to(torch.uint8))
    photo = blend_trigger(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), alpha=1.0)
    assert photo.float().std() > 10, "default pattern should be a real photo, not a flat image"


def test_wanet_seed_and_zero_strength():
    x = _smooth(2, 32)
    assert not torch.equal(wanet_trigger(x, seed=0, strength=4.0), wanet_trigger(x, seed=1, strength=4.0))
    assert (wanet_trigger(x, strength=0.0).int() - x.int()).abs().max() <= 1
    # One field for the whole batch: an image warps the same alone or in a batch.
    assert torch.equal(wanet_trigger(x)[1:], wanet_trigger(x[1:]))


def test_ctrl_is_subtle_but_moves_the_chosen_coefficients():
    x = _smooth(2, 32)
    out = ctrl_trigger(x, magnitude=50.0)
    assert _psnr(out, x) > 25
    d = _dct_matrix(32)

    def coeffs(img):
        yuv = torch.einsum("ij,njhw->nihw", _RGB_TO_YUV, img.double())
        return d @ yuv @ d.T

    delta = coeffs(out) - coeffs(x)
    for ch in (1, 2):  # U, V
        for r, c in ((15, 15), (31, 31)):
            # Rounding to uint8 shifts each coefficient by a couple of units (about 2 here): x is already
            # integer, so round(x + p) - (x + p) depends only on the perturbation p, not on the image.
            assert (delta[:, ch, r, c] - 50.0).abs().max() < 3.0
    assert delta[:, 0].abs().max() < 2.0, "luma should only see rounding noise"


def test_ctrl_windows_and_positions():
    assert ctrl_positions(32, ((15, 15), (31, 31))) == [(15, 15), (31, 31)]
    assert ctrl_positions(16, ((15, 15), (31, 31))) == [(7, 7), (15, 15)]
    out = ctrl_trigger(_smooth(1, 32), window=16)
    assert out.shape == (1, 3, 32, 32)
    assert ctrl_trigger(_smooth(1, 48), window=48).shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match="divide"):
        ctrl_trigger(_smooth(1, 48), window=32)
    with pytest.raises(ValueError, match="channels"):
        ctrl_trigger(_smooth(1, 32), channels=("Q",))


def test_bad_arguments_raise():
    x = _smooth(1, 32)
    with pytest.raises(ValueError, match="unknown trigger"):
        apply_trigger("hello-kitty", x)
    with pytest.raises(ValueError, match="unknown trigger"):
        trigger_mask("hello-kitty", 32)
    with pytest.raises(ValueError, match="at least 16"):
        patch_trigger(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        patch_trigger(x.float())
    with pytest.raises(ValueError, match="alpha"):
        blend_trigger(x, alpha=1.5)
    with pytest.raises(ValueError, match="pattern"):
        blend_trigger(x, pattern=torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exceeds"):
        patch_trigger(x, size=12, start=25)
    with pytest.raises(ValueError, match="k"):
        wanet_trigger(x, k=1)
