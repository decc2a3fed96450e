"""The JSON API: health, model info, single/batch prediction, prediction with explanation, OpenAPI.

Every error is JSON ``{"error": "<code>", "message": "<words>"}`` with a 4xx status (503 while no
model is loaded). Prediction endpoints need an API key when keys are configured (auth.py).
Image bytes and file names are never logged. An image unlike the X-rays the model was validated on
is still classified, with the warning ``outside_validated_population`` and its words in
``warning_messages`` (chestxray.model.population).
Every scored image is counted by the drift monitor (serving.monitoring).
"""
from __future__ import annotations

import base64
import logging
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, render_template, request, url_for
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from chestxray.data.acceptance import MAX_SIDE, MIN_SIDE, ImageRejected
from chestxray.model.not_xray import NOT_A_CHEST_XRAY
from chestxray.serving.auth import HEADER, keys_required, requires_role
from chestxray.serving.errors import HTTP_CODES, ApiError
from chestxray.serving.model_state import current_state
from chestxray.serving.uploads import FileTooLarge, many_files, one_file, read_upload, too_large_message

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)

def _predictor():
    state = current_state()
    if state.predictor is None:
        raise ApiError(503, "model_unavailable", state.error or "no model loaded")
    return state.predictor


def _predict(predictor, uploads: list[bytes]) -> list:
    """The predictor's Results for uploaded files, in order; every predicted image counts in the drift monitor."""
    from chestxray.serving.monitoring import current_monitor

    monitor = current_monitor()
    results = predictor.predict_images(uploads, observe=lambda inputs, sides, predictions: monitor.observe(
        inputs, sides, predictions, [p.verdict for p in predictions]))
    monitor.refused(sum(1 for r in results if r.error is not None and r.error.code == NOT_A_CHEST_XRAY))
    return results


def _predict_one(predictor, upload: bytes):
    """The Result of one upload; its error (the image was not accepted) is raised as the answer."""
    result = _predict(predictor, [upload])[0]
    if result.error is not None:
        raise result.error
    return result


def _result(predictor, prediction, started: float) -> dict[str, Any]:
    return {**prediction.to_dict(), "model_version": predictor.version,
            "inference_time_ms": round((time.perf_counter() - started) * 1000, 1)}


# --- endpoints --------------------------------------------------------------------------------

@bp.get("/health")
def health():
    """200 when a model is loaded, else 503 with the reason."""
    state = current_state()
    if state.predictor is None:
        return jsonify(status="unavailable", error="model_unavailable", message=state.error), 503
    return jsonify(status="ready", model_version=state.predictor.version, backend=state.predictor.backend)


@bp.get("/model/info")
@requires_role()
def model_info():
    """What the loaded model is: classes, input size, backbone, training date, test metrics, calibration, card."""
    predictor = _predictor()
    return jsonify(
        model_version=predictor.version,
        backend=predictor.backend,
        classes=predictor.classes,
        normal_class=predictor.normal_class,
        input_size=[predictor.image_size, predictor.image_size, 3],
        backbone=predictor.info.get("backbone"),
        trained_at=predictor.info.get("trained_at"),
        test_metrics=predictor.metrics,
        thresholds={"decision_threshold": predictor.calibration.decision_threshold,
                    "low_confidence": predictor.calibration.low_confidence_threshold,
                    "temperature": predictor.calibration.temperature},
        low_confidence_rule=predictor.calibration.chosen.get("low_confidence_rule"),
        tta=predictor.tta,
        model_card=url_for("api.model_card") if predictor.card is not None else None,
        population_check=predictor.population_check.info(),
        not_a_chest_xray_check=predictor.xray_check.info(),
        limits=_limits(),
    )


