"""One preprocessing path: what training's tf.data pipeline feeds the model is exactly what serving feeds it."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from helpers import dicom_bytes, png_bytes
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


# --- the same picture in every format an upload may come in -------------------------------------
# Each variant maps an original's decoded gray pixels (uint8, spanning 0..255 as every Kermany original
# does) to the bytes of another file of the same picture.

def _pedestal12(gray: np.ndarray) -> np.ndarray:
    """12-bit detector data with an offset, as a CR/DR writes it: 100..3925, linear in the 8-bit picture."""
    return 100 + gray.astype(np.uint16) * 15


def _master16(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 16-bit master the 8-bit picture was cut from: its top byte is `gray`, its low byte detail."""
    return gray.astype(np.uint16) * 256 + rng.integers(0, 256, gray.shape, dtype=np.uint16)


def _bgr(gray: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


# The same 8-bit pixels, losslessly: what the model is given must be identical, bit for bit.
LOSSLESS = {
    "gray PNG": lambda g, rng: png_bytes(g),
    "RGB PNG": lambda g, rng: png_bytes(_bgr(g)),
    "16-bit PNG, full range": lambda g, rng: png_bytes(g.astype(np.uint16) * 257),
    "16-bit PNG, 12-bit data with an offset": lambda g, rng: png_bytes(_pedestal12(g)),
    "DICOM MONOCHROME2, 8 bits": lambda g, rng: dicom_bytes(g, "MONOCHROME2", 8),
    "DICOM MONOCHROME2, 12 bits with an offset": lambda g, rng: dicom_bytes(_pedestal12(g), "MONOCHROME2", 12),
    "DICOM MONOCHROME2, 16 bits": lambda g, rng: dicom_bytes(g.astype(np.uint16) * 257, "MONOCHROME2", 16),
    "DICOM MONOCHROME1, 8 bits": lambda g, rng: dicom_bytes(255 - g, "MONOCHROME1", 8),
    "DICOM MONOCHROME1, 12 bits with an offset": lambda g, rng: dicom_bytes(4095 - _pedestal12(g), "MONOCHROME1", 12),
}
# The same picture, not the same 8-bit pixels: more precision than the JPEG had, or lossy again.
CLOSE = {
    "16-bit PNG master": lambda g, rng: png_bytes(_master16(g, rng)),
    "16-bit DICOM master": lambda g, rng: dicom_bytes(_master16(g, rng), "MONOCHROME2", 16),
    "RGB JPEG, quality 95": lambda g, rng: cv2.imencode(".jpg", _bgr(g), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
}
# Measured over the 16 originals at 224 px: mean |difference| at most 0.67 grey levels for the 16-bit
# masters (the stretch rounds the low byte, half a level on average) and 0.41 for the quality-95 JPEG;
# the largest single pixel 15 and 22. Those maxima are the final quality-75 round trip: a shift of half
# a level can round a DCT coefficient the other way and move a few pixels at a sharp edge by ~20. A
# wrong inversion or stretch moves the whole image (tens of grey levels on average).
CLOSE_MEAN, CLOSE_MAX = 1.0, 32


@pytest.fixture(scope="module")
def originals(fullsize_dir) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, decoded gray, model input at 224 px) for each full-size original JPEG, as uploaded."""
    files = sorted(fullsize_dir.glob("*/*.jpeg"))
    assert len(files) == 16
    out = []
    for f in files:
        gray = decode_image(f.read_bytes())
        assert gray.min() == 0 and gray.max() == 255, f.name  # what makes the stretched variants lossless
        out.append((f.name, gray, prepare_image(gray, 224)))
    return out


@pytest.mark.parametrize("variant", list(LOSSLESS))
def test_same_pixels_in_any_format_give_identical_model_input(originals, variant):
    for name, gray, expected in originals:
        x = load_image(LOSSLESS[variant](gray, None), 224)
        assert np.array_equal(x, expected), (variant, name, float(np.abs(x - expected).mean()))


@pytest.mark.parametrize("variant", list(CLOSE))
def test_same_picture_in_any_format_gives_close_model_input(originals, variant):
    rng = np.random.default_rng(0)
    for name, gray, expected in originals:
        diff = np.abs(load_image(CLOSE[variant](gray, rng), 224) - expected)
        assert diff.mean() < CLOSE_MEAN and diff.max() <= CLOSE_MAX, (variant, name, diff.mean(), diff.max())


def test_dicom_is_read_through_its_rescale_and_window_as_a_viewer_shows_it(originals):
    """A DICOM written with a rescale (stored value - 1000) and a window in those units showing grey
    levels 64..191 of the picture is that windowed picture (pydicom's modality and VOI LUTs), not the
    whole stored range stretched to 8 bits."""
    for name, gray, _ in originals[:4]:
        low, high = (int(v) - 1000 for v in _pedestal12(np.array([64, 191])))  # the window's ends, rescaled
        data = dicom_bytes(_pedestal12(gray), "MONOCHROME2", 12, RescaleSlope=1, RescaleIntercept=-1000,
                           WindowCenter=(low + high) / 2, WindowWidth=high - low)
        windowed = (np.clip((gray.astype(np.float32) - 64) / 127, 0, 1) * 255).round().astype(np.uint8)
        diff = np.abs(load_image(data, 224) - prepare_image(windowed, 224))
        # Without the window the picture is ~tens of levels off; without the rescale, the window slides by 67 levels.
        assert diff.mean() < CLOSE_MEAN and diff.max() <= CLOSE_MAX, (name, diff.mean(), diff.max())


def test_full_size_upload_prepares_like_its_training_style_copy(originals):
    """An original and its copy made like the dataset's (224x224 RGB JPEG at quality 75, aspect ratio not
    kept) give close model inputs: closer than any two different X-rays are."""
    copies = []
    for _, gray, _ in originals:
        buf = io.BytesIO()
        Image.fromarray(gray).convert("RGB").resize((224, 224), Image.BICUBIC).save(buf, "JPEG", quality=75)
        copies.append(load_image(buf.getvalue(), 224))
    # Measured: 0.7-1.2 grey levels on average per image (PIL's bicubic vs OpenCV's area resize, and
    # the copy's own JPEG); two different originals differ by 24-59.
    for (name, _, x), copy in zip(originals, copies):
        assert np.abs(x - copy).mean() < 2.0, name
    others = [np.abs(a[2] - b[2]).mean() for a, b in zip(originals, originals[1:])]
    assert min(others) > 10, others


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
