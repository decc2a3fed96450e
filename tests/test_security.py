"""Access control, rate limiting, the audit log, security headers and the debug-mode refusal."""
from __future__ import annotations

import io
import json
import logging
import threading

import pytest
import requests
from helpers import ADMIN_KEY, API_KEYS, USER_KEY, assert_error, live_server

from chestxray.serving import auth, create_app, ratelimit
from chestxray.serving.auth import parse_keys
from chestxray.serving.ratelimit import TokenBuckets

NAME = "patient-jane-doe-1984-03-07.jpeg"


@pytest.fixture(scope="module")
def xray(fullsize_dir) -> bytes:
    return sorted(fullsize_dir.glob("NORMAL/*.jpeg"))[0].read_bytes()


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory):
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def app(tiny_artifacts, audit_path):
    return create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts), "GEMINI_API_KEY": "",
                       # A burst of 20, then one request a minute: slow refill keeps the counts exact.
                       "CHESTXRAY_API_KEYS": API_KEYS, "CHESTXRAY_RATE_LIMIT_PER_MIN": 1,
                       "CHESTXRAY_RATE_LIMIT_BURST": 20, "CHESTXRAY_AUDIT_LOG": str(audit_path)})


def refill(app) -> None:
    """Full buckets for every identity: the rate limiter installed anew from the app's own settings.

    The app is shared by the module (a fresh one per test would load the model each time)."""
    ratelimit.install(app, app.config["CHESTXRAY_RATE_LIMIT_PER_MIN"], app.config["CHESTXRAY_RATE_LIMIT_BURST"])


@pytest.fixture()
def client(app):
    refill(app)  # each test starts with full buckets (shared app)
    return app.test_client()


def upload(data: bytes, name: str = NAME) -> dict:
    return {"file": (io.BytesIO(data), name)}


def key(value: str) -> dict:
    return {"X-API-Key": value}


# --- keys ---------------------------------------------------------------------------------------

def test_key_spec_parsing():
    keys = parse_keys(" a:0123456789abcdef0123 , b:fedcba9876543210fedc:admin,")
    assert [(k.key_id, k.role) for k in keys] == [("a", "user"), ("b", "admin")]
    assert all(len(k.digest) == 32 for k in keys)
    assert parse_keys("") == ()
    for spec, words in [("a", "id:key"), ("a:0123456789abcdef:root", "role"), ("a:short", "shorter than 16"),
                        ("a:0123456789abcdef,a:0123456789abcdeg", "used twice"), (":0123456789abcdef", "id:key")]:
        with pytest.raises(ValueError, match=words) as info:
            parse_keys(spec)
        assert "0123456789abcde" not in str(info.value)  # an error never echoes a key


def test_prediction_endpoints_need_a_valid_key(client, xray):
    assert_error(client.post("/predict", data=upload(xray)), 401, "missing_api_key")
    assert_error(client.post("/predict", data=upload(xray), headers=key("wrong-key-0123456789abcdef")), 401,
                 "invalid_api_key")
    assert_error(client.post("/predict", data=upload(xray), headers=key(USER_KEY + "x")), 401, "invalid_api_key")
    for path in ("/predict/batch", "/predict/explain"):
        assert_error(client.post(path), 401, "missing_api_key")
    assert_error(client.get("/model/info"), 401, "missing_api_key")
    assert client.post("/predict", data=upload(xray), headers=key(USER_KEY)).status_code == 200
    assert client.post("/predict", data=upload(xray), headers=key(ADMIN_KEY)).status_code == 200  # admin > user
    assert client.get("/model/info", headers=key(USER_KEY)).status_code == 200


def test_health_page_and_openapi_stay_open(client):
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and b'id="api-key"' in page.data  # the page asks for the key


def test_admin_endpoint_refuses_user_keys(client):
    assert_error(client.post("/admin/reload"), 401, "missing_api_key")
    body = assert_error(client.post("/admin/reload", headers=key(USER_KEY)), 403, "forbidden")
    assert "admin" in body["message"]


def test_keys_are_kept_only_as_digests(app):
    assert USER_KEY not in json.dumps({k: str(v) for k, v in app.config.items()})
    assert USER_KEY not in repr(app.extensions[auth.EXTENSION])


def test_open_mode_is_announced_and_has_no_admin(caplog, tmp_path):
    caplog.set_level(logging.INFO)
    app = create_app({"CHESTXRAY_ARTIFACTS": str(tmp_path / "none"), "CHESTXRAY_API_KEYS": ""})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "OPEN MODE" in r.getMessage()]
    assert warnings, caplog.text
    client = app.test_client()
    assert_error(client.post("/predict"), 503, "model_unavailable")  # no key needed: it got past auth
    assert_error(client.post("/admin/reload"), 403, "forbidden")


def test_malformed_keys_stop_start_up(tmp_path):
    with pytest.raises(ValueError, match="CHESTXRAY_API_KEYS"):
        create_app({"CHESTXRAY_ARTIFACTS": str(tmp_path), "CHESTXRAY_API_KEYS": "ops:tooshort:admin"})


# --- rate limiting ------------------------------------------------------------------------------

