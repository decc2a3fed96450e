"""Inference speed on real images: Keras `model.predict` vs the served path, in-process and over HTTP.

    python bench/inference.py                      # from the project root, with the venv active, after `dvc repro`
    python bench/inference.py --soak 2000 --artifacts artifacts

In-process (each path in its own child process, one after the other, so peak memory is its own):
  keras_predict  decode at full size + prepare_image + `model.predict` (the plain Keras way)
  keras_graph    decode at full size + prepare_image + the Keras model as a traced tf.function
                 (what the app served before ONNX)
  served         `Predictor.prepare` + the Predictor's backend, as the app runs it (ONNX Runtime when
                 artifacts/export/model.onnx exists)
measuring single-image latency p50/p95 (decode + preprocess + inference) on the full-size originals
and on the 224 px test set, batch throughput on the 224 px test set, and peak RSS.
Then the batch throughput of keras_predict and served once more, paired: both paths in one process,
alternating on the same chunks of the test set seconds apart, so that the machine's drift over
minutes does not move their ratio (the issue's batch bar is judged on the median paired ratio).

Over HTTP: the app under gunicorn on 127.0.0.1 (as in the README: 1 worker, 4 threads), /predict
with full-size uploads from 1, 4 and 8 concurrent clients (bounded request counts), then a soak of
--soak requests sampling the server's memory. Clients run on the same 2-core machine.

Prints a Markdown table and writes bench/results/inference.json (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHESTXRAY_SHARED", ROOT.parent / "shared"))
FULLSIZE = sorted((SHARED / "data" / "kermany-val-fullsize").glob("*/*.jpeg"))
TEST224 = sorted((SHARED / "data" / "kermany224" / "test").glob("*/*.jpeg"))
PATHS = ("keras_predict", "keras_graph", "served")
BATCH = 32


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 / p95 / p99 / mean in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {**{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)},
            "mean_ms": round(float(ms.mean()), 1), "n": int(len(ms))}


# --- in-process, one path per child process ---------------------------------------------------------

def _path_functions(path: str, artifacts: Path):
    """(prepare: bytes -> input, infer: batch -> probabilities, backend name) for one measured path."""
    from chestxray.data.preprocess import decode_image, prepare_image
    from chestxray.model.predictor import Predictor

    if path == "served":
        clf = Predictor.from_artifacts(artifacts)  # what the app loads by default (backend auto)
        return clf.prepare, clf.served_probabilities, clf.backend
    clf = Predictor.from_artifacts(artifacts, backend="keras")

    def prepare(data: bytes) -> np.ndarray:
        return prepare_image(decode_image(data), clf.image_size)

    if path == "keras_predict":
        return prepare, lambda x: clf.model.predict(x, batch_size=BATCH, verbose=0), "keras"
    return prepare, clf.served_probabilities, "keras"


def _reduced_decode(data: bytes, image_size: int) -> np.ndarray:
    """libjpeg DCT-scaled decoding at 1/8, 1/4 or 1/2, the largest leaving each side >= 2x the input size."""
    import io

    import cv2
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:  # the header only
        side = min(img.size)
    for factor, flag in ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                         (2, cv2.IMREAD_REDUCED_GRAYSCALE_2), (1, cv2.IMREAD_GRAYSCALE)):
        if side // factor >= 2 * image_size or factor == 1:
            return cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    raise AssertionError("unreachable")


def reduced_decoding_experiment(artifacts: Path, rounds: int) -> dict:
    """Would reduced JPEG decoding pay? Its time and how far it moves the inputs and probabilities (originals).

    Not adopted in chestxray.data.preprocess: on the Kermany originals it saved about 2.5 ms of a 5.7 ms
    decode + preprocess, yet moved some pixels of the model input by up to 26 gray levels and a
    probability by up to 0.03. Kept here so the decision can be re-measured on other data.
    """
    from chestxray.data.preprocess import decode_image, prepare_image
    from chestxray.model.predictor import Predictor

    clf = Predictor.from_artifacts(artifacts)
    datas, size = [p.read_bytes() for p in FULLSIZE], clf.image_size
    ways = {"full": lambda d: prepare_image(decode_image(d), size),
            "reduced": lambda d: prepare_image(_reduced_decode(d, size), size)}
    times = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            for data in datas:
                started = time.perf_counter()
                way(data)
                times[name].append(time.perf_counter() - started)
    x = {name: np.stack([way(d) for d in datas]) for name, way in ways.items()}
    p = {name: clf.served_probabilities(v) for name, v in x.items()}
    return {"images": len(datas), "decode_preprocess_full": percentiles(times["full"]),
            "decode_preprocess_reduced": percentiles(times["reduced"]),
            "input_max_abs_diff": float(np.abs(x["full"] - x["reduced"]).max()),
            "input_mean_abs_diff": round(float(np.abs(x["full"] - x["reduced"]).mean()), 4),
            "probability_max_abs_diff": float(np.abs(p["full"] - p["reduced"]).max()),
            "class_changes": int((p["full"].argmax(1) != p["reduced"].argmax(1)).sum())}


def measure_path(path: str, artifacts: Path, rounds: int, single_224: int) -> dict:
    """Latency, throughput and peak memory of one path, in this process."""
    prepare, infer, backend = _path_functions(path, artifacts)
    full = [p.read_bytes() for p in FULLSIZE]
    small = [p.read_bytes() for p in TEST224]
    for data in full[:2] + small[:2]:  # warm-up: traces, first-call allocations
        infer(prepare(data)[None])
    infer(np.stack([prepare(d) for d in small[:BATCH]]))

    def one(data: bytes) -> float:
        started = time.perf_counter()
        infer(prepare(data)[None])
        return time.perf_counter() - started

    single_full = [one(d) for _ in range(rounds) for d in full]
    single_small = [one(d) for d in small[:single_224]]
    decode_full = []
    for _ in range(rounds):
        for data in full:
            started = time.perf_counter()
            prepare(data)
            decode_full.append(time.perf_counter() - started)

    batch_s = batch_seconds(prepare, infer, small)
    return {
        "path": path, "backend": backend,
        "single_fullsize": percentiles(single_full),
        "single_224": percentiles(single_small),
        "decode_preprocess_fullsize": percentiles(decode_full),
        "batch_throughput_ips": round(len(small) / batch_s, 1), "batch_images": len(small), "batch_size": BATCH,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def batch_seconds(prepare, infer, datas: list[bytes]) -> float:
    """Seconds to decode, prepare and infer `datas` in batches of BATCH, as the batch CLI does."""
    started = time.perf_counter()
    for i in range(0, len(datas), BATCH):
        infer(np.stack([prepare(d) for d in datas[i : i + BATCH]]))
    return time.perf_counter() - started


def paired_batches(artifacts: Path, pairs: int) -> dict:
    """Batch throughput of keras predict and of the served path, alternating in one process.

    The per-path children run minutes apart, and this shared 2-core machine's speed drifts by ~20%
    over minutes, which moves their ratio as much. Here the test set is cut into `pairs` chunks and
    each chunk goes through both paths seconds apart (which one goes first alternates); the ratio is
    the median of the per-chunk ratios. A pause between the two lets the previous path's idle
    worker threads stop spinning before the next one is timed.
    """
    paths = {name: _path_functions(name, artifacts)[:2] for name in ("keras_predict", "served")}
    small = [p.read_bytes() for p in TEST224]
    for prepare, infer in paths.values():  # warm-up
        batch_seconds(prepare, infer, small[:BATCH])
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for k, chunk in enumerate(np.array_split(np.arange(len(small)), pairs)):
        datas = [small[i] for i in chunk]
        for name in (list(paths) if k % 2 == 0 else list(paths)[::-1]):
            time.sleep(0.5)
            rates[name].append(len(datas) / batch_seconds(*paths[name], datas))
    ratios = np.asarray(rates["served"]) / np.asarray(rates["keras_predict"])
    return {"pairs": pairs, "images": len(small), "batch_size": BATCH,
            "keras_predict_ips": [round(r, 1) for r in rates["keras_predict"]],
            "served_ips": [round(r, 1) for r in rates["served"]],
            "ratios": [round(float(r), 2) for r in ratios], "median_ratio": round(float(np.median(ratios)), 2)}


def run_child(path: str, args) -> dict:
    """Measure one path in a fresh Python process (its own memory, nothing shared with the others)."""
    mode = [path] if path.startswith("--") else ["--child", path]
    command = [sys.executable, __file__, *mode, "--artifacts", str(args.artifacts),
               "--rounds", str(args.rounds), "--single-224", str(args.single_224), "--pairs", str(args.pairs)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- over HTTP ----------------------------------------------------------------------------------------

class Server:
    """The app under gunicorn on 127.0.0.1:port with the project's gunicorn.conf.py (as `make app` runs it).

    `env` adds settings (API keys, rate limits, audit log); `log` receives the server's stderr.
    """

    def __init__(self, artifacts: Path, port: int, backend: str, env: dict[str, str] | None = None,
                 log: Path | None = None):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "CHESTXRAY_ARTIFACTS": str(artifacts), "CHESTXRAY_BACKEND": backend,
               "GEMINI_API_KEY": "", "CHESTXRAY_MODEL_URI": "", "CHESTXRAY_RATE_LIMIT_PER_MIN": "0",
               "CHESTXRAY_BIND": f"127.0.0.1:{port}", "CHESTXRAY_WARM_UP": "1", **(env or {})}  # as deployed
        gunicorn = Path(sys.executable).with_name("gunicorn")
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [str(gunicorn), "-c", str(ROOT / "gunicorn.conf.py"), "--timeout", "120", "app:app"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self._log)

    def wait_ready(self, timeout_s: float = 300) -> dict:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("gunicorn exited before the app was ready")
            try:
                response = requests.get(f"{self.url}/health", timeout=5)
                if response.status_code == 200:
                    return response.json()
                if response.status_code == 503:
                    raise RuntimeError(f"the app has no model: {response.json().get('message')}")
            except requests.RequestException:  # not listening yet, or the worker is still loading the model
                pass
            time.sleep(1)
        raise RuntimeError("the app did not become ready in time")

    def rss_mib(self) -> float:
        """Resident memory of the gunicorn worker(s), without the master."""
        import psutil

        workers = psutil.Process(self.process.pid).children(recursive=True)
        return sum(w.memory_info().rss for w in workers) / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def load(url: str, uploads: list[bytes], clients: int, n_requests: int, headers: dict[str, str] | None = None,
         max_seconds: float | None = None) -> dict:
    """n_requests POST /predict from `clients` concurrent clients (stopping early after `max_seconds`).

    Latency percentiles, throughput and answers counted by status ("error" for a failed connection).
    """
    import requests

    deadline = time.monotonic() + max_seconds if max_seconds else None

    def client(k: int) -> tuple[list[float], list[str]]:
        times, statuses = [], []
        with requests.Session() as session:
            for i in range(k, n_requests, clients):
                if deadline and time.monotonic() > deadline:
                    break
                data = uploads[i % len(uploads)]
                started = time.perf_counter()
                try:
                    response = session.post(f"{url}/predict", files={"file": ("xray.jpeg", data, "image/jpeg")},
                                            headers=headers, timeout=120)
                    statuses.append(str(response.status_code))
                except requests.RequestException as exc:
                    statuses.append(f"error:{type(exc).__name__}")
                times.append(time.perf_counter() - started)
        return times, statuses

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    times = [t for part, _ in parts for t in part]
    statuses = Counter(s for _, part in parts for s in part)
    return {"clients": clients, **percentiles(times), "throughput_rps": round(len(times) / wall, 1),
            "statuses": dict(sorted(statuses.items())), "errors": sum(n for s, n in statuses.items() if s != "200"),
            "seconds": round(wall, 1)}


def check_no_errors(level: dict) -> dict:
    """`level` (a load() result) if every answer was 200, else RuntimeError listing the statuses."""
    if level["errors"]:
        raise RuntimeError(f"/predict answered {level['statuses']}")
    return level


def measure_http(artifacts: Path, backend: str, port: int, requests_per_level: dict[int, int], soak: int) -> dict:
    """Concurrency levels, then a soak with memory sampled every 100 requests."""
    uploads = [p.read_bytes() for p in FULLSIZE]
    server = Server(artifacts, port, backend)
    try:
        health = server.wait_ready()
        levels = [check_no_errors(load(server.url, uploads, c, n)) for c, n in requests_per_level.items()]
        memory = {}
        if soak:
            samples, done = [], 0
            while done < soak:
                step = min(100, soak - done)
                check_no_errors(load(server.url, uploads, 4, step))
                done += step
                samples.append(round(server.rss_mib(), 1))
            baseline = samples[0]  # after the first 100 requests: allocator pools and caches are warm
            memory = {"requests": soak, "clients": 4, "rss_mib_every_100": samples, "baseline_mib": baseline,
                      "final_mib": samples[-1], "max_mib": max(samples),
                      "growth_pct": round((samples[-1] / baseline - 1) * 100, 1)}
        return {"backend": health.get("backend", backend), "model_version": health.get("model_version"),
                "levels": levels, "memory": memory}
    finally:
        server.stop()


# --- report -------------------------------------------------------------------------------------------

def table(result: dict) -> str:
    """Markdown tables of the in-process paths and the HTTP runs, with the issue's bars."""
    rows = ["| path | backend | 1 full-size image p50 / p95 (ms) | 1 224px image p50 / p95 (ms) | "
            "decode+prep full-size p50 (ms) | batch throughput (img/s) | peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|"]
    for r in result["in_process"]:
        rows.append(f"| {r['path']} | {r['backend']} | {r['single_fullsize']['p50_ms']} / "
                    f"{r['single_fullsize']['p95_ms']} | {r['single_224']['p50_ms']} / {r['single_224']['p95_ms']} | "
                    f"{r['decode_preprocess_fullsize']['p50_ms']} | {r['batch_throughput_ips']} | "
                    f"{r['peak_rss_mib']} |")
    rows += ["", "| HTTP /predict (full-size) | clients | p50 (ms) | p95 (ms) | throughput (req/s) | requests |",
             "|---|---|---|---|---|---|"]
    for run in result["http"]:
        for level in run["levels"]:
            rows.append(f"| {run['backend']} | {level['clients']} | {level['p50_ms']} | {level['p95_ms']} | "
                        f"{level['throughput_rps']} | {level['n']} |")
    f = result["reduced_decoding"]
    rows += ["", f"- reduced JPEG decoding (not adopted) on the {f['images']} originals: decode+prep p50 "
                 f"{f['decode_preprocess_full']['p50_ms']} -> {f['decode_preprocess_reduced']['p50_ms']} ms; "
                 f"model input max |diff| {f['input_max_abs_diff']:g} (mean {f['input_mean_abs_diff']:g}) gray "
                 f"levels; probabilities max |diff| {f['probability_max_abs_diff']:.2e}; "
                 f"class changes {f['class_changes']}"]
    rows += [*[f"- {line}" for line in result["bars"]]]
    return "\n".join(rows)


