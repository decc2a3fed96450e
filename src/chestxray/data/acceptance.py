"""Which images are accepted for prediction (the app's uploads and the batch command's files alike).

    gray = read_image(data_or_path)     # decoded grayscale, or ImageRejected saying what is wrong

Format and dimensions come from the header first: a tiny file declaring a huge image (a
decompression bomb) is refused before any pixel is decoded. The status is what the API answers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from chestxray.data.preprocess import ImageError, ImageTooLarge, decode_image, image_dimensions, image_format

# Accepted image sides in pixels: smaller is too little detail for a chest X-ray, larger is not an X-ray export.
MIN_SIDE = 128
MAX_SIDE = 4096


class ImageRejected(ValueError):
    """An image that is not predicted: HTTP-like `status`, a short machine `code`, a `message` in words."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


def check_image(data: bytes) -> np.ndarray:
    """Decode image bytes to grayscale, or raise ImageRejected saying in words what is wrong."""
    if not data:
        raise ImageRejected(400, "empty_file", "the file is empty")
    if image_format(data) is None:
        raise ImageRejected(415, "unsupported_type",
                            "not a JPEG, PNG or DICOM image (GIF, PDF, text... are not accepted)")
    try:
        width, height = image_dimensions(data)
        if min(width, height) < MIN_SIDE:
            raise ImageRejected(422, "image_too_small",
                                f"image is {width}x{height} px; each side must be at least {MIN_SIDE} px")
        if max(width, height) > MAX_SIDE:
            raise ImageRejected(422, "image_too_large",
                                f"image is {width}x{height} px; each side must be at most {MAX_SIDE} px")
        return decode_image(data)
    except ImageTooLarge as exc:
        raise ImageRejected(422, "image_too_large", str(exc)) from None
    except ImageError as exc:
        raise ImageRejected(422, "unreadable_image", str(exc)) from None


def read_image(image: bytes | str | Path) -> np.ndarray:
    """check_image on bytes, or on a file's bytes (a file that cannot be read is rejected too)."""
    if isinstance(image, (str, Path)):
        try:
            image = Path(image).read_bytes()
        except OSError as exc:
            raise ImageRejected(400, "unreadable_file",
                                f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    return check_image(image)
