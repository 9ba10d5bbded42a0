"""Encoded image bytes -> validated, decoded, fitted uint8 (H, W, C) array.

Two steps: :func:`open_image` reads the header and checks the limits before any pixel is
decoded (decompression bombs); :func:`load_image` decodes, on the event loop for small images
and in the engine's thread pool for large ones (Pillow releases the GIL while decoding). Large
JPEGs are decoded at a reduced scale with ``draft()`` (DCT scaling), far cheaper than decoding
then resizing.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError

from igcv2.data import fit_image
from igcv2.store import InputSpec
from service.errors import BadInput, TooLarge, UnsupportedMediaType

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# Declared types we try to decode; anything else that is not image/* is refused with 415.
GENERIC_TYPES = ("application/octet-stream", "")


def check_media_type(content_type: str | None) -> None:
    """415 unless the declared type is an image (or says nothing specific)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if not media.startswith("image/") and media not in GENERIC_TYPES:
        raise UnsupportedMediaType(f"unsupported media type {media!r}: send image/* (PNG, JPEG, GIF, WebP, BMP, TIFF)")


@contextmanager
def client_errors(name: str, max_pixels: int) -> Iterator[None]:
    """Map whatever Pillow raises on hostile bytes to the client's 400 / 413, never a 500.

    Pillow's own bomb check follows our limit (:func:`open_image`): it errors above twice the limit
    (a backstop, e.g. for a frame it seeks to); between, it only warns, and our check of the declared
    size answers with the exact sizes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except TooLarge:
        raise
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"{name}: over the limit of {max_pixels} pixels: {exc}") from exc  # name OUR limit
    except UnidentifiedImageError as exc:
        raise BadInput(f"{name}: not a decodable image (supported: {', '.join(FORMATS)})") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, IndexError, TypeError) as exc:
        raise BadInput(f"{name}: corrupt or truncated image ({exc})") from exc
    except Exception as exc:  # Pillow on hostile bytes raises more (struct.error, AttributeError from a broken
        # EXIF block re-serialised by exif_transpose): still the client's bad input, never a 500
        raise BadInput(f"{name}: corrupt image metadata ({type(exc).__name__}: {exc})") from exc


def open_image(data: bytes, spec: InputSpec, max_pixels: int, name: str = "image") -> Image.Image:
    """Read the header and check every limit; no pixel is decoded yet (cheap: tens of µs)."""
    if not data:
        raise BadInput(f"{name}: empty file")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's default, 89.5M, would refuse what a higher limit allows
    with client_errors(name, max_pixels):
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise TooLarge(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
        # fit_image scales the shorter side up to the input: an 855-byte 1x400000 PNG would become a
        # 28x11200000 image in memory. The fitted size obeys the limit too (or the input's own size).
        scale = max(spec.width / max(width, 1), spec.height / max(height, 1))
        fitted = max(spec.width, round(width * scale)) * max(spec.height, round(height * scale))
        if fitted > max(max_pixels, spec.width * spec.height):
            raise TooLarge(
                f"{name}: {width}x{height} would be resized to {fitted} pixels to fit the "
                f"{spec.width}x{spec.height} input; the limit is {max_pixels} pixels"
            )
        return image


def load_image(image: Image.Image, spec: InputSpec, max_pixels: int, name: str = "image") -> np.ndarray:
    """Decode an :func:`open_image` result and fit it to ``spec``."""
    with client_errors(name, max_pixels):
        if image.format == "JPEG":
            image.draft("L" if spec.channels == 1 else "RGB", (spec.width, spec.height))
        image.seek(0)  # animated images: the first frame
        image.load()
        return fit_image(image, spec.height, spec.width, spec.channels)


def decode_image(data: bytes, spec: InputSpec, max_pixels: int, name: str = "image") -> np.ndarray:
    """Decode ``data`` and fit it to the model input ``spec``; raise 400/413/415 errors."""
    return load_image(open_image(data, spec, max_pixels, name), spec, max_pixels, name)
