import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dede_core.io.images import ImageDecodeError, View, decode_image, decode_sample, decode_views, image_size


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_pixels(h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.RandomState(0).randint(0, 256, (h, w, 3), dtype=np.uint8)


def png_with_ihdr_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim width x height (CRC fixed up)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])  # type(4) + body(13)
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_png_round_trip_is_exact():
    pixels = rgb_pixels()
    out = decode_image(encode(Image.fromarray(pixels)), size=32, channels=3)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), pixels)
    gray = pixels[..., 0]
    out = decode_image(encode(Image.fromarray(gray)), size=32, channels=1)
    assert np.array_equal(out[0].numpy(), gray)


def test_jpeg_round_trip_is_close():
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    pixels = np.stack([smooth, smooth.T, np.full_like(smooth, 128)], axis=-1)
    out = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95), size=32, channels=3)
    assert np.abs(out.permute(1, 2, 0).numpy().astype(int) - pixels).mean() < 3


@pytest.mark.parametrize(
    "make, fmt, expected",
    [
        (lambda: Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
        (lambda: Image.fromarray(np.full((12, 20), 65535, np.uint16)), "PNG", (255, 255, 255)),
        (lambda: Image.fromarray(np.full((12, 20), 32896, np.uint16)), "TIFF", (128, 128, 128)),
        (lambda: Image.fromarray(np.full((12, 20), 65535, np.int32)), "TIFF", (255, 255, 255)),
        (lambda: Image.fromarray(np.full((12, 20), 0.5, np.float32)), "TIFF", (128, 128, 128)),
        (lambda: Image.new("RGB", (20, 12), (0, 0, 255)).convert("P"), "PNG", (0, 0, 255)),
        (lambda: Image.new("LA", (20, 12), (200, 0)), "PNG", (0, 0, 0)),
        (lambda: Image.new("LA", (20, 12), (200, 255)), "PNG", (200, 200, 200)),
        (lambda: Image.new("RGBA", (20, 12), (255, 0, 0, 0)), "PNG", (0, 0, 0)),
        (lambda: Image.new("RGBA", (20, 12), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        (lambda: Image.new("1", (20, 12), 1), "PNG", (255, 255, 255)),
        (lambda: Image.new("L", (20, 12), 77), "PNG", (77, 77, 77)),
        (lambda: Image.new("RGB", (20, 12), (10, 20, 30)), "BMP", (10, 20, 30)),
        (lambda: Image.new("RGB", (20, 12), (10, 20, 30)), "WEBP", None),
        (lambda: Image.new("RGB", (20, 12), (10, 20, 30)).convert("P"), "GIF", None),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_modes_decode_to_expected_values(make, fmt, expected, channels):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(make(), fmt, **kw), size=8, channels=channels)
    assert out.dtype == torch.uint8 and out.shape == (channels, 8, 8)
    if expected is None:
        return
    if channels == 3:
        assert out[:, 4, 4].tolist() == list(expected)
    else:
        luma = round(0.299 * expected[0] + 0.587 * expected[1] + 0.114 * expected[2])
        assert abs(out[0, 4, 4].item() - luma) <= 1


def test_palette_transparency_composites_onto_black():
    img = Image.new("P", (10, 10), 1)
    img.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)
    img.paste(0, (0, 0, 5, 10))  # left half index 0 = transparent white
    out = decode_image(encode(img, "PNG", transparency=0), size=10, channels=3)
    assert out[:, :, :5].max() == 0
    assert out[:, 5, 7].tolist() == [0, 255, 0]


def test_exif_orientation_is_applied():
    pixels = np.zeros((16, 32, 3), np.uint8)  # landscape, left half bright
    pixels[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewer rotates 90 degrees clockwise
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    assert image_size(data) == (32, 16)
    out = decode_image(data, size=16, channels=1, fit="pad")
    # After a clockwise turn the bright left half becomes the top half of a 16x32 portrait.
    assert out[0, :4].float().mean() > 200 and out[0, -4:].float().mean() < 50


def test_pad_centres_small_image_with_zero_border():
    img = np.full((28, 28), 200, np.uint8)
    out = decode_image(encode(Image.fromarray(img)), size=32, channels=1, fit="pad")
    assert out.shape == (1, 32, 32)
    assert (out[0, 2:30, 2:30] == 200).all()
    border = out[0].clone()
    border[2:30, 2:30] = 0
    assert border.max() == 0


def test_pad_falls_back_to_resize_for_large_images():
    data = encode(Image.new("L", (64, 64), 90))
    assert torch.equal(decode_image(data, size=32, channels=1, fit="pad"),
                       decode_image(data, size=32, channels=1, fit="resize"))


def test_resize_non_square_keeps_centre():
    pixels = np.zeros((40, 80), np.uint8)  # wide image: only the centre 40x40 survives the crop
    pixels[:, 20:60] = 255
    data = encode(Image.fromarray(pixels))
    assert image_size(data) == (80, 40)
    out = decode_image(data, size=20, channels=1)
    assert out.shape == (1, 20, 20)
    # The antialiasing filter reaches one source pixel past the crop, so only the edge columns dim.
    assert out[0, :, 1:-1].min() == 255 and out.min() > 200


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (np.random.RandomState(1).bytes(500), "not a supported image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a supported image"),
    ],
)
def test_bad_bytes_raise(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(data, size=8, channels=3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_raises(fmt):
    data = encode(Image.fromarray(rgb_pixels(64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2], size=8, channels=3)


def test_bombs_are_rejected_before_decoding():
    with pytest.raises(ImageDecodeError, match="decompression bomb"):  # PIL's own hard limit
        decode_image(png_with_ihdr_size(30000, 30000), size=8, channels=3)
    with pytest.raises(ImageDecodeError, match="decompression bomb: 5000x5000"):  # our limit, below PIL's
        decode_image(png_with_ihdr_size(5000, 5000), size=8, channels=3, max_pixels=1_000_000)
    assert image_size(png_with_ihdr_size(5000, 5000)) == (5000, 5000)


@pytest.mark.parametrize(
    "kw", [{"fit": "stretch"}, {"channels": 4}, {"size": 0}, {"size": 3.5}, {"max_pixels": 0}]
)
def test_bad_arguments_raise_value_error(kw):
    args = {"size": 8, "channels": 3, **kw}
    with pytest.raises(ValueError) as info:
        decode_image(encode(Image.new("RGB", (4, 4))), **args)
    assert not isinstance(info.value, ImageDecodeError)


def _check_never_crashes(data: bytes) -> None:
    try:
        out = decode_image(data, size=8, channels=3, max_pixels=1_000_000)
    except ImageDecodeError:
        return
    assert out.dtype == torch.uint8 and out.shape == (3, 8, 8)


VALID_PNG = encode(Image.fromarray(rgb_pixels(12, 12)).convert("RGBA"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data):
    _check_never_crashes(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID_PNG) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(8, len(VALID_PNG)))
def test_mutated_png_never_crashes(edits, length):
    data = bytearray(VALID_PNG[:length])
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    _check_never_crashes(bytes(data))


def test_decode_sample_gives_the_views_and_the_stored_size_from_one_decode():
    # An EXIF-rotated JPEG: the views are turned upright, the size is the one stored in the header.
    img = Image.fromarray(rgb_pixels(16, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    views = (View(8, 1), View(12, 3, "pad"))
    tensors, stored = decode_sample(data, views)
    assert stored == image_size(data) == (40, 16)
    assert all(torch.equal(a, b) for a, b in zip(tensors, decode_views(data, views)))
    assert [tuple(t.shape) for t in tensors] == [(1, 8, 8), (3, 12, 12)]
    with pytest.raises(ImageDecodeError):
        decode_sample(data[:40], views)
