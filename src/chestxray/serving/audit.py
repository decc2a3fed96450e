"""The audit log: one JSON line per request to the API (not /health, not static files).

Fields: ``time`` (UTC, ISO 8601), ``key_id`` (null in open mode; never the key), ``method``,
``endpoint`` (the route, e.g. ``/predict``; never the raw path), ``status``, ``outcome`` (``ok`` or
the error code), ``model_version``, ``latency_ms``. Deliberately absent: image bytes, file names,
form fields, query strings, client addresses and headers -- nothing that could identify a patient
or a person.

Written to the file CHESTXRAY_AUDIT_LOG (appended, one line per request) when set, else to the
logger ``chestxray.audit`` (stderr under gunicorn.conf.py).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime

from flask import Flask, Response, g, request

from chestxray.serving.model_state import current_state

LOGGER = logging.getLogger("chestxray.audit")
LOGGER.setLevel(logging.INFO)
EXTENSION = "chestxray.audit"
UNAUDITED = ("/health", "/static/")


class AuditLog:
    """Appends JSON lines to a file (thread-safe), or hands them to the `chestxray.audit` logger."""

    def __init__(self, path: str = ""):
        self._lock = threading.Lock()
        self._file = None
        if path:
            # 0o640: the audit trail is for the operators, not every local user.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, entry: dict) -> None:
        line = json.dumps(entry, separators=(",", ":"))
        if self._file is None:
            LOGGER.info(line)
            return
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


def _start() -> None:
    g.audit_started = time.perf_counter()


def _entry(response: Response) -> dict:
    rule = request.url_rule.rule if request.url_rule is not None else None
    state = current_state()  # the model this request used (or, for a reload, the one it replaced)
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "key_id": g.get("key_id"),
        "method": request.method,
        "endpoint": rule,  # None for unknown paths: a raw path could carry anything
        "status": response.status_code,
        "outcome": g.get("error_code") or ("ok" if response.status_code < 400 else str(response.status_code)),
        "model_version": state.version,
        "latency_ms": round((time.perf_counter() - g.get("audit_started", time.perf_counter())) * 1000, 1),
    }


def install(app: Flask, path: str) -> None:
    """Audit every request of `app` except health checks and static files."""
    log = AuditLog(path)
    app.extensions[EXTENSION] = log

    @app.after_request
    def _audit(response: Response) -> Response:
        if not request.path.startswith(UNAUDITED):
            log.write(_entry(response))
        return response

    app.before_request(_start)
