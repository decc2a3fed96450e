"""Prometheus metrics at GET /metrics: requests by endpoint and status, latency, and the monitor's series.

Each app has its own CollectorRegistry (several apps in one process, as in the tests, do not clash).
The endpoint label is the URL rule (e.g. /predict), never the raw path, so the label set stays small.
With several gunicorn workers each worker counts its own requests (serve with -w 1, or scrape each).
"""
from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, g, request

bp = Blueprint("metrics", __name__)
EXTENSION = "chestxray_metrics"
# Latency buckets in seconds: a prediction takes ~50 ms on 2 cores, an explanation with Gemini up to ~10 s.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The app's registry and its request counter and latency histogram."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("chestxray_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("chestxray_http_request_duration_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=BUCKETS, registry=self.registry)


def _endpoint() -> str:
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


@bp.before_app_request
def _start_timer():
    g.chestxray_started = time.perf_counter()


@bp.after_app_request
def _count(response):
    metrics: Metrics = current_app.extensions[EXTENSION]
    endpoint = _endpoint()
    metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
    started = g.get("chestxray_started")
    if started is not None:
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
    return response


@bp.get("/metrics")
def metrics():
    """The app's metrics in the Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(current_app.extensions[EXTENSION].registry), content_type=CONTENT_TYPE_LATEST)