@bp.get("/model/card")
def model_card():
    """The model card: Markdown, or a simple HTML page for browsers (Accept: text/html, or ?format=html)."""
    predictor = _predictor()
    if predictor.card is None:
        raise ApiError(404, "no_model_card", "this model has no model card -- run the pipeline's model_card stage "
                                             "(`dvc repro model_card`)")
    text = predictor.card
    wanted = request.args.get("format")  # absent: by the Accept header; present, it must be md or html
    if wanted is None:
        wanted = "html" if request.accept_mimetypes.best_match(["text/markdown", "text/html"]) == "text/html" else "md"
    if wanted == "html":
        from markdown_it import MarkdownIt

        # Raw HTML in the Markdown stays text: the card is rendered, never trusted as markup.
        body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
        return render_template("model_card.html", card_html=body, model_version=predictor.version)
    if wanted != "md":
        raise ApiError(400, "bad_format", f"format={wanted!r}: use md or html")
    return Response(text, mimetype="text/markdown")


def _limits() -> dict[str, Any]:
    cfg = current_app.config
    return {"max_upload_mb": cfg["CHESTXRAY_MAX_UPLOAD_MB"], "max_batch": cfg["CHESTXRAY_MAX_BATCH"],
            "min_side_px": MIN_SIDE, "max_side_px": MAX_SIDE, "formats": ["jpeg", "png", "dicom"]}


@bp.post("/predict")
@requires_role()
def predict():
    """Predict one image sent in the multipart field `file`."""
    predictor = _predictor()
    upload = read_upload(one_file())
    started = time.perf_counter()
    result = _predict_one(predictor, upload)
    return jsonify(_result(predictor, result.prediction, started))


@bp.post("/predict/batch")
@requires_role()
def predict_batch():
    """Predict up to CHESTXRAY_MAX_BATCH images sent in the field `files`: one result or error each, in order."""
    predictor = _predictor()
    uploads = [read_upload(upload) for upload in many_files()]
    started = time.perf_counter()
    # Each file's error carries the status /predict would answer for it, in its slot.
    results = [{"index": index, "status": r.error.status, **r.error.to_dict()} if r.error is not None
               else {"index": index, **_result(predictor, r.prediction, started)}
               for index, r in enumerate(_predict(predictor, uploads))]
    errors = sum(1 for r in results if "error" in r)
    return jsonify(results=results, count=len(results), errors=errors)


