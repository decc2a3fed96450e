"""Drift monitoring: running statistics of what the app has scored, compared with the training reference.

Per image the monitor adds to fixed-bin histograms and running sums (evaluation.drift's signals:
input intensity mean and spread, image size, feature-space distance, confidence) and to the
predicted-class counts; nothing else is kept, so memory stays bounded and nothing identifies an
image or a patient. Once CHESTXRAY_DRIFT_MIN_COUNT images were scored, each signal is compared
with the reference stage's histograms (evaluation.drift) and the drift flag says which drifted.

    GET /monitoring   counts, live and reference summaries, the comparisons, the drift flag and its reasons
"""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any

import numpy as np
from flask import Blueprint, current_app, jsonify

from chestxray.evaluation import drift
from chestxray.model.ood import ACCEPT, WARN
from chestxray.serving.auth import requires_role

bp = Blueprint("monitoring", __name__)
EXTENSION = "chestxray_monitor"
# The verdicts counted: the population check's ACCEPT and WARN (a prediction served with the warning
# outside_validated_population), and REFUSE for an image refused as not a chest X-ray (the refusal's own
# detector, issue #14, reports it here; the population check never refuses).
REFUSE = "refuse"


class _Running:
    """Histogram, count, sum and sum of squares of one signal."""

    def __init__(self, signal: drift.Signal):
        self.signal = signal
        self.counts = np.zeros(len(signal.edges) - 1, np.int64)
        self.n, self.total, self.squares = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        self.counts += self.signal.histogram(values)
        self.n += len(values)
        self.total += float(values.sum())
        self.squares += float(np.square(values).sum())

    def summary(self) -> dict:
        if not self.n:
            return {"n": 0}
        mean = self.total / self.n
        std = max(self.squares / self.n - mean * mean, 0.0) ** 0.5
        return {"n": self.n, "mean": round(mean, 4), "std": round(std, 4)}


class Monitor:
    """Thread-safe running statistics of scored images, and their comparison with the training reference.

    `reference` None (no reference stage output for this model) keeps counting but cannot flag drift;
    `no_reference_reason` says why. Prometheus counters go to `registry` (one per app).
    """

    def __init__(self, reference: drift.DriftReference | None, min_count: int, registry=None,
                 no_reference_reason: str | None = None):
        self.min_count = max(1, int(min_count))
        self._lock = threading.Lock()
        self.restart(reference, no_reference_reason)
        self._metrics = _PrometheusMonitor(registry, self) if registry is not None else None

    def restart(self, reference: drift.DriftReference | None, no_reference_reason: str | None = None) -> None:
        """Start counting afresh against `reference` (a reloaded model brings its own training reference)."""
        signals = reference.signals.values() if reference is not None else drift.NUMERIC_SIGNALS
        with self._lock:
            self.reference = reference
            self.no_reference_reason = no_reference_reason
            self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._running = {s.name: _Running(s) for s in signals}
            self._classes: dict[str, int] = {}
            self._outcomes = {ACCEPT: 0, WARN: 0, REFUSE: 0}
            self._images = 0

    def observe(self, inputs: np.ndarray, sides: list[int], predictions: list, verdicts: list[str | None]) -> None:
        """Record a batch of scored images: prepared inputs (N, size, size, 3), longer sides, predictions, verdicts.

        A verdict is "accept" or "warn" (the population check's; None when it is off) or "refuse" (not a
        chest X-ray); refused images count for the input signals and the distance, not for confidence or
        class mix.
        """
        values = {**drift.input_signals(inputs), drift.IMAGE_SIDE.name: np.asarray(sides, np.float64)}
        served = [p for p, v in zip(predictions, verdicts) if v != REFUSE]
        values[drift.CONFIDENCE.name] = np.array([p.confidence for p in served], np.float64)
        distances = [p.ood_distance for p in predictions if p.ood_distance is not None]
        values["ood_distance"] = np.array(distances, np.float64)
        with self._lock:
            self._images += len(predictions)
            for name, running in self._running.items():
                if name in values and len(values[name]):
                    running.add(values[name])
            for prediction in served:
                self._classes[prediction.predicted_class] = self._classes.get(prediction.predicted_class, 0) + 1
            for verdict in verdicts:
                self._outcomes[verdict or ACCEPT] += 1
        if self._metrics is not None:
            self._metrics.record(served, verdicts)

    def refused(self, count: int) -> None:
        """Count images refused as not a chest X-ray (they never reach the network, so observe() does not see them)."""
        if count <= 0:
            return
        with self._lock:
            self._outcomes[REFUSE] += count
        if self._metrics is not None:
            self._metrics.not_xray.labels("refused").inc(count)

    def snapshot(self) -> dict[str, Any]:
        """Everything /monitoring answers: counts, live vs reference per signal, class mix, the drift flag."""
        with self._lock:
            images, outcomes, classes = self._images, dict(self._outcomes), dict(self._classes)
            live = {name: (r.summary(), r.counts.copy()) for name, r in self._running.items()}
        signals, reasons = {}, []
        enough = images >= self.min_count and self.reference is not None
        for name, (summary, counts) in live.items():
            entry = {"description": self._running[name].signal.description, "live": summary}
            if self.reference is not None:
                entry["reference"] = self.reference.summaries.get(name)
                comparison = self._compare(name, counts, enough)
                entry.update(comparison)
                if comparison.get("drift"):
                    reasons.append(_reason(name, entry))
            signals[name] = entry
        mix = {"live": classes}
        if self.reference is not None:
            mix["reference"] = self.reference.class_mix
            if enough and sum(classes.values()):
                mix.update(drift.compare_categorical(classes, self.reference.class_mix))
                if mix["drift"]:
                    reasons.append(f"class mix: live {_shares(classes)} vs reference "
                                   f"{_shares(self.reference.class_mix)} (total variation {mix['tv_distance']:.2f} "
                                   f"> {mix['limit']:.2f})")
        return {"started_at": self.started_at, "images": images,
                "outcomes": {"accepted": outcomes[ACCEPT], "warned": outcomes[WARN], "refused": outcomes[REFUSE]},
                "signals": signals, "class_mix": mix, "drift": self._drift(images, reasons)}

    def drift_flag(self) -> bool:
        """True when at least one signal has drifted (False while collecting or without a reference)."""
        return bool(self.snapshot()["drift"]["flag"])

    def _compare(self, name: str, counts: np.ndarray, enough: bool) -> dict:
        reference = self.reference.histograms[name]
        if np.count_nonzero(reference) <= 1:
            return {"compared": False, "note": "the reference has a single value (e.g. training images all resized "
                                               "to one size): not compared"}
        if not enough or not counts.sum():
            return {"compared": False}
        return {"compared": True, **drift.compare_numeric(counts, reference)}

    def _drift(self, images: int, reasons: list[str]) -> dict:
        if self.reference is None:
            return {"status": "no_reference", "flag": None, "reasons": [], "min_count": self.min_count,
                    "message": f"drift is not checked: {self.no_reference_reason or 'no training reference'}"}
        if images < self.min_count:
            return {"status": "collecting", "flag": None, "reasons": [], "min_count": self.min_count,
                    "message": f"{images} of {self.min_count} images seen before drift is checked"}
        return {"status": "drift" if reasons else "ok", "flag": bool(reasons), "reasons": reasons,
                "min_count": self.min_count}


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counts.items())


