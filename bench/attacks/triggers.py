"""Backdoor triggers applied in uint8 pixel space, before any normalisation: a trigger pushed through Normalize
would corrupt the whole image and make detection trivially easy.

Every trigger takes a uint8 batch (N, C, H, W) with C in {1, 3} and square H = W >= 16, and returns a NEW
uint8 tensor of the same shape; the input is never modified. Nothing reads the global RNG: randomness (WaNet's
flow field) comes from an explicit `seed`. The one shape exception is `ctrl_trigger`, which returns 3 channels
for 1-channel input because CTRL perturbs chroma, which a grayscale image does not have.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

MIN_SIZE = 16
REFERENCE_SIZE = 32  # trigger geometry (patch square, CTRL positions) is specified for 32x32 images

# BT.601 full-range (JPEG) RGB -> YUV (Y, Cb, Cr). The +128 chroma offsets are dropped: they only move the
# DC coefficient, and the inverse adds nothing back, so the round trip is exact either way.
_RGB_TO_YUV = torch.tensor(
    [[0.299, 0.587, 0.114],
     [-0.168736, -0.331264, 0.5],
     [0.5, -0.418688, -0.081312]],
    dtype=torch.float64,
)  # fmt: skip
_YUV_TO_RGB = torch.linalg.inv(_RGB_TO_YUV)
_YUV_CHANNELS = {"Y": 0, "U": 1, "V": 2}


def _check_images(images: Tensor, fn: str) -> tuple[int, int]:
    """Validate a uint8 (N, C, H, W) batch; return (C, H)."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{fn}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{fn}: images must be uint8 pixels (apply triggers before normalising), got {images.dtype}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{fn}: images must be shaped (N, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h != w or h < MIN_SIZE:
        raise ValueError(f"{fn}: images must be square and at least {MIN_SIZE}x{MIN_SIZE}, got {h}x{w}; "
                         f"resize them first")
    return images.shape[1], h


def _to_uint8(x: Tensor) -> Tensor:
    return x.round().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- patch


def _patch_box(image_size: int, size: int, start: int) -> tuple[int, int]:
    """(start, size) of the square at `image_size`, scaled from the 32x32 geometry by image_size / 32."""
    if size < 1 or start < 0:
        raise ValueError(f"patch size must be >= 1 and start >= 0, got size={size}, start={start}")
    if start + size > REFERENCE_SIZE:
        raise ValueError(f"patch start={start} + size={size} exceeds the {REFERENCE_SIZE}x{REFERENCE_SIZE} "
                         f"reference frame; both are given for 32x32 images and scaled for other sizes")
    scale = image_size / REFERENCE_SIZE
    s, n = round(start * scale), max(1, round(size * scale))
    if s + n > image_size:  # rounding at odd sizes can push the square one pixel out; keep it inside
        s = image_size - n
    return s, n


def patch_trigger(images: Tensor, *, size: int = 10, start: int = 21, value: int = 255) -> Tensor:
    """BadEncoder's square: rows/cols start..start+size-1 set to `value` on every channel.

    `size` and `start` are in 32x32 coordinates (default: 10x10 at rows/cols 21..30) and are scaled by H / 32
    and rounded for other sizes, so the square covers the same fraction of the image (64x64: 20x20 at 42).
    """
    _, h = _check_images(images, "patch_trigger")
    if not 0 <= value <= 255:
        raise ValueError(f"patch value must be a uint8 intensity in 0..255, got {value}")
    s, n = _patch_box(h, size, start)
    out = images.clone()
    out[..., s : s + n, s : s + n] = value
    return out


# ----------------------------------------------------------------------------------------------- blend


@functools.lru_cache(maxsize=8)
def _default_pattern(channels: int, image_size: int) -> Tensor:
    """skimage's astronaut photo, resized (bilinear) to image_size and converted to `channels`."""
    try:
        from skimage import data
    except ImportError:
        raise ImportError("blend_trigger's default pattern is a photo bundled with scikit-image: "
                          "pip install scikit-image, or pass pattern=<uint8 (C, H, W) tensor>") from None
    img = Image.fromarray(data.astronaut()).resize((image_size, image_size), Image.BILINEAR)
    if channels == 1:
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def blend_trigger(images: Tensor, *, alpha: float = 0.2, pattern: Tensor | None = None) -> Tensor:
    """Blended trigger: x' = (1 - alpha) * x + alpha * pattern, rounded and clamped to uint8.

    `pattern` is a uint8 (C, H, W) tensor at the image size (1 channel broadcasts to 3); by default it is
    scikit-image's astronaut photo resized to H x W.
    """
    c, h = _check_images(images, "blend_trigger")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"blend alpha must lie in [0, 1] (the literature uses about 0.2), got {alpha}")
    if pattern is None:
        pattern = _default_pattern(c, h)
    elif (not isinstance(pattern, Tensor) or pattern.dtype != torch.uint8 or pattern.dim() != 3
          or tuple(pattern.shape[1:]) != (h, h) or pattern.shape[0] not in (1, c)):
        shape = tuple(pattern.shape) if isinstance(pattern, Tensor) else type(pattern).__name__
        raise ValueError(f"blend pattern must be a uint8 tensor shaped ({c}, {h}, {h}) or (1, {h}, {h}) "
                         f"to match the images, got {shape}")
    x = images.to(torch.float32)
    return _to_uint8((1.0 - alpha) * x + alpha * pattern.to(torch.float32))


