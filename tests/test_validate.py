"""Checking one image file before ingest (chestxray.data.validate): the exact reason for every refusal.

Images are made in memory (PIL/OpenCV), so these need no data; test_ingest.py checks the same rules
on real files through the ingest stage.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import png_bytes
from PIL import Image

from chestxray.data import validate
from chestxray.data.validate import ACCEPTED_MODES, Validation, validate_bytes, validate_file, validate_image


def encoded(mode: str, size=(160, 140), fmt: str = "PNG", color=90) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def test_accepted_modes_are_gray_and_rgb():
    assert ACCEPTED_MODES == {"L", "I", "I;16", "I;16B", "I;16L", "RGB"}


def test_an_accepted_image_comes_back_with_its_size_and_gray_pixels():
    verdict, gray = validate_image(png_bytes(np.full((140, 160), 77, np.uint8)), 128)
    assert verdict == Validation(True, "", 160, 140)
    assert (verdict.ok, verdict.reason, verdict.width, verdict.height) == (True, "", 160, 140)
    assert gray.shape == (140, 160) and (gray == 77).all()


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGB", "JPEG"), ("I;16", "PNG"), ("L", "JPEG")])
def test_gray_and_rgb_images_are_accepted(mode, fmt):
    color = (90, 90, 90) if mode == "RGB" else 90
    assert validate_bytes(encoded(mode, fmt=fmt, color=color), 128) == (True, "", 160, 140)


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("P", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("1", "PNG")])
def test_other_color_modes_are_refused_by_name(mode, fmt):
    color = 1 if mode == "1" else 90 if mode in ("P",) else None
    data = encoded(mode, fmt=fmt, color=color) if color is not None else encoded(mode, fmt=fmt, color=(90,) * len(mode))
    verdict, gray = validate_image(data, 128)
    assert verdict == (False, f"unsupported color mode {mode} (need grayscale or RGB)", 0, 0)
    assert gray is None


def test_empty_and_unknown_files():
    assert validate_image(b"", 128) == (Validation(False, "empty file", 0, 0), None)
    assert validate_image(b"GIF89a" + b"\0" * 300, 128) == (Validation(False, "not a JPEG, PNG or DICOM image", 0, 0),
                                                             None)


def test_a_truncated_file_keeps_the_decoders_reason():
    data = encoded("L", fmt="JPEG")
    assert validate_image(data[:200], 128) == (Validation(False, "corrupt or truncated JPEG file", 0, 0), None)
    # A DICOM file skips the color-mode check (PIL cannot read it) and gets the decoder's reason.
    dicom = b"\x00" * 128 + b"DICM" + b"\xff" * 300
    assert validate_image(dicom, 128) == (Validation(False, "DICOM file holds no image (no Rows/Columns)", 0, 0), None)


def test_a_decoder_crash_is_a_reason_not_an_exception(monkeypatch):
    def crash(data):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(validate, "decode_image", crash)
    assert validate_image(encoded("L"), 128) == (Validation(False, "unreadable image (RuntimeError)", 0, 0), None)


def test_color_mode_is_read_from_the_header():
    assert validate._color_mode(encoded("CMYK", fmt="JPEG", color=(1, 2, 3, 4))) == "CMYK"
    assert validate._color_mode(encoded("L")) == "L"
    assert validate._color_mode(b"\xff\xd8\xff" + b"\0" * 10) == ""


@pytest.mark.parametrize("width, height", [(127, 200), (200, 127), (100, 100)])
def test_too_small_names_the_size_and_the_minimum(width, height):
    verdict, gray = validate_image(encoded("L", size=(width, height)), 128)
    assert verdict == (False, f"too small ({width}x{height}; min_size is 128)", width, height)
    assert gray is None


def test_exactly_min_size_is_accepted():
    assert validate_bytes(encoded("L", size=(128, 128)), 128) == (True, "", 128, 128)
    assert validate_bytes(encoded("L", size=(128, 128)), 129) == (False, "too small (128x128; min_size is 129)",
                                                                  128, 128)


def test_validate_file_reads_the_file_or_says_why_not(tmp_path, monkeypatch):
    (tmp_path / "scan.png").write_bytes(encoded("L"))
    assert validate_file(tmp_path / "scan.png", 128) == (True, "", 160, 140)
    assert validate_file(str(tmp_path / "scan.png"), 150) == (False, "too small (160x140; min_size is 150)", 160, 140)
    assert validate_file(tmp_path / "missing.png", 128) == (
        False, "cannot read file (No such file or directory)", 0, 0)
    assert validate_file(tmp_path, 128) == (False, "cannot read file (Is a directory)", 0, 0)

    def fails(self):
        raise OSError("no strerror")

    monkeypatch.setattr(validate.Path, "read_bytes", fails)
    assert validate_file(tmp_path / "scan.png", 128) == (False, "cannot read file (OSError)", 0, 0)
