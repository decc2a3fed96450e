"""Clinically realistic image corruptions for the robustness stage, applied to the decoded grayscale image.

They act *before* the shared preprocessing (prepare_image), so they model what differs between
machines and sites at acquisition or export: exposure, contrast, focus, noise, resolution, lossy
compression, patient rotation, and contrast enhancement some viewers apply.

Each has two severities: severity 2 is the value issue #6 names where it names one, severity 1 is
half of it. Where a change has a direction (brightness, contrast, rotation) each image draws its
sign from its own random generator, so half the images go each way and both severities of one
image go the same way.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _brightness(gray: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    return gray + _sign(rng) * value * 255.0


def _contrast(gray: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    mean = gray.mean()
    return mean + (gray - mean) * (1.0 + _sign(rng) * value)


def _blur(gray: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(gray, (0, 0), sigmaX=value * min(gray.shape[:2]))


def _noise(gray: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    return gray + rng.standard_normal(gray.shape) * value * 255.0


def _downscale(gray: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    h, w = gray.shape[:2]
    small = cv2.resize(gray, (max(1, round(w * value)), max(1, round(h * value))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _jpeg(gray: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    _, encoded = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, int(value)])
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


def _rotation(gray: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    h, w = gray.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), _sign(rng) * value, 1.0)
    return cv2.warpAffine(gray, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _clahe(gray: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=value, tileGridSize=(8, 8)).apply(gray)


Corruption = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
# name -> (function, (severity 1, severity 2)), in the unit noted.
CORRUPTIONS: dict[str, tuple[Corruption, tuple[float, float]]] = {
    "brightness": (_brightness, (0.10, 0.20)),      # +- this share of the full range, added
    "contrast": (_contrast, (0.10, 0.20)),          # +- this share, stretching around the image mean
    "gaussian_blur": (_blur, (0.005, 0.01)),        # sigma as a share of the shorter side
    "gaussian_noise": (_noise, (0.03, 0.06)),       # standard deviation as a share of the full range
    "downscale": (_downscale, (0.75, 0.5)),         # shrink to this scale, then back to the original size
    "jpeg": (_jpeg, (65, 30)),                      # JPEG quality
    "rotation": (_rotation, (5.0, 10.0)),           # +- degrees about the centre, black corners as in training
    "clahe": (_clahe, (2.0, 4.0)),                  # CLAHE clip limit, 8x8 tiles
}
# float arithmetic for these; the others are cv2 operations on uint8.
_FLOAT = {"brightness", "contrast", "gaussian_noise"}


def corrupt(gray: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`gray` (2-D uint8) corrupted by `name` at `severity` (1 or 2): a new 2-D uint8 array of the same shape.

    `rng` draws the direction and the noise; give both severities of one image equal generators.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2):
        raise ValueError(f"severity must be 1 or 2, not {severity!r}")
    function, values = CORRUPTIONS[name]
    image = gray.astype(np.float32) if name in _FLOAT else gray
    out = function(image, values[severity - 1], rng)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
