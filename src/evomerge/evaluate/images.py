"""Images of image-grounded tasks: decoded once at task load, identified by their pixels.

A row's `image_field` holds either a path (relative to the data file that row came from) or a
base64-encoded PNG (optionally as a `data:image/png;base64,` URL). Every image is decoded and checked
when the task loads, so a missing or corrupt image fails in one sentence before any model is loaded,
and the search never decodes an image twice.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import TaskError

_DATA_URL = "data:image/png;base64,"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class TaskImage:
    """One decoded RGB image and the sha256 of its pixels (size + RGB bytes).

    The digest is of the decoded pixels, not of the file, so the same picture stored twice (another
    path, base64 in the row, a re-encoded PNG) is still recognised as the same image.
    """

    image: object  # a PIL.Image.Image in RGB mode (PIL is imported lazily, like every optional reader)
    digest: str


def _png_bytes(value: str, where: str) -> bytes | None:
    """The PNG bytes of a base64 value, or None when the value is a path.

    A `data:` URL must be valid base64; a bare string counts as base64 only when it decodes to PNG
    bytes (its first bytes are the PNG signature), so no file name is ever mistaken for an image.
    """
    if value.startswith(_DATA_URL):
        try:
            return base64.b64decode(value.removeprefix(_DATA_URL), validate=True)
        except (binascii.Error, ValueError):
            raise TaskError(f"{where}: the image data URL is not valid base64") from None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw.startswith(_PNG_MAGIC) else None


def load_image(value: object, data_file: Path, where: str) -> TaskImage:
    """Decode a row's image (a path relative to `data_file`, or base64 PNG); `where` names the row in errors."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str) or not value:
        raise TaskError(f"{where}: the image field must be a file path or a base64 PNG string, got {value!r}")
    raw = _png_bytes(value, where)
    if raw is None:
        path = data_file.parent / value
        if not path.is_file():
            raise TaskError(f"{where}: image file {path} does not exist")
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise TaskError(f"{where}: image file {path} cannot be read ({error.strerror})") from None
        source = f"image file {path}"
    else:
        source = "the base64 image"
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            image = opened.convert("RGB")  # decodes fully: a truncated file fails here, not in the search
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise TaskError(f"{where}: {source} is not a readable image ({error})") from None
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
    return TaskImage(image, digest)


__all__ = ["TaskImage", "load_image"]