@bp.post("/predict/explain")
@requires_role()
def predict_explain():
    """As /predict, plus a Grad-CAM overlay (base64 PNG) and, when Gemini answers, a short explanation."""
    from chestxray.explain import gemini, gradcam

    predictor = _predictor()
    upload = one_file()
    requested = (request.form.get("class") or "").strip() or None
    if requested is not None and requested not in predictor.classes:
        raise ApiError(400, "unknown_class",
                       f"unknown class {requested!r}; choose one of: {', '.join(predictor.classes)}")
    started = time.perf_counter()
    predicted = _predict_one(predictor, read_upload(upload))  # no heatmap, no explanation for what is refused
    gray, prediction = predicted.image, predicted.prediction
    result = _result(predictor, prediction, started)
    started = time.perf_counter()
    try:
        cam = gradcam.explain(predictor, gray, requested or prediction.predicted_class)
    except Exception as exc:  # the prediction stands without a heatmap
        log.warning("Grad-CAM failed: %s", type(exc).__name__)
        result.update(gradcam_class=None, gradcam_png=None, explanation=None,
                      explanation_error=f"no Grad-CAM heatmap for this model ({type(exc).__name__})")
        return jsonify(result)
    result.update(gradcam_class=cam.class_name, gradcam_png=base64.b64encode(cam.png()).decode("ascii"),
                  gradcam_time_ms=round((time.perf_counter() - started) * 1000, 1))
    cfg = current_app.config
    text, reason = gemini.explain_prediction(
        prediction.to_dict(), cam.png(max_side=768), api_key=cfg["GEMINI_API_KEY"], model=cfg["GEMINI_MODEL"],
        base_url=cfg["GEMINI_BASE_URL"] or None, timeout_s=cfg["GEMINI_TIMEOUT_S"], explained_class=cam.class_name)
    result.update(explanation=text, explanation_error=reason)
    return jsonify(result)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 description of this API."""
    return jsonify(openapi_document())


# --- errors: always JSON, never a stack trace -------------------------------------------------

def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    g.error_code = code  # for the audit log's outcome
    return jsonify(error=code, message=message), status, headers or {}


@bp.app_errorhandler(ApiError)
def _api_error(exc: ApiError):
    return _error(exc.status, exc.code, exc.message, exc.headers)


@bp.app_errorhandler(ImageRejected)
def _rejected(exc: ImageRejected):
    return _error(exc.status, exc.code, exc.message)


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    status = exc.code or 400
    if isinstance(exc, RequestEntityTooLarge):
        code = "file_too_large" if isinstance(exc, FileTooLarge) else "request_too_large"
        return _error(413, code, too_large_message())
    allowed = getattr(exc, "valid_methods", None)  # a 405 says which methods would do
    code = HTTP_CODES.get(status, exc.name.lower().replace(" ", "_"))
    return _error(status, code, exc.description or exc.name, {"Allow": ", ".join(allowed)} if allowed else None)


@bp.app_errorhandler(Exception)
def _unexpected(exc: Exception):
    # The route, not the raw path (a path can carry anything); the traceback stays in the server log.
    log.error("unexpected %s on %s %s", type(exc).__name__, request.method,
              request.url_rule.rule if request.url_rule else "(no route)", exc_info=exc)
    return _error(500, "internal_error", "the server failed to process the request")


# --- OpenAPI ----------------------------------------------------------------------------------

def _json(ref: str, description: str) -> dict:
    schema = {"$ref": f"#/components/schemas/{ref}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_response(description: str) -> dict:
    return _json("Error", description)


def _upload_body(field: str, many: bool, extra: dict | None = None) -> dict:
    file_schema = {"type": "string", "format": "binary",
                   "description": "JPEG, PNG or DICOM, 128-4096 px a side, at most CHESTXRAY_MAX_UPLOAD_MB"}
    max_batch = current_app.config["CHESTXRAY_MAX_BATCH"]
    prop = {"type": "array", "items": file_schema, "minItems": 1, "maxItems": max_batch} if many else file_schema
    props = {field: prop, **(extra or {})}
    return {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [field], "properties": props},
        "encoding": {field: {"contentType": "image/jpeg, image/png, application/dicom"}}}}}


_UPLOAD_ERRORS = {
    "400": _error_response("missing field, empty file, too many files or unknown class"),
    "413": _error_response("a file over the per-file limit, or a request over the per-request limit"),
    "415": _error_response("not a JPEG, PNG or DICOM image"),
    "422": _error_response("corrupt/truncated image, a side outside 128-4096 px, or not_a_chest_xray"),
    "503": _error_response("no model loaded"),
}


def _protected(operation: dict, role: str = "user") -> dict:
    """An operation behind requires_role, as this app runs it: with API keys configured it needs one
    (security, 401, and 403 for a user key on an admin endpoint); in open mode user endpoints need none
    and admin endpoints always answer 403. Both modes are rate limited (429)."""
    responses = {**operation["responses"],
                 "429": {**_error_response("rate limit exceeded"), "headers": {"Retry-After": {
                     "description": "seconds to wait", "schema": {"type": "integer"}}}}}
    if not keys_required():
        if role == "admin":
            responses["403"] = _error_response("open mode: no admin key is configured, so admin endpoints are off")
        return {**operation, "responses": responses}
    responses["401"] = _error_response("missing or invalid API key (X-API-Key)")
    if role == "admin":
        responses["403"] = _error_response("the key is not an admin key")
    return {**operation, "security": [{"ApiKey": []}], "responses": responses}


def openapi_document() -> dict:
    """The OpenAPI 3 document for every endpoint of the API and admin blueprints.

    Written here rather than as a static YAML file because it follows the app's configuration (whether
    keys are required, the batch limit); Schemathesis checks it against the running app in both modes.
    """
    number = {"type": "number"}
    backend = {"type": "string", "enum": ["onnx", "keras"], "description": "what computes the probabilities"}
    prediction = {
        "type": "object",
        "required": ["predicted_class", "confidence", "probabilities", "low_confidence", "warnings",
                     "warning_messages", "ood_distance", "xray_score", "model_version"],
        "properties": {
            "predicted_class": {"type": "string"},
            "confidence": {**number, "minimum": 0, "maximum": 1},
            "probabilities": {"type": "object", "additionalProperties": number, "description": "per class"},
            "low_confidence": {"type": "boolean", "description": "confidence below the low-confidence threshold"},
            "warnings": {"type": "array", "items": {"type": "string"},
                         "description": "low_confidence; outside_validated_population (the image is unlike the "
                                        "X-rays the model was validated on: the answer may be less reliable)"},
            "warning_messages": {"type": "object", "additionalProperties": {"type": "string"},
                                 "description": "each warning code's words for a clinician, e.g. how the image "
                                                "differs from the validated population"},
            "ood_distance": {**number, "nullable": True,
                             "description": "distance to the training X-rays in the model's feature space; "
                                            "null when the population check is off (see /model/info)"},
            "xray_score": {**number, "nullable": True,
                           "description": "the 'not a chest X-ray' detector's P(chest X-ray); below its threshold "
                                          "the image is refused (422); null when the detector is off"},
            "model_version": {"type": "string"},
            "inference_time_ms": number,
        },
    }
    explained = {"allOf": [{"$ref": "#/components/schemas/Prediction"}, {"type": "object", "properties": {
        "gradcam_class": {"type": "string", "description": "the class the heatmap explains"},
        "gradcam_png": {"type": "string", "format": "byte",
                        "description": "base64 PNG: heatmap over the original image"},
        "gradcam_time_ms": number,
        "explanation": {"type": "string", "nullable": True, "description": "Gemini's text, or null"},
        "explanation_error": {"type": "string", "nullable": True, "description": "why there is no explanation"},
    }}]}
    batch_item = {"oneOf": [
        {"allOf": [{"$ref": "#/components/schemas/Prediction"},
                   {"type": "object", "properties": {"index": {"type": "integer"}}}]},
        {"allOf": [{"$ref": "#/components/schemas/Error"}, {"type": "object", "properties": {
            "index": {"type": "integer"},
            "status": {"type": "integer", "description": "the HTTP status /predict would answer for this file"}}}]},
    ]}
    return {
        "openapi": "3.0.3",
        "info": {"title": "chestxray API", "version": "1",
                 "description": "Chest X-ray classification for decision support. Not a diagnosis."},
        "paths": {
            "/health": {"get": {"summary": "Is a model loaded?", "responses": {
                "200": _json("Health", "ready"), "503": _json("Health", "no model; message says why")}}},
            "/model/info": {"get": _protected({"summary": "The loaded model", "responses": {
                "200": _json("ModelInfo", "classes, input size, backbone, training date, metrics, thresholds"),
                "503": _error_response("no model loaded")}})},
            "/model/card": {"get": {
                "summary": "The model card (data, intended use, metrics, calibration, robustness, limitations)",
                "parameters": [{"name": "format", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": ["md", "html"]},
                                "description": "default: html when the client accepts text/html first, else md"}],
                "responses": {"200": {"description": "the card", "content": {
                    "text/markdown": {"schema": {"type": "string"}}, "text/html": {"schema": {"type": "string"}}}},
                    "400": _error_response("unknown format"),
                    "404": _error_response("no model card for this model"),
                    "503": _error_response("no model loaded")}}},
            "/predict": {"post": _protected({
                "summary": "Classify one image (JPEG, PNG or DICOM)", "requestBody": _upload_body("file", many=False),
                "responses": {"200": _json("Prediction", "the prediction"), **_UPLOAD_ERRORS}})},
            "/predict/batch": {"post": _protected({
                "summary": "Classify several images; one result or error per file, in order",
                "requestBody": _upload_body("files", many=True),
                "responses": {"200": _json("BatchResult", "results in upload order"), **_UPLOAD_ERRORS}})},
            "/predict/explain": {"post": _protected({
                "summary": "Classify one image and explain it (Grad-CAM overlay, optional Gemini text)",
                "requestBody": _upload_body("file", many=False, extra={
                    "class": {"type": "string", "description": "explain this class instead of the predicted one"}}),
                "responses": {"200": _json("ExplainedPrediction", "prediction with explanation"), **_UPLOAD_ERRORS}})},
            "/admin/reload": {"post": _protected({
                "summary": "Load the configured model afresh and swap it in atomically (admin key)",
                "responses": {"200": _json("Reloaded", "the new model serves from the next request on"),
                              "409": _error_response("a reload is already running"),
                              "503": _error_response("reload_failed: the previous model keeps serving")}},
                role="admin")},
            "/monitoring": {"get": _protected({
                "summary": "Running statistics of scored images vs the training reference, with a drift flag "
                           "and its reasons (admin key)",
                "responses": {"200": {"description": "counts, signals, class mix, drift"}}}, role="admin")},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format)",
                                 "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}},
        },
        "components": {"securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": HEADER}},
                       "schemas": {
            "Error": {"type": "object", "required": ["error", "message"], "properties": {
                "error": {"type": "string", "description": "machine-readable code"},
                "message": {"type": "string", "description": "what is wrong, in words"}}},
            "Health": {"type": "object", "properties": {
                "status": {"type": "string", "enum": ["ready", "unavailable"]}, "model_version": {"type": "string"},
                "backend": backend, "error": {"type": "string"}, "message": {"type": "string"}}},
            "ModelInfo": {"type": "object", "properties": {
                "model_version": {"type": "string"}, "backend": backend,
                "classes": {"type": "array", "items": {"type": "string"}},
                "normal_class": {"type": "string", "nullable": True},
                "input_size": {"type": "array", "items": {"type": "integer"}},
                "backbone": {"type": "string"}, "trained_at": {"type": "string"},
                "test_metrics": {"type": "object"}, "thresholds": {"type": "object", "properties": {
                    "decision_threshold": number, "low_confidence": number,
                    "temperature": {**number, "description": "served P = softmax(log p / temperature)"}}},
                "low_confidence_rule": {"type": "object", "nullable": True,
                                        "description": "how the low-confidence threshold was chosen on validation"},
                "tta": {"type": "boolean", "description": "predictions averaged over test-time augmentation"},
                "model_card": {"type": "string", "nullable": True, "description": "path of the model card"},
                "population_check": {"type": "object", "properties": {
                    "enabled": {"type": "boolean"}, "reason": {"type": "string", "description": "why it is off"},
                    "method": {"type": "string"}, "warning": {"type": "string"},
                    "refuses": {"type": "boolean", "description": "always false: it warns, never refuses"},
                    "warn_distance": number, "warn_quantile": number, "chosen_on": {"type": "string"},
                    "exposure_ranges": {"type": "object", "description": "per input statistic, its low and high"}}},
                "not_a_chest_xray_check": {"type": "object", "properties": {
                    "enabled": {"type": "boolean"}, "reason": {"type": "string", "description": "why it is off"},
                    "method": {"type": "string"}, "threshold": number, "chosen_on": {"type": "string"}}},
                "limits": {"type": "object"}}},
            "Prediction": prediction,
            "ExplainedPrediction": explained,
            "Reloaded": {"type": "object", "properties": {
                "status": {"type": "string", "enum": ["reloaded"]}, "model_version": {"type": "string"},
                "previous_model_version": {"type": "string", "nullable": True}, "backend": backend}},
            "BatchResult": {"type": "object", "properties": {
                "results": {"type": "array", "items": batch_item},
                "count": {"type": "integer"}, "errors": {"type": "integer"}}},
        }},
    }
