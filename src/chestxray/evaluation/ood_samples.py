"""Images that are not chest X-rays, to measure the "not a chest X-ray" check on: real ones that ship
inside installed packages, and generated ones.

- scikit-learn's sample photos (`sklearn.datasets.load_sample_images`) and matplotlib's (a portrait,
  logos, terrain elevation maps rendered as images),
- scikit-image's bundled data (`skimage.data`: photos, microscopy, astronomy, a retina, text, a CT phantom, ...),
- pydicom's test files: every distinct single 2-D image it ships (CT, MR, ultrasound, nuclear medicine,
  secondary captures, a segmentation, a dose grid),
- generated: blank, noise, gradient and checkerboard images, a rendered text page, a form and a chart.

Every sample is file bytes (PNG, or the DICOM file itself), as an upload would be, and is read
through the app's own decoding and preprocessing. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from chestxray.data.preprocess import ImageError, decode_image

# Bundled with scikit-image (no download); faces: only a few of the 200 tiny ones, so they do not dominate.
SKIMAGE_IMAGES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins",
                  "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                  "microaneurysms", "moon", "page", "retina", "rocket", "text", "shepp_logan_phantom",
                  "stereo_motorcycle", "binary_blobs")
LFW_FACES = 40
SOURCES = ("sklearn", "matplotlib", "skimage", "pydicom", "generated")


@dataclass(frozen=True)
class Sample:
    name: str  # e.g. "skimage/astronaut"
    source: str  # one of SOURCES
    data: bytes  # PNG or DICOM bytes


def to_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB(A) or gray array of any dtype (bool and [0, 1] floats are scaled to 0-255)."""
    image = np.asarray(image)
    if image.dtype == bool or (image.dtype.kind == "f" and image.max() <= 1.0):
        image = image * 255.0
    image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2BGR)  # cv2 writes BGR
    return cv2.imencode(".png", image)[1].tobytes()


def _sklearn() -> list[Sample]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [Sample(f"sklearn/{Path(name).stem}", "sklearn", to_png(image))
            for name, image in zip(bunch.filenames, bunch.images)]


def _matplotlib() -> list[Sample]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    samples = [Sample(f"matplotlib/{name}", "matplotlib", (folder / name).read_bytes())
               for name in ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")
               if (folder / name).is_file()]
    for name, key in (("topobathy.npz", "topo"), ("jacksboro_fault_dem.npz", "elevation")):
        if (folder / name).is_file():
            with np.load(folder / name) as data:
                height = data[key].astype(np.float64)
            scaled = (height - height.min()) / (np.ptp(height) or 1.0)
            samples.append(Sample(f"matplotlib/{Path(name).stem}", "matplotlib",
                                  to_png(cv2.resize(scaled, (512, 512)))))
    return samples


def _skimage() -> list[Sample]:
    from skimage import data

    samples = []
    for name in SKIMAGE_IMAGES:
        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
        samples.append(Sample(f"skimage/{name}", "skimage", to_png(image)))
    faces = data.lfw_subset()[:LFW_FACES]
    samples += [Sample(f"skimage/lfw_face_{i}", "skimage", to_png(face)) for i, face in enumerate(faces)]
    return samples


def _pydicom() -> list[Sample]:
    """Every pydicom test file the app can read as one 2-D image, each distinct image once."""
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files"  # the files shipped with pydicom (no download)
    samples, seen = [], set()
    for path in sorted(folder.glob("*.dcm")):
        data = path.read_bytes()
        try:
            digest = hashlib.sha256(decode_image(data).tobytes()).hexdigest()
        except ImageError:  # compressed without a decoder, a volume, a report, ...: the app refuses it as unreadable
            continue
        if digest not in seen:
            seen.add(digest)
            samples.append(Sample(f"pydicom/{path.stem}", "pydicom", data))
    return samples


def _document(size: tuple[int, int] = (850, 1100), form: bool = False) -> np.ndarray:
    """A white page with lines of black text (and table lines for a form)."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("L", size, 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=18)
    words = ("patient referral discharge summary the results of the examination were discussed with the "
             "family and a follow up appointment was arranged in two weeks").split()
    y = 60
    for line in range(40):
        text = " ".join(words[(line * 5 + k) % len(words)] for k in range(9))
        draw.text((60, y), text, fill=0, font=font)
        if form:
            draw.line((50, y + 22, size[0] - 50, y + 22), fill=0, width=1)
        y += 25
    return np.asarray(page)


def _chart() -> np.ndarray:
    """A bar chart rendered by matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.bar(["Mon", "Tue", "Wed", "Thu", "Fri"], [3, 7, 5, 8, 4], color="tab:blue")
    ax.set_title("Admissions per day")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_GRAYSCALE)


def generated_images(seed: int = 0) -> dict[str, np.ndarray]:
    """Blank, noise, gradient and pattern images, a text page, a form and a chart (gray uint8 arrays)."""
    rng = np.random.default_rng(seed)
    side = 512
    ramp = np.tile(np.linspace(0, 255, side), (side, 1))
    squares = (np.indices((side, side)) // 64).sum(axis=0) % 2 * 255
    return {
        "blank_black": np.zeros((side, side)),
        "blank_white": np.full((side, side), 255),
        "blank_gray": np.full((side, side), 128),
        "noise_uniform": rng.integers(0, 256, (side, side)),
        "noise_gaussian": rng.normal(128, 50, (side, side)),
        "noise_salt_pepper": (rng.random((side, side)) < 0.5) * 255,
        "noise_color": rng.integers(0, 256, (side, side, 3)),
        "gradient": ramp,
        "checkerboard": squares,
        "text_page": _document(),
        "form": _document(form=True),
        "chart": _chart(),
    }


def _generated() -> list[Sample]:
    return [Sample(f"generated/{name}", "generated", to_png(image)) for name, image in generated_images().items()]


def non_xray_samples() -> list[Sample]:
    """All the non-X-ray samples, in a fixed order."""
    with warnings.catch_warnings():  # pydicom's test files are deliberately odd, and it says so for each
        warnings.simplefilter("ignore")
        return [*_sklearn(), *_matplotlib(), *_skimage(), *_pydicom(), *_generated()]


def variants(gray: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The image and `count` altered copies of it: crops, flips, quarter turns, inversion, gamma, blur.

    Gives the "not a chest X-ray" detector many views of each of the few dozen images it learns from.
    """
    out = [gray]
    for _ in range(count):
        view = gray
        h, w = view.shape[:2]
        if rng.random() < 0.7:
            ch, cw = max(1, int(h * rng.uniform(0.5, 1))), max(1, int(w * rng.uniform(0.5, 1)))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            view = view[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            view = view[:, ::-1]
        if rng.random() < 0.3:
            view = np.rot90(view, int(rng.integers(1, 4)))
        if rng.random() < 0.3:
            view = 255 - view
        view = np.ascontiguousarray(view, dtype=np.uint8)
        if rng.random() < 0.5:
            view = (255.0 * (view / 255.0) ** rng.uniform(0.5, 2.0)).astype(np.uint8)
        if rng.random() < 0.3:
            view = cv2.GaussianBlur(view, (0, 0), rng.uniform(1.0, 4.0))
        out.append(view)
    return out