def _reason(name: str, entry: dict) -> str:
    live, ref = entry["live"], entry["reference"] or {}
    return (f"{name} ({entry['description']}): live mean {live.get('mean', float('nan')):.3g} vs reference "
            f"{ref.get('mean', float('nan')):.3g} (KS distance {entry['ks_distance']:.2f} > {entry['limit']:.2f}, "
            f"{live['n']} images)")


class _PrometheusMonitor:
    """The monitor's Prometheus series: predictions by class, population warnings, not-a-chest-X-ray refusals,
    the drift flag."""

    def __init__(self, registry, monitor: Monitor):
        from prometheus_client import Counter, Gauge

        self.predictions = Counter("chestxray_predictions", "Predictions served, by predicted class",
                                   ["predicted_class"], registry=registry)
        self.population = Counter("chestxray_outside_validated_population",
                                  "Predictions served with the warning outside_validated_population",
                                  registry=registry)
        self.not_xray = Counter("chestxray_not_a_chest_xray", "Images refused as not a chest X-ray",
                                ["outcome"], registry=registry)
        self.not_xray.labels("refused")  # export zero before the first one
        drift_gauge = Gauge("chestxray_drift", "1 when the served images have drifted from the training reference",
                            registry=registry)
        drift_gauge.set_function(lambda: float(monitor.drift_flag()))

    def record(self, served: list, verdicts: list[str | None]) -> None:
        for prediction in served:
            self.predictions.labels(prediction.predicted_class).inc()
        for verdict in verdicts:
            if verdict == WARN:
                self.population.inc()
            elif verdict == REFUSE:
                self.not_xray.labels("refused").inc()


def reference_for(predictor) -> tuple[drift.DriftReference | None, str | None]:
    """A loaded predictor's drift reference, or None and the reason."""
    if predictor is None:
        return None, "no model loaded"
    reference = predictor.population_check.drift_reference
    return reference, None if reference is not None else predictor.population_check.off_reason


def monitor_for(predictor, min_count: int, registry=None) -> Monitor:
    """The monitor for a loaded predictor (its drift reference), or for no model."""
    reference, reason = reference_for(predictor)
    return Monitor(reference, min_count, registry, reason)


def current_monitor() -> Monitor:
    """The app's monitor."""
    return current_app.extensions[EXTENSION]


@bp.get("/monitoring")
@requires_role("admin")
def monitoring():
    """Running statistics of the images scored since start-up, compared with the training reference."""
    return jsonify(current_monitor().snapshot())
