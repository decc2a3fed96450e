"""The web page: upload X-rays, see predictions, Grad-CAM overlays and explanations (it calls the JSON API)."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, url_for

from chestxray.serving.auth import keys_required
from chestxray.data.acceptance import MAX_SIDE, MIN_SIDE
from chestxray.serving.model_state import current_state

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    """The single page; all work happens in static/app.js against /predict/explain.

    When API keys are configured the page asks for one; the script sends it as X-API-Key with each
    upload. The key stays in the page (nothing is stored in cookies or browser storage).
    """
    state = current_state()
    has_card = state.predictor is not None and state.predictor.card is not None
    return render_template(
        "index.html",
        model_error=state.error,
        model_version=state.version,
        keys_required=keys_required(),
        model_card_url=url_for("api.model_card", format="html") if has_card else None,
        max_upload_mb=current_app.config["CHESTXRAY_MAX_UPLOAD_MB"],
        min_side=MIN_SIDE,
        max_side=MAX_SIDE,
    )
