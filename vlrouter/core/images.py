"""Open screenshots safely: one function used by datasets, the encoder and the engine.

Refuses, before decoding pixels, images whose header claims an absurd size
(decompression bombs), and turns every PIL failure into an :class:`ImageError`
that names the file and what to do.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image

from vlrouter.core.errors import ImageError, located

# 8K x 8K is far beyond any screenshot; Qwen resizes to its pixel budget anyway.
MAX_PIXELS = 64_000_000
MAX_SIDE = 16_384


def _check_size(width: int, height: int, where: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(located(where, None, f"image has an empty size {width}x{height}", fix="re-export it"))
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageError(
            located(
                where,
                None,
                f"image is {width}x{height} pixels, over the limit of {MAX_PIXELS:,} pixels "
                f"or {MAX_SIDE}px a side (refused before decoding: possible decompression bomb)",
                fix="downscale the screenshot",
            )
        )


def open_image(source: str | Path | bytes | Image.Image, *, where: str | None = None) -> Image.Image:
    """Return an RGB PIL image from a path, raw bytes or a PIL image.

    ``where`` names the source in errors (e.g. ``data/cal/train.jsonl:12 image``).
    """
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, where or "<PIL image>")
        return source.convert("RGB") if source.mode != "RGB" else source
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
            except Exception as e:  # truncated / corrupt data
                raise ImageError(
                    located(label, None, f"corrupt image data ({type(e).__name__}: {e})", fix="re-export the file")
                ) from None
            return img.convert("RGB")
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
