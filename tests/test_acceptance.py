"""Which images are accepted for prediction (chestxray.data.acceptance): exact sizes, statuses, codes, messages.

Images are made in memory (PNG/JPEG of a given size), so these need no model and no data; the app's
answers to the same uploads are in test_api.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import png_bytes

from chestxray.data import acceptance
from chestxray.data.acceptance import MAX_SIDE, MIN_SIDE, ImageRejected, check_image, read_image
from chestxray.data.preprocess import ImageError, ImageTooLarge


def image(width: int, height: int, value: int = 90) -> bytes:
    return png_bytes(np.full((height, width), value, np.uint8))


def rejected(data, status: int, code: str) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        read_image(data)
    exc = info.value
    assert (exc.status, exc.code) == (status, code)
    assert str(exc) == exc.message
    assert exc.to_dict() == {"error": code, "message": exc.message}
    return exc


def test_the_side_limits():
    assert (MIN_SIDE, MAX_SIDE) == (128, 4096)


def test_an_accepted_image_is_decoded_to_gray():
    gray = check_image(image(200, 150, value=77))
    assert gray.shape == (150, 200) and gray.dtype == np.uint8 and (gray == 77).all()


def test_empty_and_unsupported_files():
    assert rejected(b"", 400, "empty_file").message == "the file is empty"
    assert rejected(b"GIF89a" + b"\0" * 200, 415, "unsupported_type").message == (
        "not a JPEG, PNG or DICOM image (GIF, PDF, text... are not accepted)")


@pytest.mark.parametrize("width, height", [(128, 128), (128, 4096), (4096, 128)])
def test_sides_at_the_limits_are_accepted(width, height):
    assert check_image(image(width, height)).shape == (height, width)


@pytest.mark.parametrize("width, height", [(127, 300), (300, 127), (127, 127)])
def test_a_side_under_128_is_too_small(width, height):
    exc = rejected(image(width, height), 422, "image_too_small")
    assert exc.message == f"image is {width}x{height} px; each side must be at least 128 px"


@pytest.mark.parametrize("width, height", [(4097, 200), (200, 4097)])
def test_a_side_over_4096_is_too_large(width, height):
    exc = rejected(image(width, height), 422, "image_too_large")
    assert exc.message == f"image is {width}x{height} px; each side must be at most 4096 px"


def test_too_large_is_checked_from_the_header_before_decoding(monkeypatch):
    def must_not_decode(data):
        raise AssertionError("decoded an image the header already refuses")

    monkeypatch.setattr(acceptance, "decode_image", must_not_decode)
    rejected(image(4097, 200), 422, "image_too_large")
    rejected(image(100, 200), 422, "image_too_small")


def test_a_truncated_file_is_unreadable():
    data = image(300, 300)
    exc = rejected(data[:40], 422, "unreadable_image")
    assert exc.message == "corrupt or truncated PNG file"


def test_decoder_errors_keep_their_words(monkeypatch):
    def too_many_pixels(data):
        raise ImageTooLarge("image is too large to process (9x9)")

    monkeypatch.setattr(acceptance, "decode_image", too_many_pixels)
    exc = rejected(image(300, 300), 422, "image_too_large")
    assert exc.message == "image is too large to process (9x9)"
    assert exc.__cause__ is None and exc.__suppress_context__

    def broken(data):
        raise ImageError("corrupt or truncated JPEG file")

    monkeypatch.setattr(acceptance, "decode_image", broken)
    exc = rejected(image(300, 300), 422, "unreadable_image")
    assert exc.message == "corrupt or truncated JPEG file"
    assert exc.__suppress_context__


def test_read_image_takes_bytes_a_path_or_a_path_string(tmp_path):
    data = image(160, 140)
    (tmp_path / "scan.png").write_bytes(data)
    for source in (data, tmp_path / "scan.png", str(tmp_path / "scan.png")):
        assert read_image(source).shape == (140, 160)
    exc = rejected(tmp_path / "missing.png", 400, "unreadable_file")
    assert exc.message == "cannot read file (No such file or directory)"
    assert exc.__suppress_context__
    exc = rejected(str(tmp_path), 400, "unreadable_file")  # a folder
    assert exc.message == "cannot read file (Is a directory)"
    rejected(tmp_path / "missing.png", 400, "unreadable_file")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    rejected(empty, 400, "empty_file")


def test_an_error_without_strerror_is_named_by_its_type(tmp_path, monkeypatch):
    def fails(self):
        raise OSError("no strerror here")

    monkeypatch.setattr(acceptance.Path, "read_bytes", fails)
    assert rejected(tmp_path / "x.png", 400, "unreadable_file").message == "cannot read file (OSError)"
