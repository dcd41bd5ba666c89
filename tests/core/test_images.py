"""Opening screenshots: every mode comes out as the RGB a viewer shows, arrays work, FIFOs and slivers are refused."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_dataset
from vlrouter.core.data import read_adapter_dataset, verify_image
from vlrouter.core.errors import ImageError
from vlrouter.core.images import open_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_a_16_bit_greyscale_png_keeps_its_greys(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    path.write_bytes(_png(Image.fromarray(ramp)))
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_image(path)).astype(float)
    assert rgb.shape == (32, 64, 3)
    assert abs(rgb.mean() - 127.5) < 2  # PIL's convert("RGB") clips to 255: an all-white image
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


@pytest.mark.parametrize("mode,value,expected", [
    ("I;16", 32768, (128, 128, 128)),
    ("I", 65535, (255, 255, 255)),
    ("I", 100, (100, 100, 100)),  # an 8-bit range stored as 32-bit ints stays as it is
    ("F", 0.5, (128, 128, 128)),  # a 0..1 float image
    ("F", 1.0, (255, 255, 255)),  # 1.0 is the top of a 0..1 float image: white
    ("F", 1.5, (2, 2, 2)),  # over 1: a 0..255 float image, kept as it is
    ("F", float("nan"), (0, 0, 0)),  # NaN pixels show black
    ("I", 1, (1, 1, 1)),  # a dark 32-bit int image is not a 0..1 image
    ("I", 256, (1, 1, 1)),  # over 255: a 16-bit range, scaled down like I;16
    ("I", 255, (255, 255, 255)),  # 255 is still the 8-bit range
    ("F", 300.0, (255, 255, 255)),  # a 0..255 float image clips at white, never wraps to black
    ("LA", (0, 0), (255, 255, 255)),  # fully transparent: the white a viewer shows, not black
    ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
    ("P", 0, (0, 0, 0)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("LAB", (100, 128, 128), (93, 93, 93)),  # L*=39 grey, not read as if it were RGB (100, 128, 128)
    ("1", 1, (255, 255, 255)),
], ids=["i16", "i32-16bit", "i32-8bit", "float", "float-white", "float-0-255", "float-nan", "i32-dark", "i32-256",
        "i32-255", "float-over-255",
        "la-transparent", "rgba", "palette", "cmyk", "lab", "bilevel"])
def test_every_mode_becomes_the_rgb_a_viewer_shows(mode, value, expected):
    px = open_image(Image.new(mode, (8, 8), value)).getpixel((3, 3))
    assert all(abs(a - b) <= 2 for a, b in zip(px, expected)), (mode, px)


def test_a_palette_image_with_a_transparent_colour_shows_white_there():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([10, 20, 30, 200, 0, 0])
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0  # palette entry 0 is transparent
    rgb = open_image(img)
    assert rgb.getpixel((3, 3)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (200, 0, 0)


def test_numpy_arrays_are_images():
    assert open_image(np.eye(4, dtype=bool)).getpixel((1, 1)) == (255, 255, 255)  # True: white
    assert open_image(np.eye(4, dtype=bool)).getpixel((0, 1)) == (0, 0, 0)
    assert open_image(np.zeros((20, 30, 3), dtype=np.uint8)).size == (30, 20)
    assert open_image(np.ones((20, 30))).getpixel((0, 0)) == (255, 255, 255)  # float 0..1
    assert open_image(np.full((4, 4, 4), 255, dtype=np.uint8)).mode == "RGB"
    assert open_image(np.full((4, 4, 1), 200, dtype=np.uint8)).getpixel((2, 2)) == (200, 200, 200)  # H x W x 1
    assert open_image(np.zeros((4, 4))).getpixel((0, 0)) == (0, 0, 0)  # float 0 is black, exactly
    assert open_image(np.array([[-3, 0], [7, 300]], dtype=np.int32)).getpixel((0, 0)) == (0, 0, 0)  # clipped
    with pytest.raises(ImageError, match="array of shape"):
        open_image(np.zeros((2, 3, 5), dtype=np.uint8))
    with pytest.raises(ImageError, match="over the limit"):
        open_image(np.zeros((20000, 2), dtype=np.uint8))


def test_a_fifo_is_an_image_error_at_once(tmp_path):
    fifo = tmp_path / "shot.png"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="FIFO"):
        open_image(fifo)
    assert time.perf_counter() - t0 < 1
    assert verify_image(fifo) == "missing"  # in a dataset: skipped and counted, never opened


def test_a_very_wide_image_is_refused_and_skipped_in_a_dataset(tmp_path):
    with pytest.raises(ImageError, match="aspect ratio over 200:1"):
        open_image(Image.new("RGB", (8000, 20)))
    path = make_dataset(tmp_path / "cal", "calendar", 3)
    Image.new("RGB", (8000, 20)).save(tmp_path / "cal" / "images" / "calendar-0-0001.png")
    samples, skipped = read_adapter_dataset(path, adapter="calendar")
    assert len(samples) == 2 and skipped.corrupt == ["calendar-0-0001"]  # a counted skip, not an abort


def test_a_16_bit_array_is_scaled_onto_8_bits_like_a_16_bit_png():
    arr = np.array([[0, 257], [32768, 65535]], dtype=np.uint16)
    assert np.asarray(open_image(arr))[:, :, 0].tolist() == [[0, 1], [128, 255]]


@pytest.mark.parametrize("as_pil", [False, True], ids=["array", "float-image"])
def test_nan_and_infinite_pixels_show_black_and_leave_the_other_pixels_alone(as_pil):
    arr = np.array([[0.5, np.nan], [np.inf, -np.inf]], dtype=np.float32)
    src = Image.fromarray(arr, "F") if as_pil else arr
    # 0.5 in a 0..1 image is mid-grey; a bad pixel neither turns white nor changes the image's range
    assert np.asarray(open_image(src))[:, :, 0].tolist() == [[128, 0], [0, 0]]


@pytest.mark.parametrize("mode,value,expected", [
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: exactly white
    ("LA", (0, 0), (255, 255, 255)),
    ("RGBA", (255, 0, 0, 128), (255, 127, 127)),  # half transparent red over white
    ("LA", (0, 128), (127, 127, 127)),
])
def test_transparency_is_composited_onto_exact_white(mode, value, expected):
    assert open_image(Image.new(mode, (4, 4), value)).getpixel((1, 1)) == expected


def _open_quietly(source) -> list[str]:
    """Open ``source`` (errors swallowed; what it dropped is freed on return) and return the warnings it left."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            open_image(source)
        except ImageError:
            pass
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def test_an_opened_file_is_closed_whether_it_decodes_or_not(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:40])
    for path in (good, broken):
        assert _open_quietly(path) == []  # no "unclosed file" ResourceWarning: a dataset scan leaks no handles
    assert _open_quietly(good.read_bytes()) == []