def test_rate_limit_per_key_answers_429_with_retry_after(client, app):
    for _ in range(20):  # the burst
        assert client.get("/model/info", headers=key(USER_KEY)).status_code == 200
    response = client.get("/model/info", headers=key(USER_KEY))
    assert_error(response, 429, "too_many_requests")
    assert 55 <= int(response.headers["Retry-After"]) <= 60  # one token a minute
    assert client.get("/model/info", headers=key(ADMIN_KEY)).status_code == 200  # another key, its own bucket
    assert client.get("/health").status_code == 200  # health is never limited


def test_wrong_keys_are_rate_limited_per_address(client):
    statuses = [client.get("/model/info", headers=key(f"guess-{i:020d}")).status_code for i in range(21)]
    assert statuses == [401] * 20 + [429]


def test_open_mode_limits_per_client_address(tmp_path):
    app = create_app({"CHESTXRAY_ARTIFACTS": str(tmp_path), "CHESTXRAY_RATE_LIMIT_PER_MIN": 1,
                      "CHESTXRAY_RATE_LIMIT_BURST": 2})
    client = app.test_client()
    here = [client.post("/predict").status_code for _ in range(3)]
    there = client.post("/predict", environ_base={"REMOTE_ADDR": "127.0.0.2"}).status_code
    assert here == [503, 503, 429] and there == 503


def test_token_bucket_refills_at_the_configured_rate():
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=2, clock=lambda: now[0])
    assert [buckets.take("k") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("k") == pytest.approx(1.0)
    now[0] = 0.5
    assert buckets.take("k") == pytest.approx(0.5)
    now[0] = 1.0
    assert buckets.take("k") == 0.0
    assert TokenBuckets(per_minute=0, burst=1).take("k") == 0.0  # 0 turns limiting off


def test_token_bucket_is_thread_safe():
    buckets = TokenBuckets(per_minute=1e-6, burst=100)  # no refill to speak of: exactly the burst gets through
    allowed = []

    def hammer():
        allowed.append(sum(buckets.take("shared") == 0.0 for _ in range(50)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 100


# --- audit log ----------------------------------------------------------------------------------

def test_audit_line_of_a_real_request(app, audit_path, xray, caplog):
    caplog.set_level(logging.DEBUG)
    refill(app)
    with live_server(app) as url:
        ok = requests.post(f"{url}/predict", files={"file": (NAME, xray, "image/jpeg")}, headers=key(USER_KEY),
                           timeout=60)
        bad = requests.post(f"{url}/predict", files={"file": (NAME, b"%PDF-1.4 secret", "image/jpeg")},
                            headers=key(USER_KEY), timeout=60)
        denied = requests.post(f"{url}/predict", files={"file": (NAME, xray, "image/jpeg")},
                               headers=key("not-a-key-0123456789abcdef"), timeout=60)
    assert (ok.status_code, bad.status_code, denied.status_code) == (200, 415, 401)
    entries = [json.loads(line) for line in audit_path.read_text().splitlines()][-3:]
    assert all(set(e) == {"time", "key_id", "method", "endpoint", "status", "outcome", "model_version",
                          "latency_ms"} for e in entries)
    assert [(e["key_id"], e["endpoint"], e["status"], e["outcome"]) for e in entries] == [
        ("clinic", "/predict", 200, "ok"), ("clinic", "/predict", 415, "unsupported_type"),
        (None, "/predict", 401, "invalid_api_key")]
    assert entries[0]["model_version"] == ok.json()["model_version"]
    assert entries[0]["latency_ms"] > 0 and entries[0]["time"].endswith("+00:00")
    audit = audit_path.read_text()
    for secret in ("jane-doe", NAME, USER_KEY, "not-a-key", "secret"):
        assert secret not in audit + caplog.text, secret  # caplog: every logger of the app, the server too
    assert "127.0.0.1" not in audit  # the dev server's own access log has the address; the audit log does not


def test_audit_to_the_logger_by_default(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="chestxray.audit")
    app = create_app({"CHESTXRAY_ARTIFACTS": str(tmp_path), "CHESTXRAY_AUDIT_LOG": ""})
    app.test_client().post("/predict", data=upload(b"x"))
    app.test_client().get("/health")  # not audited: load balancers poll it constantly
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "chestxray.audit"]
    assert [(e["endpoint"], e["status"], e["outcome"]) for e in lines] == [("/predict", 503, "model_unavailable")]


# --- headers and debug mode ---------------------------------------------------------------------

def test_security_headers(client):
    for path in ("/", "/health", "/openapi.json", "/static/app.js", "/nope"):
        headers = client.get(path).headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert (headers.get("Cache-Control") == "no-store") == (not path.startswith("/static/")), path


def test_debug_mode_refused_outside_development(tmp_path, monkeypatch):
    where = {"CHESTXRAY_ARTIFACTS": str(tmp_path)}
    with pytest.raises(RuntimeError, match="debug mode"):
        create_app({**where, "DEBUG": True})
    monkeypatch.setenv("FLASK_DEBUG", "1")
    with pytest.raises(RuntimeError, match="CHESTXRAY_ENV"):
        create_app(where)
    assert create_app({**where, "CHESTXRAY_ENV": "development"}).debug
