"""Test-time augmentation: the views of a prepared batch whose probabilities are averaged.

The original, its left-right mirror, and two small diagonal shifts (+-4% of the side in x and y),
filled with black as the training augmentation fills (keras' fill_mode="constant"). All of them are
changes the model saw in training; never a vertical flip.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

SHIFT = 0.04


def shift(batch: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move the content of (N, H, W, C) images by (dy, dx) pixels; uncovered pixels become 0."""
    out = np.zeros_like(batch)
    h, w = batch.shape[1:3]
    src_y, dst_y = slice(max(-dy, 0), h - max(dy, 0)), slice(max(dy, 0), h - max(-dy, 0))
    src_x, dst_x = slice(max(-dx, 0), w - max(dx, 0)), slice(max(dx, 0), w - max(-dx, 0))
    out[:, dst_y, dst_x] = batch[:, src_y, src_x]
    return out


def tta_views(batch: np.ndarray, shift_fraction: float = SHIFT) -> list[np.ndarray]:
    """[original, horizontal flip, shifted down-right, shifted up-left] of prepared inputs (N, H, W, C)."""
    batch = np.asarray(batch)
    step = max(1, round(shift_fraction * batch.shape[1])), max(1, round(shift_fraction * batch.shape[2]))
    return [batch, batch[:, :, ::-1], shift(batch, step[0], step[1]), shift(batch, -step[0], -step[1])]


def tta_probabilities(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray,
                      original: np.ndarray | None = None) -> np.ndarray:
    """The mean of `predict` (inputs -> probabilities) over the views of `batch`.

    `original`: the probabilities of `batch` itself when the caller already has them (not recomputed).
    """
    views = tta_views(batch)
    first = predict(np.ascontiguousarray(views[0])) if original is None else original
    return np.mean([first] + [predict(np.ascontiguousarray(view)) for view in views[1:]], axis=0)