def bars(result: dict) -> list[str]:
    """The issue's targets, checked against this run."""
    by = {r["path"]: r for r in result["in_process"]}
    lines = []
    if "keras_predict" in by and "served" in by:
        k, s = by["keras_predict"], by["served"]
        lat = k["single_fullsize"]["p50_ms"] / s["single_fullsize"]["p50_ms"]
        lat224 = k["single_224"]["p50_ms"] / s["single_224"]["p50_ms"]
        thr = s["batch_throughput_ips"] / k["batch_throughput_ips"]
        lines.append(f"single-image latency p50, served vs keras predict: {lat:.2f}x faster (full-size), "
                     f"{lat224:.2f}x (224 px) [bar: >= 2x] {'OK' if min(lat, lat224) >= 2 else 'MISSED'}")
        lines.append(f"batch throughput, served vs keras predict, separate processes minutes apart: {thr:.2f}x")
    if result.get("paired_batches"):
        pb = result["paired_batches"]
        lines.append(f"batch throughput, served vs keras predict, paired on the same images ({pb['pairs']} pairs): "
                     f"median {pb['median_ratio']:.2f}x (pairs {', '.join(f'{r:.2f}' for r in pb['ratios'])}) "
                     f"[bar: >= 2x] {'OK' if pb['median_ratio'] >= 2 else 'MISSED'}")
    for run in result["http"]:
        one = next((lv for lv in run["levels"] if lv["clients"] == 1), None)
        if one:
            lines.append(f"HTTP /predict full-size, 1 client, {run['backend']}: p50 {one['p50_ms']} ms "
                         f"[bar: < 150 ms] {'OK' if one['p50_ms'] < 150 else 'MISSED'}")
        if run["memory"]:
            m = run["memory"]
            lines.append(f"server RSS over {m['requests']} requests ({run['backend']}): {m['baseline_mib']} -> "
                         f"{m['final_mib']} MiB (max {m['max_mib']}), growth {m['growth_pct']}% [bar: <= 10%] "
                         f"{'OK' if m['growth_pct'] <= 10 else 'MISSED'}")
    return lines


