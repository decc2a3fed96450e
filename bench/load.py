"""Load test: concurrent clients sending real full-size X-rays to /predict of the app under gunicorn.

    python bench/load.py                                   # the real model in artifacts/, 8 clients x 2,000 requests
    python bench/load.py --artifacts /path/to/artifacts --clients 8 --requests 2000 --max-seconds 1200

Localhost only and bounded: at most --requests requests, stopping early after --max-seconds. The
server runs as `make app` runs it (gunicorn.conf.py: 1 worker, 4 threads) with API keys on and the
rate limiter on but set above the offered load, so auth, limiting and the audit log are all in the
measured path. Reports answers by status, latency p50/p95/p99, throughput and the worker's RSS
after a warm-up and at the end (growth %), and writes bench/results/load.json (git-ignored).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from inference import FULLSIZE, ROOT, Server, load, save

KEY_ID, KEY = "load", "load-test-key-0123456789abcdef"
WARM_UP = 50  # requests before the baseline memory sample: allocator pools and caches settle


def run(artifacts: Path, clients: int, n_requests: int, max_seconds: float, port: int, backend: str = "auto",
        log_dir: Path | None = None) -> dict:
    """Start the server, warm it up, send the load, sample memory; the result as a dict."""
    uploads = [p.read_bytes() for p in FULLSIZE]
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="chestxray-load-"))
    env = {"CHESTXRAY_API_KEYS": f"{KEY_ID}:{KEY}:user", "CHESTXRAY_RATE_LIMIT_PER_MIN": str(100 * n_requests),
           "CHESTXRAY_RATE_LIMIT_BURST": str(n_requests + WARM_UP), "CHESTXRAY_AUDIT_LOG": str(log_dir / "audit.jsonl")}
    headers = {"X-API-Key": KEY}
    server = Server(artifacts, port, backend, env=env, log=log_dir / "server.log")
    try:
        health = server.wait_ready()
        warm = load(server.url, uploads, min(clients, 4), WARM_UP, headers=headers)
        rss_before = server.rss_mib()
        result = load(server.url, uploads, clients, n_requests, headers=headers, max_seconds=max_seconds)
        rss_after = server.rss_mib()
    finally:
        server.stop()
    audited = sum(1 for _ in open(log_dir / "audit.jsonl", encoding="utf-8"))
    return {
        "model_version": health.get("model_version"), "backend": health.get("backend"),
        "artifacts": str(artifacts), "images": len(uploads),
        "warm_up": {"requests": WARM_UP, "errors": warm["errors"]},
        **result, "requested": n_requests, "max_seconds": max_seconds,
        "rss_mib_before": round(rss_before, 1), "rss_mib_after": round(rss_after, 1),
        "rss_growth_pct": round((rss_after / rss_before - 1) * 100, 1),
        "audit_lines": audited, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
    }


def report(r: dict) -> str:
    """The result in a few lines of text."""
    return "\n".join([
        f"model {r['model_version']} ({r['backend']}), {r['images']} full-size images, {r['clients']} clients",
        f"requests: {r['n']} of {r['requested']} in {r['seconds']} s -> {r['throughput_rps']} req/s",
        f"answers by status: {r['statuses']}  (errors: {r['errors']})",
        f"latency ms: p50 {r['p50_ms']}  p95 {r['p95_ms']}  p99 {r['p99_ms']}  mean {r['mean_ms']}",
        f"worker RSS: {r['rss_mib_before']} -> {r['rss_mib_after']} MiB ({r['rss_growth_pct']:+.1f}%)",
        f"audit log lines: {r['audit_lines']}; load average at the end: {', '.join(f'{x:.2f}' for x in r['load_average'])}",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop sending after this long")
    parser.add_argument("--backend", default="auto", help="CHESTXRAY_BACKEND for the server")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not (args.artifacts / "training" / "model.keras").is_file():
        sys.exit(f"error: no trained model under {args.artifacts} (run `dvc repro`, or pass --artifacts)")
    if not FULLSIZE:
        sys.exit("error: no full-size images found (../shared/data/kermany-val-fullsize)")
    started = time.perf_counter()
    result = run(args.artifacts, args.clients, args.requests, args.max_seconds, args.port, args.backend)
    result["total_seconds"] = round(time.perf_counter() - started)
    save(args.out, result, report(result))


if __name__ == "__main__":
    main()
