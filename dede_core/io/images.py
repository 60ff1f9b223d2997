"""Decode one encoded sample into a fixed-size uint8 tensor.

Every way the bytes can be bad ends in `ImageDecodeError` with a short message, so callers can record the
failure next to the sample key instead of crashing a shard (failures are data).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

FITS = ("resize", "pad")
CHANNELS = (1, 3)
# Formats we knowingly accept. Restricting Image.open keeps exotic plugins (EPS shells out to Ghostscript,
# TGA has no magic number and matches random bytes) away from untrusted corpora.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image; the message says what was wrong."""


@dataclass(frozen=True)
class View:
    """How one consumer sees an image: square side, channels (1 or 3), and how it reaches the side."""

    size: int
    channels: int
    fit: str = "resize"  # "resize": shorter side to size, centre crop; "pad": zero border when smaller

    def __post_init__(self) -> None:
        _check_args(self.size, self.channels, self.fit, 1)


def _check_args(size: int, channels: int, fit: str, max_pixels: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int (e.g. 32), got {size!r}")
    if channels not in CHANNELS:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _open(data: bytes) -> ImageFile.ImageFile:
    """Read the header only; raise ImageDecodeError for anything PIL cannot identify."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty bytes")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        # PIL's own hard limit (2x MAX_IMAGE_PIXELS) fires inside open(), before our check can run.
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a supported image (expected one of {', '.join(FORMATS)})") from None
    except Exception as e:  # PIL plugins raise many types (SyntaxError, struct.error, ...) on bad headers
        raise ImageDecodeError(f"corrupt image header: {type(e).__name__}: {e}") from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as stored in the header, before EXIF orientation; decodes no pixels."""
    with _open(data) as img:
        return img.size


def _eight_bit(img: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit int and float images to 'L' by scaling, not by PIL's clip-at-255 convert()."""
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        # 'I' is what 16-bit PNG/TIFF decode to in some PIL versions, so treat it as 0..65535 too.
        wide = np.clip(arr.astype(np.int64), 0, 65535)
        out = (wide * 255 + 32767) // 65535
    else:  # 'F': float images are 0..1 by convention; larger values are taken as already 0..255
        flt = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if flt.size and flt.min() >= 0.0 and flt.max() <= 1.0:
            flt = flt * 255.0
        out = np.rint(np.clip(flt, 0.0, 255.0))
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite onto black: fully transparent pixels often carry garbage colour that must not leak."""
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (0, 0, 0))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> 'L' (channels=1) or 'RGB' (channels=3)."""
    target = "L" if channels == 1 else "RGB"
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = _eight_bit(img)
    elif img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        img = _flatten_alpha(img)
    elif img.mode == "P":
        img = img.convert("RGB")  # palette may be colour; go via RGB so channels=1 gets proper luma
    elif img.mode not in ("L", "RGB", "1"):
        img = img.convert("RGB")  # CMYK, YCbCr, RGBX, LAB, HSV
    return img if img.mode == target else img.convert(target)


def _fit(img: Image.Image, size: int, fit: str) -> Image.Image:
    w, h = img.size
    if fit == "pad" and w <= size and h <= size:
        out = Image.new(img.mode, (size, size), 0)
        out.paste(img, ((size - w) // 2, (size - h) // 2))
        return out
    # Resizing the central square of side min(w, h) is "shorter side -> size, then center-crop" in one
    # resample; integer box offsets keep an exact-size crop pixel-exact.
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + s, top + s))


def _decode_opened(img: ImageFile.ImageFile, views: tuple[View, ...], max_pixels: int) -> list[np.ndarray]:
    """Header already parsed -> one (size, size) or (size, size, 3) uint8 array per view, from one decode."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image has empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError(f"decompression bomb: {w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    if img.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEGs straight from phone cameras
        # libjpeg can decode at 1/2, 1/4, 1/8 scale; draft() keeps both sides >= the largest view, so every
        # resize still has enough pixels while big photos decode several times faster.
        largest = max(view.size for view in views)
        img.draft(None, (largest, largest))
    img.load()  # force the full decode now so truncation surfaces here, not later
    ImageOps.exif_transpose(img, in_place=True)
    modes = {channels: _to_mode(img, channels) for channels in {view.channels for view in views}}
    # np.array copies: np.asarray of a PIL image is read-only
    return [np.array(_fit(modes[view.channels], view.size, view.fit), dtype=np.uint8) for view in views]


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(arr)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def decode_sample(data: bytes, views: tuple[View, ...], *, max_pixels: int = 64_000_000
                  ) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Encoded image bytes -> (one uint8 tensor (channels, size, size) per view, the (width, height) stored in the
    header), from one parse and one decode; ImageDecodeError on any bad input."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not views:
        raise ValueError("decode_sample needs at least one view")
    with _open(data) as src:
        stored = src.size  # before EXIF orientation, as image_size reports it
        try:
            arrays = _decode_opened(src, tuple(views), max_pixels)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(f"decompression bomb: {e}") from None
        except Exception as e:  # untrusted bytes: any decoder failure is a property of the sample
            msg = str(e) or type(e).__name__
            kind = "truncated image" if "truncated" in msg else "corrupt image data"
            raise ImageDecodeError(f"{kind}: {msg}") from None
    return [_to_tensor(arr) for arr in arrays], stored


def decode_views(data: bytes, views: tuple[View, ...], *, max_pixels: int = 64_000_000) -> list[torch.Tensor]:
    """Encoded image bytes -> one uint8 tensor (channels, size, size) per view, decoded once;
    ImageDecodeError on any bad input. The victim encoder and the detector each get their own view."""
    return decode_sample(data, views, max_pixels=max_pixels)[0]


def decode_image(
    data: bytes, *, size: int, channels: int, fit: str = "resize", max_pixels: int = 64_000_000
) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (channels, size, size); ImageDecodeError on any bad input."""
    _check_args(size, channels, fit, max_pixels)
    return decode_views(data, (View(size, channels, fit),), max_pixels=max_pixels)[0]


def fit_tensor(images: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 images (N, C, H, W), already decoded, -> (N, view.channels, view.size, view.size) through the same
    mode conversion and fit as decode_views, so in-memory images reach a model exactly as their PNGs would."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in CHANNELS:
        raise ValueError(f"expected uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    out = []
    for image in images:
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        out.append(_to_tensor(np.array(_fit(_to_mode(pil, view.channels), view.size, view.fit), dtype=np.uint8)))
    return torch.stack(out) if out else torch.empty(0, view.channels, view.size, view.size, dtype=torch.uint8)
