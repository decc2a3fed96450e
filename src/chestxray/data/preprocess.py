"""The one preprocessing path shared by training, evaluation, the app and the batch CLI.

An image of any size and format becomes a ``(size, size, 3)`` float32 array of raw pixel values
in [0, 255]. The backbone's own scaling (e.g. Xception's [-1, 1]) is a layer inside the model, so
nothing outside the model needs to know which backbone it is.

Why grayscale and a plain resize: the Kermany training copies are 224x224 RGB files made by
resizing the originals *without* keeping the aspect ratio, and every X-ray is gray. A full-size
upload goes through exactly that: to gray, squash to the square, repeat to three channels.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# A pixel budget checked *before* decoding, so a tiny file declaring huge dimensions is refused.
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """The bytes are not an image we can read; the message says why, in words for a user."""


def _decode_dicom(data: bytes) -> np.ndarray:
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if int(getattr(ds, "Rows", 0)) * int(getattr(ds, "Columns", 0)) > MAX_PIXELS:
            raise ImageError(f"image dimensions are too large to process (at most {MAX_PIXELS:,} pixels)")
        pixels = ds.pixel_array.astype(np.float32)
    except ImageError:
        raise
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageError(f"unreadable DICOM file ({exc.__class__.__name__})") from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)
    elif pixels.ndim != 2:
        raise ImageError("DICOM file holds a volume or series, not a single 2-D image")
    lo, hi = float(pixels.min()), float(pixels.max())
    gray = (pixels - lo) / (hi - lo or 1.0) * 255.0
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":  # white means low signal
        gray = 255.0 - gray
    return gray.astype(np.uint8)


def image_format(data: bytes) -> str | None:
    """'jpeg', 'png' or 'dicom' from the file's magic bytes; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def _header_size(data: bytes, kind: str) -> tuple[int, int]:
    """Width and height from the file header alone (no pixel decoding)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Image.DecompressionBombError:
        raise ImageError(f"image dimensions are too large to process (at most {MAX_PIXELS:,} pixels)") from None
    except Exception:
        raise ImageError(f"corrupt or truncated {kind.upper()} file") from None


def image_dimensions(data: bytes) -> tuple[int, int]:
    """Width and height of JPEG, PNG or DICOM bytes from the header alone (raises ImageError)."""
    kind = image_format(data)
    if kind is None:
        raise ImageError("not a JPEG, PNG or DICOM image")
    if kind != "dicom":
        return _header_size(data, kind)
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    except Exception:
        raise ImageError("unreadable DICOM file header") from None


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG, PNG or DICOM bytes to a 2-D uint8 grayscale array; raise ImageError if not possible."""
    if not data:
        raise ImageError("the file is empty")
    kind = image_format(data)
    if kind is None:
        raise ImageError("not a JPEG, PNG or DICOM image")
    if kind == "dicom":
        return _decode_dicom(data)
    width, height = _header_size(data, kind)
    if width * height > MAX_PIXELS:
        raise ImageError(f"image is too large to process ({width}x{height}; at most {MAX_PIXELS:,} pixels)")
    gray = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if gray is not None and gray.ndim == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGRA2GRAY if gray.shape[-1] == 4 else cv2.COLOR_BGR2GRAY)
    if gray is None:
        raise ImageError(f"corrupt or truncated {kind.upper()} file")
    if gray.dtype != np.uint8:  # 16-bit PNG
        gray = (gray / 257).astype(np.uint8)
    return gray


def prepare_image(gray: np.ndarray, image_size: int) -> np.ndarray:
    """Map a decoded grayscale image to the model input: (size, size, 3) float32 in [0, 255]."""
    if gray.ndim == 3:  # an RGB array handed in directly
        gray = cv2.cvtColor(gray.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if gray.shape != (image_size, image_size):
        # INTER_AREA averages when shrinking, which is what the dataset's downsized copies look like.
        gray = cv2.resize(gray, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)


def load_image(source: str | Path | bytes, image_size: int) -> np.ndarray:
    """Read a file (path) or its bytes and return the model input for it."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return prepare_image(decode_image(data), image_size)
