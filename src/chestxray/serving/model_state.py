"""The served model as one immutable state object: loaded, read once per request, swapped whole.

A reload builds a complete new `ModelState` (loaded and warmed up) and then replaces the app's
reference in one assignment, so a request sees either the old model or the new one, never a
half-loaded one. Each request reads the reference once (`current_state`) and keeps it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, g

from chestxray.serving.config import parse_model_uri

log = logging.getLogger(__name__)

EXTENSION = "chestxray"  # app.extensions key holding the current ModelState


@dataclass(frozen=True)
class ModelState:
    """The loaded predictor, or why there is none."""

    predictor: Any = None
    error: str | None = None

    @property
    def version(self) -> str | None:
        return self.predictor.version if self.predictor is not None else None


def load_predictor(settings: dict[str, Any]) -> ModelState:
    """Load the predictor the settings name (registry URI or artifacts dir, backend, TTA), warmed up unless
    CHESTXRAY_WARM_UP is off; never raises."""
    from chestxray.model.artifacts import ModelNotFound
    from chestxray.model.network import BACKENDS
    from chestxray.model.predictor import Predictor

    backend, tta = settings["CHESTXRAY_BACKEND"].strip().lower(), settings["CHESTXRAY_TTA"]
    if backend not in BACKENDS:
        return ModelState(error=f"CHESTXRAY_BACKEND={backend!r}: choose one of {', '.join(BACKENDS)}")
    try:
        if settings["CHESTXRAY_MODEL_URI"]:
            from chestxray.model.registry import load_registered

            predictor = load_registered(*parse_model_uri(settings["CHESTXRAY_MODEL_URI"]), backend=backend, tta=tta)
        else:
            predictor = Predictor.from_artifacts(settings["CHESTXRAY_ARTIFACTS"], backend=backend, tta=tta)
    except ModelNotFound as exc:
        return ModelState(error=str(exc))
    except Exception as exc:  # a broken file, a registry down: the app must still start and say so
        return ModelState(error=f"could not load the model ({_reason(exc)})")
    if not settings["CHESTXRAY_WARM_UP"]:
        return ModelState(predictor=predictor)
    try:
        warm_up(predictor)
    except Exception as exc:
        return ModelState(error=f"the model failed a test prediction ({_reason(exc)})")
    return ModelState(predictor=predictor)


def _reason(exc: Exception) -> str:
    """One line for /health: TensorFlow's messages carry the traced code's file paths and lines, the
    innermost error last ("ValueError: Input 0 ... is incompatible ..."); other messages come first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Z]\w*(Error|Exception): ", line)]
    return errors[-1] if errors else f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def warm_up(predictor) -> None:
    """One prediction and one Grad-CAM on a blank image, so the first request does not pay for tracing."""
    import numpy as np

    from chestxray.explain import gradcam

    size = predictor.image_size
    predictor.predict_arrays(np.zeros((1, size, size, 3), np.float32))
    try:
        gradcam.explain(predictor, np.zeros((size, size), np.uint8), predictor.classes[0])
    except Exception as exc:  # predictions still work without heatmaps; /predict/explain will say why
        log.warning("Grad-CAM warm-up failed: %s", exc)


def install(app: Flask, state: ModelState) -> None:
    """Make `state` the served one (a single reference assignment: atomic for concurrent requests)."""
    app.extensions[EXTENSION] = state
    if state.error:
        log.error("model not loaded: %s", state.error)
    else:
        log.info("model loaded: version %s, backend %s", state.version, state.predictor.backend)


def current_state() -> ModelState:
    """The state this request uses: read from the app once, then the same object for the whole request."""
    if "model_state" not in g:
        g.model_state = current_app.extensions[EXTENSION]
    return g.model_state
