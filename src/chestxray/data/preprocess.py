"""The one preprocessing path shared by training, evaluation, the app and the batch CLI.

An image of any size and format becomes a ``(size, size, 3)`` float32 array of raw pixel values
in [0, 255]. The backbone's own scaling (e.g. Xception's [-1, 1]) is a layer inside the model, so
nothing outside the model needs to know which backbone it is.

Why grayscale, a plain resize and a JPEG round trip: the Kermany training copies are 224x224 RGB
JPEGs at quality 75 made by resizing the originals *without* keeping the aspect ratio, and every
X-ray is gray. A full-size upload goes through exactly that: to gray, squash to the square, encode
at quality 75, repeat to three channels.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# A pixel budget checked *before* decoding, so a tiny file declaring huge dimensions is refused.
MAX_PIXELS = 40_000_000
# The training copies' JPEG quality (their quantisation tables are libjpeg's at 75). The model learns
# their compression artifacts: shrunk in memory without them, full-size uploads of pneumonia scored as
# normal (docs/results.md, "Full-size uploads"). Re-encoding a training copy changes it by ~0.002 grey levels.
JPEG_QUALITY = 75


class ImageError(ValueError):
    """The bytes are not an image we can read; the message says why, in words for a user."""


class ImageTooLarge(ImageError):
    """The header declares more pixels than we decode (a decompression bomb, or simply too big)."""


def _too_many_pixels(width: int, height: int) -> ImageTooLarge:
    return ImageTooLarge(f"image is too large to process ({width}x{height}; at most {MAX_PIXELS:,} pixels)")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch the range actually used to 0..255: 12-bit data in a 16-bit container is not left near black."""
    pixels = pixels.astype(np.float32)
    lo, hi = float(pixels.min()), float(pixels.max())
    return ((pixels - lo) / (hi - lo or 1.0) * 255.0).round().astype(np.uint8)


def _dicom(data: bytes, pixels: bool):
    import io

    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageError(f"unreadable DICOM file ({exc.__class__.__name__})") from None


def _displayed_values(stored: np.ndarray, ds) -> np.ndarray:
    """Stored gray values as the DICOM viewer shows them: pydicom's modality LUT (rescale slope and
    intercept, or a LUT) then its VOI LUT (the window the film was written with); a no-op without those tags."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    # A window clips the film at both ends, so the 8-bit stretch that follows spans exactly the window.
    return apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float32)


def _decode_dicom(data: bytes) -> np.ndarray:
    width, height = image_dimensions(data)
    if width * height > MAX_PIXELS:
        raise _too_many_pixels(width, height)
    ds = _dicom(data, pixels=True)
    try:
        pixels = ds.pixel_array
        if pixels.ndim == 2:
            pixels = _displayed_values(pixels, ds)
    except Exception as exc:  # compressed without a decoder, pixel data shorter than declared, bad LUT...
        raise ImageError(f"unreadable DICOM file ({exc.__class__.__name__})") from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)
    elif pixels.ndim != 2:
        raise ImageError("DICOM file holds a volume or series, not a single 2-D image")
    gray = _to_uint8(pixels)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":  # white means low signal
        gray = 255 - gray
    return gray


def image_format(data: bytes) -> str | None:
    """'jpeg', 'png' or 'dicom' from the file's magic bytes; None for anything else (GIF, PDF, text...)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def image_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from the file header alone, without decoding a pixel; ImageError if unreadable.

    PIL's format plugins are used directly (not Image.open) so that a header declaring billions of
    pixels is simply measured -- the caller refuses it -- instead of raising or warning inside PIL.
    """
    import io

    from PIL import JpegImagePlugin, PngImagePlugin

    kind = image_format(data)
    if kind is None:
        raise ImageError("not a JPEG, PNG or DICOM image")
    if kind == "dicom":
        ds = _dicom(data, pixels=False)
        width, height = int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0)
        if not width or not height:
            raise ImageError("DICOM file holds no image (no Rows/Columns)")
        return width, height
    plugin = JpegImagePlugin.JpegImageFile if kind == "jpeg" else PngImagePlugin.PngImageFile
    try:
        with plugin(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # SyntaxError, OSError, struct.error...: the header itself is broken
        raise ImageError(f"corrupt or truncated {kind.upper()} file") from None


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG, PNG or DICOM bytes to a 2-D uint8 grayscale array; raise ImageError if not possible.

    The pixel count is checked from the header before decoding (ImageTooLarge). Colour, palette,
    CMYK and alpha images become gray; 16-bit images are stretched to 8 bits like DICOM.
    """
    if not data:
        raise ImageError("the file is empty")
    kind = image_format(data)
    if kind is None:
        raise ImageError("not a JPEG, PNG or DICOM image")
    if kind == "dicom":
        return _decode_dicom(data)
    width, height = image_dimensions(data)
    if width * height > MAX_PIXELS:
        raise _too_many_pixels(width, height)
    # IMREAD_UNCHANGED keeps 16 bits; OpenCV expands palettes and converts CMYK to BGR itself.
    gray = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if gray is None:
        raise ImageError(f"corrupt or truncated {kind.upper()} file")
    if gray.ndim == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGRA2GRAY if gray.shape[-1] == 4 else cv2.COLOR_BGR2GRAY)
    if gray.dtype != np.uint8:  # 16-bit PNG
        gray = _to_uint8(gray)
    return gray


def prepare_image(gray: np.ndarray, image_size: int) -> np.ndarray:
    """Map a decoded grayscale image to the model input: (size, size, 3) float32 in [0, 255].

    Every image, in training and serving, is resized to the square and JPEG-encoded once at
    JPEG_QUALITY, so an upload carries the same compression artifacts as the training copies.
    """
    if gray.ndim == 3:  # an RGB array handed in directly
        gray = cv2.cvtColor(gray.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    gray = gray.astype(np.uint8, copy=False)
    if gray.shape != (image_size, image_size):
        # INTER_AREA averages when shrinking, which is what the dataset's downsized copies look like.
        gray = cv2.resize(gray, (image_size, image_size), interpolation=cv2.INTER_AREA)
    _, encoded = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    gray = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)


def load_image(source: str | Path | bytes, image_size: int) -> np.ndarray:
    """Read a file (path) or its bytes and return the model input for it."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return prepare_image(decode_image(data), image_size)
