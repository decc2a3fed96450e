"""Admin endpoints (admin API key only): reload the model without restarting the server.

POST /admin/reload loads the model from the configured location (CHESTXRAY_ARTIFACTS or
CHESTXRAY_MODEL_URI) into a new state while the old one keeps serving, then swaps the two in one
assignment. One reload at a time (409 while one runs); a failed reload keeps the old model and
answers 503 ``reload_failed`` with the reason.
"""
from __future__ import annotations

import threading

from flask import Blueprint, current_app, jsonify

from chestxray.serving import model_state, monitoring
from chestxray.serving.auth import requires_role
from chestxray.serving.config import SETTINGS
from chestxray.serving.errors import ApiError

bp = Blueprint("admin", __name__)
RELOAD_LOCK = threading.Lock()  # per process: the app runs one gunicorn worker


@bp.post("/admin/reload")
@requires_role("admin")
def reload_model():
    """Load the configured model afresh and serve it from the next request on."""
    if not RELOAD_LOCK.acquire(blocking=False):
        raise ApiError(409, "reload_in_progress", "a reload is already running; try again when it has finished")
    try:
        previous = model_state.current_state()
        settings = {name: current_app.config[name] for name in SETTINGS}
        fresh = model_state.load_predictor(settings)
        if fresh.error:
            raise ApiError(503, "reload_failed", f"{fresh.error} (still serving the previous model: "
                                                 f"{previous.version or 'none'})")
        model_state.install(current_app._get_current_object(), fresh)
        monitoring.current_monitor().restart(*monitoring.reference_for(fresh.predictor))
    finally:
        RELOAD_LOCK.release()
    return jsonify(status="reloaded", model_version=fresh.version, previous_model_version=previous.version,
                   backend=fresh.predictor.backend)
