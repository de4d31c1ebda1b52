"""Opening the images a sample refers to, the same way in training and in data validation.

A sample holds image *references*, decoded only when needed:
- a hub row's image, ``{"bytes": ..., "path": ...}`` (the dataset is read with ``Image(decode=False)``),
- the path of a file (jsonl datasets; checked to lie inside the image folder when the file is read),
- or a PIL image, used as it is.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

ImageRef = Any  # dict with "bytes" / "path", a path (str or Path), or a PIL image


class BadImageError(ValueError):
    """An image that cannot be used, with what to do about it."""


def load_image(ref: ImageRef) -> Image.Image:
    """Decode an image fully (a truncated file fails here, not halfway through a resize)."""
    if isinstance(ref, Image.Image):
        return ref
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; such an image is refused all the same.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(ref)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImageError(
                f"{error} It is over PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = "
                f"{Image.MAX_IMAGE_PIXELS:,} pixels): resize it, or drop the sample."
            ) from None
        except Image.UnidentifiedImageError:
            raise BadImageError("not an image file PIL can read (empty, or another format): replace it.") from None
        except OSError as error:  # truncated or corrupt data
            raise BadImageError(f"corrupt or truncated image data ({error}): replace the file.") from None


def image_label(number: int, ref: ImageRef) -> str:
    """How messages name a sample's image: its number in the sample, and its path when it has one."""
    path = ref.get("path") if isinstance(ref, dict) else ref if isinstance(ref, (str, Path)) else None
    return f"image {number} ({path})" if path else f"image {number}"


def load_sample_image(number: int, ref: ImageRef) -> Image.Image:
    """``load_image``, the error naming the image as ``image_label`` does."""
    try:
        return load_image(ref)
    except BadImageError as error:
        raise BadImageError(f"{image_label(number, ref)}: {error}") from None


def _decode(ref: ImageRef) -> Image.Image:
    if isinstance(ref, dict):
        if ref.get("bytes") is None:
            # A path-only entry would make datasets open a file named by the data, anywhere on this machine.
            raise BadImageError(
                f"the image holds no data, only a path ({ref.get('path')!r}); hub datasets must embed their images."
            )
        return datasets.Image().decode_example(ref)  # exactly as datasets decodes (EXIF orientation included)
    path = Path(ref)
    if not path.is_file():
        raise BadImageError(f"{path} does not exist.")
    with Image.open(path) as image:
        image.load()
    return image
