"""The Flask app: a JSON API over the trained classifier and one page that uses it.

    flask --app app run                           # development (CHESTXRAY_ENV=development for --debug)
    gunicorn -c gunicorn.conf.py app:app          # production

The model is loaded once, here. If that fails the app still starts: /health answers 503 with
the reason and prediction endpoints answer 503, so a container comes up and says what is wrong;
an admin can then POST /admin/reload once the model is in place.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from chestxray.serving.config import flask_debug_requested, load_settings
from chestxray.serving.model_state import ModelState, load_predictor  # noqa: F401  (public API)

log = logging.getLogger(__name__)

def refuse_debug_in_production(app: Flask, settings: dict[str, Any]) -> None:
    """Raise at start-up if debug mode (FLASK_DEBUG, app.debug) is on outside CHESTXRAY_ENV=development.

    The debugger runs arbitrary code for whoever can reach the page; it must never face a network.
    """
    if (flask_debug_requested() or app.debug) and settings["CHESTXRAY_ENV"] != "development":
        raise RuntimeError("refusing to start: Flask debug mode is on (FLASK_DEBUG / --debug) but "
                           f"CHESTXRAY_ENV={settings['CHESTXRAY_ENV']!r}; debug mode lets anyone run code "
                           "on this server. Unset FLASK_DEBUG, or set CHESTXRAY_ENV=development on a "
                           "developer machine.")


def _configure_logging() -> None:
    """Send INFO logs (start-up, audit) to stderr when nothing else (gunicorn.conf.py, pytest) did."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Application factory: settings from the environment/.env, overridden by `config`."""
    from chestxray.serving import (admin, api, audit, auth, headers, metrics, model_state, monitoring, pages,
                                   ratelimit, uploads)

    _configure_logging()
    app = Flask(__name__)  # templates/ and static/ are package data next to this file (Flask's tutorial layout)
    settings = load_settings(config)
    if config and "DEBUG" in config:
        app.debug = bool(config["DEBUG"])
    refuse_debug_in_production(app, settings)
    app.config.update(settings)
    auth.install(app, settings["CHESTXRAY_API_KEYS"])
    app.config["CHESTXRAY_API_KEYS"] = "(digests only, see chestxray.serving.auth)"  # the keys leave app.config
    ratelimit.install(app, settings["CHESTXRAY_RATE_LIMIT_PER_MIN"], settings["CHESTXRAY_RATE_LIMIT_BURST"])
    audit.install(app, settings["CHESTXRAY_AUDIT_LOG"])
    headers.install(app)
    app.request_class = uploads.InMemoryRequest
    # The widest request (a full batch); each endpoint narrows it before reading the body.
    app.config["MAX_CONTENT_LENGTH"] = (uploads.FORM_OVERHEAD + int(settings["CHESTXRAY_MAX_UPLOAD_MB"] * 2**20)
                                        * max(1, settings["CHESTXRAY_MAX_BATCH"]))
    app.json.sort_keys = False  # keep class order as the model has it

    if settings["GEMINI_API_KEY"]:
        from chestxray.explain import gemini

        gemini.load_sdk()  # imported now, so no request's Gemini timeout is spent importing it
    model_state.install(app, load_predictor(settings))

    app.extensions[metrics.EXTENSION] = app_metrics = metrics.Metrics()  # a registry of its own per app
    app.extensions[monitoring.EXTENSION] = monitoring.monitor_for(
        app.extensions[model_state.EXTENSION].predictor, settings["CHESTXRAY_DRIFT_MIN_COUNT"], app_metrics.registry)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(monitoring.bp)
    app.register_blueprint(metrics.bp)
    return app
