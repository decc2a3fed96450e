"""The JSON API: health, model info, single/batch prediction, prediction with explanation, OpenAPI.

Every error is JSON ``{"error": "<code>", "message": "<words>"}`` with a 4xx status (503 while no
model is loaded). Image bytes and file names are never logged.
"""
from __future__ import annotations

import base64
import logging
import time
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, render_template, request, url_for
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException

from chestxray.data.preprocess import ImageError, decode_image, image_format, prepare_image
from chestxray.serving.config import MAX_SIDE, MIN_SIDE

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)

HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "file_too_large",
              415: "unsupported_type", 422: "unreadable_image", 429: "too_many_requests"}


class ApiError(Exception):
    """An error answered as JSON with `status`, a short machine `code` and a `message` in words."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


# --- checking uploads -------------------------------------------------------------------------

def check_image(data: bytes) -> np.ndarray:
    """Decode uploaded bytes to grayscale, or raise ApiError saying in words what is wrong."""
    if not data:
        raise ApiError(400, "empty_file", "the file is empty")
    if image_format(data) is None:
        raise ApiError(415, "unsupported_type", "not a JPEG, PNG or DICOM image")
    try:
        gray = decode_image(data)
    except ImageError as exc:
        raise ApiError(422, "unreadable_image", str(exc)) from None
    height, width = gray.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ApiError(422, "image_too_small",
                       f"image is {width}x{height} px; each side must be at least {MIN_SIDE} px")
    if max(height, width) > MAX_SIDE:
        raise ApiError(422, "image_too_large",
                       f"image is {width}x{height} px; each side must be at most {MAX_SIDE} px")
    return gray


def _read_upload(upload: FileStorage) -> np.ndarray:
    """Bytes of one uploaded file, size-checked, decoded to grayscale."""
    limit_mb = current_app.config["CHESTXRAY_MAX_UPLOAD_MB"]
    limit = int(limit_mb * 1024 * 1024)
    data = upload.stream.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "file_too_large", f"the file is larger than {limit_mb:g} MB")
    return check_image(data)


def _classifier():
    state = current_app.extensions["chestxray"]
    if state.classifier is None:
        raise ApiError(503, "model_unavailable", state.error or "no model loaded")
    return state.classifier


def _one_file(field: str = "file") -> FileStorage:
    upload = request.files.get(field)
    if upload is None:
        raise ApiError(400, "missing_file", f"send the image as multipart/form-data in the field '{field}'")
    return upload


def _result(clf, prediction, started: float) -> dict[str, Any]:
    return {**prediction.to_dict(), "model_version": clf.version,
            "inference_time_ms": round((time.perf_counter() - started) * 1000, 1)}


# --- endpoints --------------------------------------------------------------------------------

@bp.get("/health")
def health():
    """200 when a model is loaded, else 503 with the reason."""
    state = current_app.extensions["chestxray"]
    if state.classifier is None:
        return jsonify(status="unavailable", error="model_unavailable", message=state.error), 503
    return jsonify(status="ready", model_version=state.classifier.version, backend=state.classifier.backend)


@bp.get("/model/info")
def model_info():
    """What the loaded model is: classes, input size, backbone, training date, test metrics, calibration, card."""
    clf = _classifier()
    return jsonify(
        model_version=clf.version,
        backend=clf.backend,
        classes=clf.classes,
        normal_class=clf.normal_class,
        input_size=[clf.image_size, clf.image_size, 3],
        backbone=clf.info.get("backbone"),
        trained_at=clf.info.get("trained_at"),
        test_metrics=clf.metrics,
        thresholds={"decision_threshold": clf.decision_threshold, "low_confidence": clf.low_confidence_threshold,
                    "temperature": clf.temperature},
        low_confidence_rule=clf.thresholds.get("low_confidence_rule"),
        tta=clf.tta,
        model_card=url_for("api.model_card") if clf.card_path is not None else None,
        limits=_limits(),
    )


@bp.get("/model/card")
def model_card():
    """The model card: Markdown, or a simple HTML page for browsers (Accept: text/html, or ?format=html)."""
    clf = _classifier()
    if clf.card_path is None:
        raise ApiError(404, "no_model_card", "this model has no model card -- run the pipeline's model_card stage "
                                             "(`dvc repro model_card`)")
    text = clf.card_path.read_text()
    wanted = request.args.get("format") or (
        "html" if request.accept_mimetypes.best_match(["text/markdown", "text/html"]) == "text/html" else "md")
    if wanted == "html":
        from markdown_it import MarkdownIt

        # Raw HTML in the Markdown stays text: the card is rendered, never trusted as markup.
        body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
        return render_template("model_card.html", card_html=body, model_version=clf.version)
    if wanted != "md":
        raise ApiError(400, "bad_format", f"format={wanted!r}: use md or html")
    return Response(text, mimetype="text/markdown")


def _limits() -> dict[str, Any]:
    cfg = current_app.config
    return {"max_upload_mb": cfg["CHESTXRAY_MAX_UPLOAD_MB"], "max_batch": cfg["CHESTXRAY_MAX_BATCH"],
            "min_side_px": MIN_SIDE, "max_side_px": MAX_SIDE, "formats": ["jpeg", "png", "dicom"]}


@bp.post("/predict")
def predict():
    """Predict one image sent in the multipart field `file`."""
    clf = _classifier()
    gray = _read_upload(_one_file())
    started = time.perf_counter()
    prediction = clf.predict_arrays(prepare_image(gray, clf.image_size)[None])[0]
    return jsonify(_result(clf, prediction, started))


@bp.post("/predict/batch")
def predict_batch():
    """Predict up to CHESTXRAY_MAX_BATCH images sent in the field `files`: one result or error each, in order."""
    clf = _classifier()
    uploads = request.files.getlist("files")
    if not uploads:
        raise ApiError(400, "missing_file", "send the images as multipart/form-data in the field 'files'")
    max_batch = current_app.config["CHESTXRAY_MAX_BATCH"]
    if len(uploads) > max_batch:
        raise ApiError(400, "too_many_files", f"{len(uploads)} files sent; at most {max_batch} per request")
    results: list[dict[str, Any]] = []
    inputs, slots = [], []
    for index, upload in enumerate(uploads):
        try:
            inputs.append(prepare_image(_read_upload(upload), clf.image_size))
            slots.append(index)
            results.append({})
        except ApiError as exc:
            results.append({"index": index, **exc.to_dict()})
    started = time.perf_counter()
    predictions = clf.predict_arrays(np.stack(inputs)) if inputs else []
    for index, prediction in zip(slots, predictions, strict=True):
        results[index] = {"index": index, **_result(clf, prediction, started)}
    return jsonify(results=results, count=len(results), errors=len(results) - len(inputs))


@bp.post("/predict/explain")
def predict_explain():
    """As /predict, plus a Grad-CAM overlay (base64 PNG) and, when Gemini answers, a short explanation."""
    from chestxray.explain import gemini, gradcam

    clf = _classifier()
    upload = _one_file()
    requested = (request.form.get("class") or "").strip() or None
    if requested is not None and requested not in clf.classes:
        raise ApiError(400, "unknown_class", f"unknown class {requested!r}; choose one of: {', '.join(clf.classes)}")
    gray = _read_upload(upload)
    started = time.perf_counter()
    prediction = clf.predict_arrays(prepare_image(gray, clf.image_size)[None])[0]
    result = _result(clf, prediction, started)
    started = time.perf_counter()
    try:
        cam = gradcam.explain(clf, gray, requested or prediction.predicted_class)
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

@bp.app_errorhandler(ApiError)
def _api_error(exc: ApiError):
    return jsonify(exc.to_dict()), exc.status


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    status = exc.code or 400
    message = exc.description or exc.name
    if status == 413:
        limit_mb = current_app.config["CHESTXRAY_MAX_UPLOAD_MB"]
        message = f"the upload is too large (at most {limit_mb:g} MB per file)"
    return jsonify(error=HTTP_CODES.get(status, exc.name.lower().replace(" ", "_")), message=message), status


@bp.app_errorhandler(Exception)
def _unexpected(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return jsonify(error="internal_error", message="the server failed to process the request"), 500


@bp.after_app_request
def _log_request(response):
    # Method, path, status only: never file names or contents.
    log.info("%s %s -> %s", request.method, request.path, response.status_code)
    return response


# --- OpenAPI ----------------------------------------------------------------------------------

def _json(ref: str, description: str) -> dict:
    schema = {"$ref": f"#/components/schemas/{ref}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_response(description: str) -> dict:
    return _json("Error", description)


def _upload_body(field: str, many: bool, extra: dict | None = None) -> dict:
    file_schema = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": file_schema} if many else file_schema
    props = {field: prop, **(extra or {})}
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": props}}}}


_UPLOAD_ERRORS = {
    "400": _error_response("missing field, empty file, too many files or unknown class"),
    "413": _error_response("file larger than the upload limit"),
    "415": _error_response("not a JPEG, PNG or DICOM image"),
    "422": _error_response("corrupt/truncated image, or a side outside 128-4096 px"),
    "503": _error_response("no model loaded"),
}


def openapi_document() -> dict:
    """The hand-written OpenAPI 3 document for every endpoint of this blueprint."""
    number = {"type": "number"}
    backend = {"type": "string", "enum": ["onnx", "keras"], "description": "what computes the probabilities"}
    prediction = {
        "type": "object",
        "required": ["predicted_class", "confidence", "probabilities", "low_confidence", "warnings", "model_version"],
        "properties": {
            "predicted_class": {"type": "string"},
            "confidence": {**number, "minimum": 0, "maximum": 1},
            "probabilities": {"type": "object", "additionalProperties": number, "description": "per class"},
            "low_confidence": {"type": "boolean", "description": "confidence below the low-confidence threshold"},
            "warnings": {"type": "array", "items": {"type": "string"}},
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
        {"allOf": [{"$ref": "#/components/schemas/Error"},
                   {"type": "object", "properties": {"index": {"type": "integer"}}}]},
    ]}
    return {
        "openapi": "3.0.3",
        "info": {"title": "chestxray API", "version": "1",
                 "description": "Chest X-ray classification for decision support. Not a diagnosis."},
        "paths": {
            "/health": {"get": {"summary": "Is a model loaded?", "responses": {
                "200": _json("Health", "ready"), "503": _json("Health", "no model; message says why")}}},
            "/model/info": {"get": {"summary": "The loaded model", "responses": {
                "200": _json("ModelInfo", "classes, input size, backbone, training date, metrics, thresholds"),
                "503": _error_response("no model loaded")}}},
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
            "/predict": {"post": {"summary": "Classify one image (JPEG, PNG or DICOM)",
                                  "requestBody": _upload_body("file", many=False),
                                  "responses": {"200": _json("Prediction", "the prediction"), **_UPLOAD_ERRORS}}},
            "/predict/batch": {"post": {"summary": "Classify several images; one result or error per file, in order",
                                        "requestBody": _upload_body("files", many=True),
                                        "responses": {"200": _json("BatchResult", "results in upload order"),
                                                      **_UPLOAD_ERRORS}}},
            "/predict/explain": {"post": {
                "summary": "Classify one image and explain it (Grad-CAM overlay, optional Gemini text)",
                "requestBody": _upload_body("file", many=False, extra={
                    "class": {"type": "string", "description": "explain this class instead of the predicted one"}}),
                "responses": {"200": _json("ExplainedPrediction", "prediction with explanation"), **_UPLOAD_ERRORS}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}},
        },
        "components": {"schemas": {
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
                "limits": {"type": "object"}}},
            "Prediction": prediction,
            "ExplainedPrediction": explained,
            "BatchResult": {"type": "object", "properties": {
                "results": {"type": "array", "items": batch_item},
                "count": {"type": "integer"}, "errors": {"type": "integer"}}},
        }},
    }
