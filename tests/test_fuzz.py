"""The fuzz corpus (tests/fuzz_corpus.py) against every upload endpoint of the app under gunicorn.

Every answer must be JSON with an error code and a message in words (or a prediction where the
input is in fact a valid image), never a 500 or a traceback; decompression bombs and the 50 MB body
must be refused without the server's memory growing by what decoding or holding them would take.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import requests
from fuzz_corpus import Case, build_corpus
from helpers import USER_KEY

pytestmark = pytest.mark.slow

ENDPOINTS = {"/predict": "file", "/predict/batch": "files", "/predict/explain": "file"}
BOMB_MAX_GROWTH_MIB = 100  # decoding the smallest bomb (20000x20000 gray) would take 381 MiB
HUGE = 20 * 2**20  # a body this large must be refused without being held in memory (the 50 MB case)
HEADERS = {"X-API-Key": USER_KEY}


@pytest.fixture(scope="module")
def corpus(fullsize_dir) -> list[Case]:
    xray = sorted(fullsize_dir.glob("PNEUMONIA/*.jpeg"))[-1].read_bytes()
    return build_corpus(xray, max_batch=10)


class PeakRss:
    """Samples the server's RSS every 10 ms while in the `with` block; `.peak` in MiB."""

    def __init__(self, server):
        self.server, self.peak, self._stop = server, 0.0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_mib())
            time.sleep(0.01)

    def __enter__(self):
        self.before = self.server.rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def send(url: str, endpoint: str, case: Case) -> requests.Response:
    if case.body is not None:
        return requests.post(url + endpoint, data=case.body, timeout=120,
                             headers={**HEADERS, "Content-Type": case.content_type})
    return requests.post(url + endpoint, files=case.fields(ENDPOINTS[endpoint]), headers=HEADERS, timeout=120)


def outcome(endpoint: str, case: Case, response: requests.Response) -> tuple[int, str | None, str | None]:
    """(status, error code, message); for one file sent to /predict/batch, that file's own status and error."""
    body = response.json()
    if endpoint == "/predict/batch" and response.status_code == 200 and len(case.files) == 1:
        item = body["results"][0]
        return item.get("status", 200), item.get("error"), item.get("message")
    if response.status_code == 200:
        return 200, None, None
    return response.status_code, body.get("error"), body.get("message")


def test_every_bad_upload_gets_a_4xx_json_error_in_words(gunicorn_server, corpus):
    tally: Counter = Counter()
    problems = []
    for endpoint in ENDPOINTS:
        for case in corpus:
            with PeakRss(gunicorn_server) as rss:
                response = send(gunicorn_server.url, endpoint, case)
            where = f"{endpoint} <- {case.name}"
            if not response.headers.get("Content-Type", "").startswith("application/json"):
                problems.append(f"{where}: {response.status_code} not JSON: {response.text[:200]!r}")
                continue
            if "Traceback" in response.text or response.status_code >= 500:
                problems.append(f"{where}: {response.status_code} {response.text[:300]}")
                continue
            status, code, message = outcome(endpoint, case, response)
            tally[(endpoint, status, code or "prediction")] += 1
            if status not in case.expect or code not in case.expect[status]:
                problems.append(f"{where}: got {status} {code}, expected {case.expect}")
            if code is not None and len((message or "").split()) < 3:
                problems.append(f"{where}: message not in words: {message!r}")
            if (case.bomb or case.size > HUGE) and rss.peak - rss.before > BOMB_MAX_GROWTH_MIB:
                problems.append(f"{where}: server RSS {rss.before:.0f} -> peak {rss.peak:.0f} MiB")
    print(f"\nfuzz: {len(corpus)} inputs x {len(ENDPOINTS)} endpoints = {sum(tally.values())} requests")
    print(json.dumps({f"{e} {s} {c}": n for (e, s, c), n in sorted(tally.items())}, indent=1))
    assert not problems, "\n".join(problems)


def test_bombs_leave_server_memory_where_it_was(gunicorn_server, corpus):
    """Fifty bomb uploads in a row: the worker's resident memory does not grow by what one decode would take."""
    bombs = [c for c in corpus if c.bomb]
    with PeakRss(gunicorn_server) as rss:
        for _ in range(50 // len(bombs) + 1):
            for case in bombs:
                assert send(gunicorn_server.url, "/predict", case).status_code == 422
    assert rss.peak - rss.before < BOMB_MAX_GROWTH_MIB, (rss.before, rss.peak)


def test_logs_never_carry_file_names_or_keys(gunicorn_server, corpus):
    """After the corpus (unicode, traversal, injected names), neither the audit log nor the server log names a file.

    The server is shared by the session: the key check reads only the audit lines these requests wrote
    (another test's request without a key is audited with key_id null, as it should be)."""
    log = gunicorn_server.audit_log
    earlier = len(log.read_text(encoding="utf-8").splitlines()) if log.exists() else 0
    named = [case for case in corpus if "file name" in case.name]
    for case in named:
        send(gunicorn_server.url, "/predict", case)
    audit = log.read_text(encoding="utf-8")
    server = gunicorn_server.server_log.read_text(encoding="utf-8", errors="replace")
    lines = [json.loads(line) for line in audit.splitlines()]
    ours = lines[earlier:]
    assert named and len(ours) >= len(named)
    assert all(set(entry) == {"time", "key_id", "method", "endpoint", "status", "outcome", "model_version",
                              "latency_ms"} for entry in lines)
    assert {entry["key_id"] for entry in ours if entry["endpoint"] == "/predict"} == {"clinic"}
    for text in (audit, server):
        for secret in ("röntgen", "passwd", "win.ini", "X-Injected", "x" * 100, ".jpeg", USER_KEY, "127.0.0.1 -"):
            assert secret not in text, secret
