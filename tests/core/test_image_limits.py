"""The screenshot size guard (README: refused when the header claims > 64 Mpx or > 16384 px a side):
exactly at a limit is a screenshot, one pixel over is refused before decoding."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from vlrouter.core.errors import ImageError
from vlrouter.core.images import open_image


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming ``width`` x ``height`` (no real pixel data: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(16_384, 82), (82, 16_384)])  # aspect 199.8:1, under the 200:1 limit
def test_a_side_of_exactly_16384_pixels_opens(size):
    assert open_image(Image.new("L", size)).size == size


@pytest.mark.parametrize("size", [(16_385, 1), (1, 16_385), (5213, 12_277)])  # 5213 x 12277 = 64,000,001
def test_one_pixel_over_a_limit_is_refused_before_decoding(size):
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(_png_claiming(*size))


@pytest.mark.parametrize("size", [(16_385, 1), (1, 16_385)])
def test_a_pil_image_one_pixel_too_long_is_refused(size):
    with pytest.raises(ImageError, match="decompression bomb") as e:
        open_image(Image.new("L", size))
    assert str(e.value).startswith("<PIL image>: ")  # what was refused, when no file names it


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_an_empty_image_is_refused(size):
    with pytest.raises(ImageError, match="empty size"):
        open_image(Image.new("RGB", size))


def test_the_refusal_names_the_size_width_first():
    with pytest.raises(ImageError, match="16385x2 pixels"):
        open_image(Image.new("L", (16_385, 2)))
    with pytest.raises(ImageError, match="2x16385 pixels"):
        open_image(_png_claiming(2, 16_385))