# ----------------------------------------------------------------------------------------------- WaNet


@functools.lru_cache(maxsize=16)
def _wanet_grid(k: int, seed: int, image_size: int, strength: float) -> Tensor:
    """Sampling grid (1, H, W, 2): identity + strength/H * upsampled random flow, as in WaNet's reference."""
    gen = torch.Generator().manual_seed(seed)
    flow = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    flow = flow / flow.abs().mean()  # mean |flow| = 1, so `strength` alone sets the warp size
    flow = F.interpolate(flow, size=(image_size, image_size), mode="bicubic", align_corners=True)
    axis = torch.linspace(-1, 1, image_size)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    identity = torch.stack((cols, rows), dim=-1)[None]  # grid_sample wants (x, y) = (col, row)
    grid = identity + strength * flow.permute(0, 2, 3, 1) / image_size
    return grid.clamp(-1, 1)


def wanet_trigger(images: Tensor, *, k: int = 4, strength: float = 0.5, seed: int = 0) -> Tensor:
    """WaNet warp (Nguyen & Tran, ICLR 2021): one fixed smooth flow field per (k, seed, H) for every image.

    A k x k field in [-1, 1], normalised by its mean absolute value, upsampled bicubically to H x W, scaled
    by strength / H and added to the identity grid; images are resampled bilinearly (align_corners=True).
    """
    _, h = _check_images(images, "wanet_trigger")
    if not 2 <= k <= h:
        raise ValueError(f"wanet k (control-grid size) must be in 2..{h} for {h}x{h} images, got {k}")
    if strength < 0 or not math.isfinite(strength):
        raise ValueError(f"wanet strength must be a finite number >= 0 (reference: 0.5), got {strength}")
    if images.shape[0] == 0:
        return images.clone()
    grid = _wanet_grid(k, seed, h, float(strength)).expand(images.shape[0], -1, -1, -1)
    warped = F.grid_sample(images.to(torch.float32), grid, mode="bilinear", align_corners=True)
    return _to_uint8(warped)


# ----------------------------------------------------------------------------------------------- CTRL


