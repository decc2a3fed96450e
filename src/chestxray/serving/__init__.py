"""The Flask app: a JSON API over the trained classifier and one page that uses it.

    flask --app app run                                   # development
    gunicorn -w 1 --threads 4 -b 0.0.0.0:8000 app:app     # production

The model is loaded once, here. If that fails the app still starts: /health answers 503 with
the reason and prediction endpoints answer 503, so a container comes up and says what is wrong.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask

from chestxray.serving.config import load_settings, parse_model_uri

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]  # src/chestxray/serving -> the repository root


@dataclass
class ModelState:
    """The loaded classifier, or why there is none."""

    classifier: Any = None
    error: str | None = None


def load_classifier(settings: dict[str, Any]) -> ModelState:
    """Load the classifier the settings name (registry URI or artifacts dir); never raises."""
    from chestxray.model.classifier import Classifier, ModelNotFound

    try:
        if settings["CHESTXRAY_MODEL_URI"]:
            name, alias = parse_model_uri(settings["CHESTXRAY_MODEL_URI"])
            classifier = Classifier.from_registry(name, alias, backend=settings["CHESTXRAY_BACKEND"],
                                                  tta=settings["CHESTXRAY_TTA"])
        else:
            classifier = Classifier.from_artifacts(settings["CHESTXRAY_ARTIFACTS"],
                                                   backend=settings["CHESTXRAY_BACKEND"], tta=settings["CHESTXRAY_TTA"])
    except ModelNotFound as exc:
        return ModelState(error=str(exc))
    except Exception as exc:  # a broken file, a registry down: the app must still start and say so
        return ModelState(error=f"could not load the model ({type(exc).__name__}: {exc})")
    try:
        warm_up(classifier)
    except Exception as exc:
        return ModelState(error=f"the model failed a test prediction ({type(exc).__name__}: {exc})")
    return ModelState(classifier=classifier)


def warm_up(classifier) -> None:
    """One prediction and one Grad-CAM on a blank image, so the first request does not pay for tracing."""
    import numpy as np

    from chestxray.explain import gradcam

    size = classifier.image_size
    classifier.predict_arrays(np.zeros((1, size, size, 3), np.float32))
    try:
        gradcam.explain(classifier, np.zeros((size, size), np.uint8), classifier.classes[0])
    except Exception as exc:  # predictions still work without heatmaps; /predict/explain will say why
        log.warning("Grad-CAM warm-up failed: %s", exc)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Application factory: settings from the environment/.env, overridden by `config`."""
    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    settings = load_settings(config)
    app.config.update(settings)
    # Room for a full batch in one request; each file is checked against the per-file limit.
    per_file = int(settings["CHESTXRAY_MAX_UPLOAD_MB"] * 1024 * 1024)
    app.config["MAX_CONTENT_LENGTH"] = per_file * max(1, settings["CHESTXRAY_MAX_BATCH"]) + 1024 * 1024
    app.json.sort_keys = False  # keep class order as the model has it

    state = load_classifier(settings)
    if state.error:
        log.error("model not loaded: %s", state.error)
    else:
        log.info("model loaded: version %s, backend %s", state.classifier.version, state.classifier.backend)
    app.extensions["chestxray"] = state

    from chestxray.serving import api, pages

    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    return app