def test_a_decompression_bomb_is_an_image_error_and_no_warning(tmp_path):
    from tests.core.test_image_limits import _png_claiming

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(10_000, 10_000))  # 100 Mpx: over PIL's own warning threshold too
    with pytest.raises(ImageError, match="refused before decoding"):
        open_image(bomb)
    assert _open_quietly(bomb) == []  # PIL's DecompressionBombWarning is turned into the error, never printed


def test_integer_and_0_255_float_arrays_keep_their_values_clipped_to_8_bits():
    ints = np.array([[-3, 0], [7, 300]], dtype=np.int32)
    assert np.asarray(open_image(ints))[:, :, 1].tolist() == [[0, 0], [7, 255]]
    floats = np.array([[0.4, 1.5], [100.0, 300.0]])  # over 1: a 0..255 float image, kept as it is
    assert np.asarray(open_image(floats))[:, :, 1].tolist() == [[0, 2], [100, 255]]


@pytest.mark.parametrize("shape,size", [((2, 20_000), "20000x2"), ((20_000, 2), "2x20000"), ((1, 300), "300x1")])
def test_an_array_too_large_or_too_elongated_is_refused_naming_its_width_first(shape, size):
    with pytest.raises(ImageError, match=f"image is {size} pixels"):
        open_image(np.zeros(shape, dtype=np.uint8))


def test_exactly_64_million_pixels_is_a_screenshot_and_one_row_more_is_not():
    from vlrouter.core.images import size_problem

    assert size_problem(8000, 8000) is None  # README: refused when the header claims > 64 Mpx
    assert "over the limit of 64,000,000 pixels" in size_problem(8000, 8001)[0]


def test_an_array_that_is_not_numpy_is_refused_naming_its_type():
    import torch

    with pytest.raises(ImageError, match="cannot use a Tensor as an image .*a numpy array"):
        open_image(torch.zeros(4, 4, 3))  # has .ndim, but is not a numpy array: convert it first


def test_an_aspect_ratio_of_exactly_200_to_1_opens_and_a_pixel_more_is_refused():
    from vlrouter.core.images import size_problem

    assert size_problem(4000, 20) is None and size_problem(20, 4000) is None
    assert "aspect ratio over 200:1" in size_problem(4001, 20)[0]


def test_without_a_file_name_an_error_says_what_was_refused():
    with pytest.raises(ImageError) as e:
        open_image(np.zeros((2, 3, 5), dtype=np.uint8))
    assert str(e.value).startswith("<numpy array>: ")
    with pytest.raises(ImageError) as e:
        open_image(b"not a png")
    assert str(e.value).startswith("<image bytes>: ")
    with pytest.raises(ImageError) as e:
        open_image(b"not a png", where="train.jsonl:3 image")
    assert str(e.value).startswith("train.jsonl:3 image: ")


def test_a_float_array_just_over_1_is_a_0_255_image():
    assert open_image(np.full((2, 2), 1.5)).getpixel((0, 0)) == (2, 2, 2)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    img.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; a viewer rotates 90 degrees clockwise
    path = tmp_path / "photo.png"
    img.save(path, exif=exif)
    shown = open_image(path)
    assert shown.size == (4, 8) and shown.getpixel((3, 0)) == (0, 0, 255)  # top-left corner went top-right


@pytest.mark.parametrize("dtype", [np.complex128, np.dtype("datetime64[s]"), np.dtype("U1")])
def test_an_array_of_a_dtype_that_is_not_pixels_is_refused(dtype):
    import re

    name = re.escape(str(np.dtype(dtype)))
    with pytest.raises(ImageError, match=f"array of dtype {name} is not an image .*H x W x 3"):
        open_image(np.zeros((4, 4), dtype=dtype))
