"""Security headers on every response.

The Content-Security-Policy fits the page exactly: its own script and stylesheet, pictures from
the page itself, from blob: (the uploaded file shown back) and data: (the Grad-CAM PNG and the
empty favicon), fetches to its own origin; nothing inline, no plugins, no framing. Answers other
than static files are marked no-store: predictions are about patients and must not sit in caches.
"""
from __future__ import annotations

from flask import Flask, Response, request

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def add_security_headers(response: Response) -> Response:
    """Set HEADERS, and Cache-Control no-store on everything but static files."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def install(app: Flask) -> None:
    """Add the headers to every response of `app`."""
    app.after_request(add_security_headers)
