"""Open screenshots safely: one function used by datasets, the encoder and the engine.

Refuses, before decoding pixels, images whose header claims an absurd size
(decompression bombs) or shape (an aspect ratio the processor cannot resize), never
opens a FIFO or a device, and turns every PIL failure into an :class:`ImageError`
that names the file and what to do. Every mode becomes the 8-bit RGB a viewer shows:
16-bit and float greyscale are scaled (not clipped to white), transparency is
composited onto white, EXIF orientation is applied. Numpy arrays (``H x W``,
``H x W x 1|3|4``) are accepted too.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from vlrouter.core.errors import ImageError, located
from vlrouter.core.paths import check_regular_file

# 8K x 8K is far beyond any screenshot; Qwen resizes to its pixel budget anyway.
MAX_PIXELS = 64_000_000
MAX_SIDE = 16_384
MAX_ASPECT = 200  # Qwen's image processor refuses images more elongated than 200:1


def size_problem(width: int, height: int) -> tuple[str, str] | None:
    """``(problem, fix)`` when an image of this size cannot be a screenshot the model reads, else None."""
    if width <= 0 or height <= 0:
        return f"image has an empty size {width}x{height}", "re-export it"
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        return (f"image is {width}x{height} pixels, over the limit of {MAX_PIXELS:,} pixels or {MAX_SIDE}px a side "
                "(refused before decoding: possible decompression bomb)", "downscale the screenshot")
    if max(width, height) > MAX_ASPECT * min(width, height):
        return (f"image is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT}:1 that the Qwen3-VL "
                "processor cannot resize", "crop it to the part of the screen that matters")
    return None


def _check_size(width: int, height: int, where: str) -> None:
    problem = size_problem(width, height)
    if problem:
        raise ImageError(located(where, None, problem[0], fix=problem[1]))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows ``img``: high-bit-depth greyscale scaled down (``I;16`` -> ``convert``
    would clip everything above 255 to white), transparency composited onto white."""
    import numpy as np

    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "La":  # premultiplied alpha: PIL converts it only to LA
        img, mode = img.convert("LA"), "LA"
    if mode == "LAB":  # PIL's plain convert treats L*a*b* as if it were RGB
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                              "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_srgb)
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        top = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and top > 255):
            arr = arr / 257.0  # 16-bit range onto 8 bits
        elif mode == "F" and top <= 1.0:
            arr = arr * 255.0  # a 0..1 float image
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def from_array(arr, where: str) -> Image.Image:
    """A numpy array (``H x W`` or ``H x W x 1|3|4``; uint8, uint16, bool or float in 0..1 or 0..255) as RGB."""
    import numpy as np

    fix = "pass an H x W x 3 uint8 array (or a PIL image / a path)"
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(located(where, None, f"array of shape {tuple(arr.shape)} is not an image", fix=fix))
    _check_size(int(arr.shape[1]), int(arr.shape[0]), where)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = np.rint(arr / 257.0).astype(np.uint8)
    elif arr.dtype.kind in "fiu" and arr.dtype != np.uint8:
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.dtype.kind == "f" and a.size and a.max() <= 1.0:
            a = a * 255.0
        arr = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(located(where, None, f"array of dtype {arr.dtype} is not an image", fix=fix))
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode))


def open_image(source, *, where: str | None = None) -> Image.Image:
    """Return an RGB PIL image from a path, raw bytes, a PIL image or a numpy array.

    ``where`` names the source in errors (e.g. ``data/cal/train.jsonl:12 image``).
    """
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, where or "<PIL image>")
        return to_rgb(source)
    if type(source).__module__ == "numpy" and hasattr(source, "ndim"):
        return from_array(source, where or "<numpy array>")
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    if not isinstance(source, (bytes, str, Path)):
        raise ImageError(located(where, None, f"cannot use a {type(source).__name__} as an image",
                                 fix="pass a PIL image, a path, bytes or a numpy array"))
    if isinstance(source, bytes):
        label = where or "<image bytes>"
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        label = where or str(path)
        if not path.exists():
            raise ImageError(located(label, None, f"image file not found: {path}", fix="check the path"))
        if path.is_dir():
            raise ImageError(located(label, None, f"{path} is a folder, not an image", fix="point at a PNG/JPEG file"))
        check_regular_file(path, what="image", where=label, error=ImageError, fix="point at a PNG/JPEG file")
        fp = path.open("rb")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(fp)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise ImageError(
                    located(label, None, f"refused before decoding: {e}", fix="downscale the screenshot")
                ) from None
            _check_size(img.width, img.height, label)
            try:
                img.load()
                img = ImageOps.exif_transpose(img) or img
            except Exception as e:  # truncated / corrupt data
                raise ImageError(
                    located(label, None, f"corrupt image data ({type(e).__name__}: {e})", fix="re-export the file")
                ) from None
            return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError, ...
        raise ImageError(
            located(label, None, f"cannot open image ({type(e).__name__}: {e})", fix="use a valid PNG or JPEG")
        ) from None
    finally:
        if not isinstance(source, bytes):
            fp.close()


def image_digest(img: Image.Image) -> str:
    """Content hash of decoded pixels (mode, size, bytes): the image part of feature-cache keys."""
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()
