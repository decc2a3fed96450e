"""The app's one error type: answered as JSON ``{"error": "<code>", "message": "<words>"}``.

Any module (API, auth, rate limit, admin) raises `ApiError` (the image checks raise
chestxray.data.acceptance.ImageRejected, answered alike); the handlers in
api.py turn it, and every other HTTP error, into JSON -- never HTML, never a stack trace.
"""
from __future__ import annotations

# Machine codes for HTTP errors raised by Flask/Werkzeug itself (not by our code).
HTTP_CODES = {400: "bad_request", 401: "missing_api_key", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "file_too_large", 415: "unsupported_type",
              422: "unreadable_image", 429: "too_many_requests"}


class ApiError(Exception):
    """An error answered as JSON with `status`, a short machine `code`, a `message` in words, optional headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}