def save(out: Path, result: dict, text: str) -> None:
    """Write `result` as JSON to `out` and print `text` (the human-readable report)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(text)
    print(f"\nwrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the 16 full-size originals (single image)")
    parser.add_argument("--single-224", type=int, default=100, help="224 px test images timed one by one")
    parser.add_argument("--http-backends", default="auto,keras", help="app backends to serve over HTTP, in order")
    parser.add_argument("--requests", type=int, nargs=3, default=[200, 400, 400], metavar=("C1", "C4", "C8"),
                        help="requests at 1, 4 and 8 concurrent clients")
    parser.add_argument("--soak", type=int, default=2000, help="requests of the memory soak (first backend only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=6, help="chunks of the test set timed through both paths")
    parser.add_argument("--fidelity", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.child:
        print(json.dumps(measure_path(args.child, args.artifacts, args.rounds, args.single_224)))
        return
    if args.fidelity:
        print(json.dumps(reduced_decoding_experiment(args.artifacts, args.rounds)))
        return
    if args.paired:
        print(json.dumps(paired_batches(args.artifacts, args.pairs)))
        return
    if not FULLSIZE or not TEST224:
        sys.exit(f"error: real images not found under {SHARED / 'data'}")

    started = time.perf_counter()
    in_process = []
    for path in PATHS:
        print(f"== {path}", flush=True)
        in_process.append(run_child(path, args))
    print("== batch throughput, paired", flush=True)
    paired = run_child("--paired", args)
    print("== reduced JPEG decoding (experiment)", flush=True)
    fidelity = run_child("--fidelity", args)
    http = []
    for i, backend in enumerate(b for b in args.http_backends.split(",") if b):
        print(f"== HTTP, backend {backend}", flush=True)
        levels = dict(zip((1, 4, 8), args.requests))
        http.append(measure_http(args.artifacts, backend, args.port, levels, args.soak if i == 0 else 0))
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "images": {"fullsize": len(FULLSIZE), "test224": len(TEST224)},
        "in_process": in_process, "paired_batches": paired, "reduced_decoding": fidelity, "http": http,
        "seconds": round(time.perf_counter() - started),
    }
    result["bars"] = bars(result)
    save(args.out, result, table(result))


if __name__ == "__main__":
    main()
