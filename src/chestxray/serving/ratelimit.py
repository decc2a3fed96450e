"""Rate limiting: a token bucket per API key id (per client address in open mode).

Each identity may make CHESTXRAY_RATE_LIMIT_BURST requests at once, refilled at
CHESTXRAY_RATE_LIMIT_PER_MIN per minute; past that it gets 429 ``too_many_requests`` with a
Retry-After header. CHESTXRAY_RATE_LIMIT_PER_MIN=0 turns limiting off. The buckets live in the
worker process (the app runs one gunicorn worker, so that is the whole server).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from flask import current_app

from chestxray.serving.errors import ApiError

EXTENSION = "chestxray.ratelimit"
MAX_TRACKED = 10_000  # identities remembered; full buckets are forgotten first (they carry no state)


class TokenBuckets:
    """Thread-safe token buckets keyed by identity."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = max(1, int(burst))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, when)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, identity: str) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens, when = self._buckets.get(identity, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            if tokens >= 1.0:
                self._buckets[identity] = (tokens - 1.0, now)
                self._forget_full(now)
                return 0.0
            self._buckets[identity] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Bound memory under many client addresses: drop buckets that have refilled completely."""
        if len(self._buckets) <= MAX_TRACKED:
            return
        for identity, (tokens, when) in list(self._buckets.items()):
            if tokens + (now - when) * self.rate >= self.burst:
                del self._buckets[identity]


def install(app, per_minute: float, burst: int) -> None:
    """Give the app its buckets."""
    app.extensions[EXTENSION] = TokenBuckets(per_minute, burst)


def charge(identity: str) -> None:
    """Count one request for `identity`; raise 429 with Retry-After when its bucket is empty."""
    wait = current_app.extensions[EXTENSION].take(identity)
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise ApiError(429, "too_many_requests", f"rate limit exceeded; try again in {seconds} s",
                       headers={"Retry-After": str(seconds)})
