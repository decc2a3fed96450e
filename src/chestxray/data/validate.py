"""Checking one image file before it enters the dataset: format, decodability, size and color mode.

Every problem becomes a reason in words (it ends up in the ingest report); nothing raises.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from chestxray.data.preprocess import ImageError, decode_image, image_format

# Grayscale (8/16/32-bit) and RGB. CMYK, palette, bilevel and alpha modes are not what an X-ray file holds.
ACCEPTED_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "RGB"}


class Validation(NamedTuple):
    """The verdict on one file: ok, the reason when not ok ('' when ok), and the size (0 when unknown)."""

    ok: bool
    reason: str
    width: int
    height: int


def _color_mode(data: bytes) -> str:
    """PIL's mode for JPEG/PNG bytes, from the header alone; '' when PIL cannot tell."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode
    except Exception:  # decode_image reports unreadable files with a better reason
        return ""


def validate_image(data: bytes, min_size: int) -> tuple[Validation, np.ndarray | None]:
    """Validate an image held in memory (see validate_bytes) and return its decoded gray pixels when accepted."""
    kind = image_format(data) if data else None
    if not data:
        return Validation(False, "empty file", 0, 0), None
    if kind is None:
        return Validation(False, "not a JPEG, PNG or DICOM image", 0, 0), None
    if kind != "dicom":
        mode = _color_mode(data)
        if mode and mode not in ACCEPTED_MODES:
            return Validation(False, f"unsupported color mode {mode} (need grayscale or RGB)", 0, 0), None
    try:
        gray = decode_image(data)
    except ImageError as exc:
        return Validation(False, str(exc), 0, 0), None
    except Exception as exc:  # a decoder bug on a hostile file must not stop an ingest run
        return Validation(False, f"unreadable image ({exc.__class__.__name__})", 0, 0), None
    height, width = gray.shape[:2]
    if width < min_size or height < min_size:
        return Validation(False, f"too small ({width}x{height}; min_size is {min_size})", width, height), None
    return Validation(True, "", width, height), gray


def validate_bytes(data: bytes, min_size: int) -> Validation:
    """Validate an image held in memory: JPEG/PNG/DICOM, decodable, both sides >= min_size, gray or RGB."""
    return validate_image(data, min_size)[0]


def validate_file(path: str | Path, min_size: int) -> Validation:
    """Validate an image file on disk (see validate_bytes); an unreadable file is a reason, not an error."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Validation(False, f"cannot read file ({exc.strerror or exc.__class__.__name__})", 0, 0)
    return validate_bytes(data, min_size)
