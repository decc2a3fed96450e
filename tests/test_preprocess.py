"""One preprocessing path: what training's tf.data pipeline feeds the model is exactly what serving feeds it."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from chestxray.data.preprocess import ImageError, decode_image, load_image, prepare_image


def real_files(kermany224, fullsize_dir) -> list:
    return sorted(kermany224.glob("test/*/*.jpeg"))[:6] + sorted(fullsize_dir.glob("*/*.jpeg"))[:6]


def test_training_pipeline_and_serving_give_identical_inputs(kermany224, fullsize_dir):
    from chestxray.data.dataset import image_dataset

    files = real_files(kermany224, fullsize_dir)
    trained_on = np.concatenate([b.numpy() for b in image_dataset([str(f) for f in files], 224, 4)])
    served = np.stack([prepare_image(decode_image(f.read_bytes()), 224) for f in files])  # what the app does
    assert trained_on.shape == (len(files), 224, 224, 3)
    np.testing.assert_array_equal(trained_on, served)


def test_model_input_is_gray_repeated_to_three_channels_in_pixel_range(fullsize_dir):
    x = load_image(sorted(fullsize_dir.glob("*/*.jpeg"))[0], 160)
    assert x.shape == (160, 160, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 255.0 and x.std() > 10
    np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_rgb_png_and_gray_jpeg_of_the_same_picture_agree(fullsize_dir):
    gray = decode_image(sorted(fullsize_dir.glob("*/*.jpeg"))[0].read_bytes())
    buf = io.BytesIO()
    Image.fromarray(gray).convert("RGB").save(buf, "PNG")
    np.testing.assert_array_equal(load_image(buf.getvalue(), 224), prepare_image(gray, 224))


def _reencoded(x: np.ndarray) -> np.ndarray:
    """The model input x (gray in 3 channels) encoded once more as a quality-75 JPEG."""
    buf = io.BytesIO()
    Image.fromarray(x[..., 0].astype(np.uint8)).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(buf), np.float32)


def test_full_size_uploads_carry_the_training_copies_compression(kermany224, fullsize_dir):
    # The training copies are quality-75 JPEGs: encoding one again barely changes it. A full-size
    # original shrunk in memory had no such artifacts (1.7 grey levels off), and the model scored
    # pneumonia films as normal; the served input must be as much a q75 fixed point as the copies.
    copies = [load_image(f, 224) for f in sorted(kermany224.glob("test/*/*.jpeg"))[:8]]
    uploads = [load_image(f, 224) for f in sorted(fullsize_dir.glob("*/*.jpeg"))]
    assert len(uploads) == 16
    copy_drift = max(np.abs(_reencoded(x) - x[..., 0]).mean() for x in copies)
    upload_drift = max(np.abs(_reencoded(x) - x[..., 0]).mean() for x in uploads)
    assert copy_drift < 0.05 and upload_drift < 0.05, (copy_drift, upload_drift)


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"hello, this is a text file", "not a JPEG, PNG or DICOM"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "corrupt or truncated JPEG"),
])
def test_bad_bytes_raise_image_error_in_words(data, words):
    with pytest.raises(ImageError, match=words):
        decode_image(data)


def test_truncated_real_jpeg_is_refused(fullsize_dir):
    data = sorted(fullsize_dir.glob("*/*.jpeg"))[0].read_bytes()
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 3])


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")  # ~150 KB file, 144 megapixels
    with pytest.raises(ImageError, match="too large"):
        decode_image(buf.getvalue())


def test_header_dimensions_without_decoding():
    from fuzz_corpus import jpeg_declaring, png_header_only

    from chestxray.data.preprocess import ImageTooLarge, image_dimensions

    assert image_dimensions(png_header_only(65535, 65535)) == (65535, 65535)  # 4 gigapixels: measured, not decoded
    assert image_dimensions(jpeg_declaring(20000, 12000)) == (20000, 12000)
    with pytest.raises(ImageTooLarge, match="at most 40,000,000 pixels"):
        decode_image(png_header_only(20000, 20000))


def _gray(fullsize_dir) -> np.ndarray:
    return decode_image(sorted(fullsize_dir.glob("*/*.jpeg"))[0].read_bytes())


@pytest.mark.parametrize("scale", [257, 16])  # 16-bit using the full range, and 12-bit data in 16 bits
def test_16_bit_png_is_stretched_not_clipped(fullsize_dir, scale):
    import cv2

    gray = _gray(fullsize_dir)  # spans 0..255, as every Kermany original does
    decoded = decode_image(cv2.imencode(".png", gray.astype(np.uint16) * scale)[1].tobytes())
    assert decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - gray).max() <= 1


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG")])
def test_cmyk_palette_and_alpha_images_read_as_the_same_gray(fullsize_dir, mode, fmt):
    gray = _gray(fullsize_dir)
    buf = io.BytesIO()
    Image.fromarray(gray).convert(mode).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    decoded = decode_image(buf.getvalue())
    assert decoded.shape == gray.shape
    assert np.abs(decoded.astype(float) - gray).mean() < 2.0  # JPEG re-encoding and palette quantisation only