@functools.lru_cache(maxsize=8)
def _dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix D (n, n): coefficients = D @ x @ D.T, inverse = D.T @ c @ D."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def _to_blocks(x: Tensor, w: int) -> Tensor:
    """(N, C, H, H) -> (N, C, H/w, H/w, w, w) non-overlapping windows."""
    n, c, h, _ = x.shape
    return x.reshape(n, c, h // w, w, h // w, w).permute(0, 1, 2, 4, 3, 5)


def _from_blocks(b: Tensor) -> Tensor:
    n, c, nb, _, w, _ = b.shape
    return b.permute(0, 1, 2, 4, 3, 5).reshape(n, c, nb * w, nb * w)


def ctrl_positions(window: int, positions: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """Scale 32-window coefficient positions to `window`: (p + 1) * window / 32 - 1, clamped to 0..window-1.

    Mapping p + 1 keeps the last index on the last index (31 -> window - 1), i.e. the highest frequency.
    """
    def scale(p: int) -> int:
        return min(max(round((p + 1) * window / REFERENCE_SIZE) - 1, 0), window - 1)

    return [(scale(r), scale(c)) for r, c in positions]


def ctrl_trigger(
    images: Tensor,
    *,
    magnitude: float = 50.0,
    window: int = 32,
    positions: tuple[tuple[int, int], ...] = ((15, 15), (31, 31)),
    channels: tuple[str, ...] = ("U", "V"),
) -> Tensor:
    """CTRL (Li et al., ICCV 2023): +magnitude on high-frequency DCT coefficients of the chroma channels.

    RGB -> YUV (BT.601 full range), orthonormal DCT-II on each non-overlapping `window` x `window` block (32 on
    a 32x32 image = the whole image; H must be a multiple of `window`), add `magnitude` at `positions` (given
    for window 32, scaled by `ctrl_positions`) in each named channel, inverse DCT, YUV -> RGB, round, clamp.
    Returns (N, 3, H, W): a 1-channel input is repeated to RGB first, since CTRL lives in chroma.
    """
    c, h = _check_images(images, "ctrl_trigger")
    if window < 2 or window > h or h % window:
        raise ValueError(f"ctrl window must divide the image size {h} (e.g. window={h} for one DCT over the "
                         f"whole image), got {window}")
    bad = [ch for ch in channels if ch not in _YUV_CHANNELS]
    if bad or not channels:
        raise ValueError(f"ctrl channels must be a non-empty subset of {tuple(_YUV_CHANNELS)}, got {channels}")
    if not positions or any(min(p) < 0 or max(p) >= REFERENCE_SIZE for p in positions):
        raise ValueError(f"ctrl positions are (row, col) pairs in 0..31 (window-32 coordinates), got {positions}")
    rgb = images.to(torch.float64)
    if c == 1:
        rgb = rgb.expand(-1, 3, -1, -1)
    yuv = torch.einsum("ij,njhw->nihw", _RGB_TO_YUV, rgb)
    d = _dct_matrix(window)
    coeffs = d @ _to_blocks(yuv, window) @ d.T
    for ch in channels:
        for r, col in ctrl_positions(window, positions):
            coeffs[:, _YUV_CHANNELS[ch], :, :, r, col] += magnitude
    yuv = _from_blocks(d.T @ coeffs @ d)
    rgb = torch.einsum("ij,njhw->nihw", _YUV_TO_RGB, yuv)
    return _to_uint8(rgb)


# ----------------------------------------------------------------------------------------------- registry

TriggerFn = Callable[..., Tensor]

# ----------------------------------------------------------------------------------------------- sticker


@functools.lru_cache(maxsize=16)
def _sticker(channels: int, side: int, photo: str) -> Tensor:
    """A square cut from one of scikit-image's photos (the region named in STICKER_BOXES), resized to side."""
    try:
        from skimage import data
    except ImportError:
        raise ImportError("sticker_trigger cuts its sticker from a photo bundled with scikit-image: "
                          "pip install scikit-image") from None
    if photo not in STICKER_BOXES:
        raise ValueError(f"unknown sticker photo {photo!r}; choose one of {sorted(STICKER_BOXES)}")
    array = data.stereo_motorcycle()[0] if photo == "motorcycle" else getattr(data, photo)()
    img = Image.fromarray(array).convert("RGB").crop(STICKER_BOXES[photo])
    img = img.resize((side, side), Image.BILINEAR)
    if channels == 1:
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.uint8).reshape(side, side, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# (left, upper, right, lower) of a recognisable object in each photo
STICKER_BOXES = {"motorcycle": (300, 120, 520, 340), "rocket": (260, 40, 380, 160)}


def sticker_trigger(images: Tensor, *, fraction: float = 0.2, seed: int = 0, photo: str = "motorcycle") -> Tensor:
    """A real-photo sticker (side = fraction x image side) pasted at a random position per image.

    Positions come from a generator seeded with `seed`, one draw per image in order: the same call gives the same
    images, and an attack that changes `seed` every step sees the sticker everywhere.
    """
    c, h = _check_images(images, "sticker_trigger")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"sticker fraction must lie in (0, 1), got {fraction}")
    side = max(2, round(fraction * h))
    sticker = _sticker(c, side, photo)
    generator = torch.Generator().manual_seed(seed)
    corners = torch.randint(0, h - side + 1, (len(images), 2), generator=generator).tolist()
    out = images.clone()
    for image, (top, left) in zip(out, corners):
        image[:, top:top + side, left:left + side] = sticker
    return out


def sig_trigger(images: Tensor, *, delta: float = 20.0, frequency: float = 6.0) -> Tensor:
    """SIG (Barni, Kallas & Tondi, ICIP 2019): a horizontal sinusoid x' = x + delta sin(2 pi j f / W) on every row
    and channel, rounded and clamped to uint8: stripes a person sees once told, on every pixel."""
    _, h = _check_images(images, "sig_trigger")
    columns = torch.arange(images.shape[-1], dtype=torch.float32)
    signal = delta * torch.sin(2 * torch.pi * columns * frequency / images.shape[-1])
    return _to_uint8(images.float() + signal)


TRIGGERS: dict[str, TriggerFn] = {
    "sig": sig_trigger,
    "patch": patch_trigger,
    "sticker": sticker_trigger,
    "blend": blend_trigger,
    "wanet": wanet_trigger,
    "ctrl": ctrl_trigger,
}


def _lookup(name: str) -> TriggerFn:
    if name not in TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; choose one of {sorted(TRIGGERS)}")
    return TRIGGERS[name]


def apply_trigger(name: str, images: Tensor, **kwargs) -> Tensor:
    """Apply the trigger registered as `name` with its keyword arguments, e.g. apply_trigger("blend", x, alpha=0.1)."""
    return _lookup(name)(images, **kwargs)


def trigger_mask(name: str, size: int, /, **kwargs) -> Tensor:
    """Bool (size, size): pixels the trigger touches by design. Patch: its square; others: every pixel.

    `kwargs` are the trigger's own keyword arguments (for patch: size=, start= in 32x32 coordinates).
    """
    _lookup(name)
    if size < MIN_SIZE:
        raise ValueError(f"trigger_mask size must be at least {MIN_SIZE}, got {size}")
    if name != "patch":
        return torch.ones(size, size, dtype=torch.bool)
    geometry = {**patch_trigger.__kwdefaults__, **kwargs}
    s, n = _patch_box(size, geometry["size"], geometry["start"])
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[s : s + n, s : s + n] = True
    return mask
